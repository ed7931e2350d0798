"""Hugging Face Hub loads: a repo id checked, the model's size read from its config.json and safetensors headers
before any weight is downloaded, and never the server's token for a visitor.

The precheck costs two small requests (config.json, and the safetensors headers that `huggingface_hub` reads
with range requests), so a 72B repository is refused in a second instead of filling the disk.

A source may pin a revision, `org/name@<commit sha, tag or branch>` (`split_source`): the precheck and the
download then read that revision's files only, so what was sized is what is fetched, and a public deployment's
allowlist can pin an id against a later push by its owner (playground/deployment.py `hub_allowed`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .. import budget, limits
from ..errors import FornaxError, ModelLoadError

_REVISION = re.compile(r"^[A-Za-z0-9_][\w.\-/]{0,199}$")

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "vocab.json", "merges.txt"]
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def hub_token(token: str | bool | None = None) -> str | bool | None:
    """The token for a hub call: an explicit one wins; otherwise a public deployment sends none (False), so a
    visitor can never read a private repository through the server's HF_TOKEN; a local user's login is used."""
    if token is not None:
        return token
    return False if limits.public_mode() else None


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    parts = repo_id.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
        raise ModelLoadError(f"{repo_id!r} is not a Hub id like 'org/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelLoadError(f"{repo_id!r} is not a valid Hub id: {e}") from e


def check_revision(revision: str) -> None:
    """A commit sha, tag or branch name (no `..`, no leading `/`, nothing a URL or a path would read otherwise)."""
    if not _REVISION.match(revision) or ".." in revision or "//" in revision or revision.endswith("/"):
        raise ModelLoadError(f"{revision!r} is not a Hub revision (a commit sha, a tag or a branch)")


def split_source(source: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); `org/name` -> ("org/name", None). Both parts are checked."""
    repo_id, at, revision = source.partition("@")
    check_repo_id(repo_id)
    if not at:
        return repo_id, None
    check_revision(revision)
    return repo_id, revision


def _named(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _download_file(repo_id: str, filename: str, token, revision: str | None = None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, token=token, revision=revision, etag_timeout=10))


def _safetensors_parameter_count(repo_id: str, token, revision: str | None = None) -> dict[str, int]:
    """{dtype: parameters} over the repo's safetensors files, from their headers (no weights downloaded)."""
    from huggingface_hub import get_safetensors_metadata

    return dict(get_safetensors_metadata(repo_id, token=token, revision=revision).parameter_count)


def _pinned(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    """(repo id, revision) from `org/name` or `org/name@rev` and an explicit `revision` (which must agree)."""
    repo_id, pinned = split_source(repo_id)
    if revision is not None:
        check_revision(revision)
        if pinned is not None and pinned != revision:
            raise ModelLoadError(f"{repo_id} names two revisions: {pinned!r} and {revision!r}")
    return repo_id, revision if revision is not None else pinned


def precheck(repo_id: str, token=None, revision: str | None = None) -> dict:
    """Refuse a repo (at `revision`, or the one `org/name@rev` names; default its main branch) over this
    deployment's caps from its config.json and safetensors headers; returns {"params", "bytes"} as declared."""
    from huggingface_hub.errors import NotASafetensorsRepoError

    from ..models.config import ModelConfig

    caps = limits.current()
    token = hub_token(token)
    repo_id, revision = _pinned(repo_id, revision)
    name = _named(repo_id, revision)
    try:
        hf = json.loads(_download_file(repo_id, "config.json", token, revision=revision).read_text())
        cfg = ModelConfig.from_hf_config(hf)  # validates sizes and the config's own parameter count
    except FornaxError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{name}'s config.json is missing or has a bad field: {e}") from e
    try:
        counts = _safetensors_parameter_count(repo_id, token, revision=revision)
    except NotASafetensorsRepoError as e:
        raise ModelLoadError(f"{name} has no safetensors weights (Fornax loads hub models from safetensors only)"
                             ) from e
    unknown = sorted(set(counts) - set(DTYPE_BYTES))
    if unknown:
        raise ModelLoadError(f"{name}'s safetensors hold tensors of unknown dtype(s) {', '.join(unknown)}")
    params = sum(counts.values())
    n_bytes = sum(n * DTYPE_BYTES[d] for d, n in counts.items())
    limits.check(params, caps.max_model_params, f"{name}'s parameter count (safetensors headers)")
    limits.check(n_bytes, caps.max_model_bytes, f"{name}'s weight bytes (safetensors headers)")
    # nothing is downloaded that could not be loaded here (fp32 on a CPU, as `load` picks by default)
    budget.check_load(cfg, "bfloat16" if torch_cuda() else "float32", what=f"loading {name}")
    return {"params": params, "bytes": n_bytes}


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def snapshot(repo_id: str, token=None, revision: str | None = None) -> Path:
    """The repo's files (at `revision`, or the one `org/name@rev` names; default its main branch) from the local
    Hugging Face cache; when missing and not offline, that revision's size is checked first, then only the files a
    model needs are downloaded from that same revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = _pinned(repo_id, revision)
    name = _named(repo_id, revision)
    token = hub_token(token)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=True,
                                      token=token))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if _offline():
        raise ModelLoadError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        precheck(repo_id, token, revision=revision)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, etag_timeout=10,
                                      token=token))
    except FornaxError:
        raise
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"could not fetch {name} from the Hugging Face Hub: {e}") from e
    except Exception as e:  # network stacks raise a zoo of types; all mean the same to the user
        raise ModelLoadError(f"could not fetch {name} from the Hugging Face Hub: {type(e).__name__}: {e}") from e
