"""Remote model sources: `openai+http://HOST:PORT/v1#MODEL-ID` (or `openai+https://…`) names a model served by
another OpenAI-compatible server (vLLM, llama.cpp's server, Fornax's own `python -m playground --api-only`).

  openai+http://127.0.0.1:8000/v1                   the server's first model (GET /v1/models)
  openai+http://127.0.0.1:8000/v1#Qwen/Qwen2-0.5B   that model id

The server's API key is the operator's: `FORNAX_REMOTE_API_KEY` (sent as `Authorization: Bearer …`), never part
of a source a visitor types. In public mode a visitor may name only hosts in `FORNAX_REMOTE_ALLOWLIST`
(comma-separated `host:port`; unset: none). The handle itself lives in backend/remote.py, its runner in
backend/runners/remote.py.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .. import limits
from ..errors import ModelLoadError

PREFIXES = ("openai+http://", "openai+https://")
API_KEY_ENV, ALLOWLIST_ENV, TOKENIZER_ENV, TIMEOUT_ENV = ("FORNAX_REMOTE_API_KEY", "FORNAX_REMOTE_ALLOWLIST",
                                                          "FORNAX_REMOTE_TOKENIZER", "FORNAX_REMOTE_TIMEOUT")
_MODEL_ID = re.compile(r"^[\w./:@+-]{1,200}$")


@dataclass(frozen=True)
class RemoteSource:
    scheme: str        # "http" or "https"
    host: str
    port: int
    base_path: str     # "/v1"
    model: str | None  # None: the server's first model

    @property
    def address(self) -> str:
        """`host:port`, the form the allowlist uses (the only part of a source shown to a visitor)."""
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.address}{self.base_path}"


def is_remote(source) -> bool:
    return isinstance(source, str) and source.lower().startswith(PREFIXES)


def parse(source: str) -> RemoteSource:
    """The parts of a remote source, or a plain ModelLoadError naming what is wrong with it."""
    if not is_remote(source):
        raise ModelLoadError("a remote model source starts with openai+http:// or openai+https://")
    url, _, model = source[len("openai+"):].partition("#")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ModelLoadError(f"the remote source's address is malformed: {e}") from e
    if not parts.hostname or parts.username or parts.password or parts.query:
        raise ModelLoadError("a remote source is openai+http(s)://HOST:PORT/v1[#model-id], with no user, password "
                             "or query (the API key comes from FORNAX_REMOTE_API_KEY)")
    model = model.strip() or None
    if model is not None and not _MODEL_ID.match(model):
        raise ModelLoadError("the remote model id (after #) may hold letters, digits and ./:@+-_ only")
    port = port or (443 if parts.scheme == "https" else 80)
    return RemoteSource(parts.scheme, parts.hostname.lower(), port, parts.path.rstrip("/") or "/v1", model)


def allowlist() -> set[str]:
    """FORNAX_REMOTE_ALLOWLIST as a set of `host:port` (lower case)."""
    raw = os.environ.get(ALLOWLIST_ENV, "")
    return {item.strip().lower() for item in raw.split(",") if item.strip()}


def allowed(source: str) -> bool:
    """Whether this deployment may load `source`: always in private mode; in public mode an allowlisted host only."""
    try:
        where = parse(source)
    except ModelLoadError:
        return False
    return not limits.public_mode() or where.address in allowlist()


def check_allowed(source: RemoteSource) -> None:
    if limits.public_mode() and source.address not in allowlist():
        raise ModelLoadError("this public deployment connects only to the remote servers its operator listed; "
                             f"{source.address} is not one of them")


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def timeout_seconds() -> float:
    """Seconds to wait for the server to connect or send the next bytes (FORNAX_REMOTE_TIMEOUT, default 30)."""
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, "30")))
    except ValueError:
        return 30.0
