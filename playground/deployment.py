"""What a visitor may do on this deployment: in public mode (`backend.limits.public_mode()`) no server paths, only
allowlisted Hub ids (FORNAX_HUB_ALLOWLIST; an entry `org/name@<commit sha or tag>` pins that revision, which
`org/name` then loads, and any other revision of it is refused), uploads within the size cap, every sampling value within its cap whatever the API client
sends, a time limit per event, no Hub token of the server's, and training jobs, evaluation history, exports and
uploads owned by the visitor who made them. Private mode (a local user) keeps full freedom; the caps are then the
generous private ones.

Who a visitor is (`visitor_id`): a signed cookie (`fornax_visitor`, HMAC-SHA256 with FORNAX_SECRET or a random
secret kept 0600 under the cache), set by `VisitorCookies` on every response that lacks a valid one, so a reload
keeps ownership; a cookie without the server's signature is ignored (a new id), so nobody takes over another's id.
A caller without the cookie (an API client that drops it) is its own visitor for its session; one without a
session either (`/gradio_api/run/*`) a new visitor per request, so such callers never share an owner. A session hash
never stands for a cookie (the client picks it freely): a queued event's request carries its join request's headers,
the cookie included.

FORNAX_MODEL_SWAP (`anyone` | `nobody`; default `anyone`): whether visitors may load another model into the one
shared slot. With `nobody` the model the operator started with stays; `anyone` is the playground's point (upload a
.gguf, try a Hub id) on a Space, where every visitor then talks to the model loaded last.

Checks here run before anything touches the file system, so a refusal never says whether a path exists.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote

import gradio as gr

from backend import limits
from backend.formats import remote
from backend.loading import DEFAULT_HUB_ID

from .errors import refusal

VISITOR_COOKIE = "fornax_visitor"
COOKIE_MAX_AGE_S = 365 * 24 * 3600
MODEL_SWAP_CHOICES = ("anyone", "nobody")
JOB_SOURCE = "job:"              # a finished job's result as the Model box names it in public mode (not its path)


class Bounded(OrderedDict):
    """A dict that forgets its least recently set keys beyond `cap` (per-visitor and per-session state: the
    number of visitors a public Space sees is unbounded)."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap
        self._lock = threading.Lock()

    def put(self, key, value):
        with self._lock:
            return self._set(key, value)

    def change(self, key, fn):
        """Set `key` to `fn(its value or None)` under the lock (a read-modify-write no other thread interleaves)."""
        with self._lock:
            return self._set(key, fn(self.get(key)))

    def _set(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.cap:
            self.popitem(last=False)
        return value


MAX_VISITORS_KEPT = 4096
MAX_GRANTS_PER_VISITOR = 32
# Sources each visitor may load although they are paths: the results of its own finished training jobs.
_granted: Bounded = Bounded(MAX_VISITORS_KEPT)      # visitor -> {source as shown: folder}
_file_owners: Bounded = Bounded(16 * MAX_VISITORS_KEPT)     # served file path -> visitors who may download it
_secret: bytes | None = None


# --- who the visitor is -------------------------------------------------------------------------------------------
def secret() -> bytes:
    """FORNAX_SECRET, else a random secret kept (0600) under the cache so cookies outlive a restart, else one per
    process (a read-only cache)."""
    global _secret
    if _secret is None:
        env = os.environ.get("FORNAX_SECRET", "")
        _secret = env.encode() if env else _stored_secret()
    return _secret


def _stored_secret() -> bytes:
    from backend.disk.caches import cache_root

    path = cache_root() / "visitor-secret"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    except FileExistsError:
        pass
    except OSError:
        return secrets.token_bytes(32)
    try:
        value = path.read_text().strip()
        return value.encode() if len(value) >= 32 else secrets.token_bytes(32)
    except OSError:
        return secrets.token_bytes(32)


def _signature(raw_id: str) -> str:
    return hmac.new(secret(), raw_id.encode(), hashlib.sha256).hexdigest()[:32]


def mint_cookie() -> str:
    """A new visitor's cookie value: a random id and its signature."""
    raw = secrets.token_urlsafe(18)
    return f"{raw}.{_signature(raw)}"


def verified(cookie: str | None) -> str | None:
    """The visitor id in a cookie value when the server signed it, else None."""
    if not cookie or cookie.count(".") != 1:
        return None
    raw, sig = cookie.split(".")
    return raw if raw and hmac.compare_digest(sig, _signature(raw)) else None


def _cookie_of(request) -> str | None:
    try:
        header = request.headers.get("cookie") if request is not None else None
    except (AttributeError, KeyError):
        return None
    if not header:
        return None
    for part in str(header).split(";"):
        name, _, value = part.strip().partition("=")
        if name == VISITOR_COOKIE:
            return value.strip().strip('"')
    return None


def visitor_id(request: gr.Request | None) -> str:
    """Who this request is, stable across reloads: `v:<id>` from a signed cookie, `s:<hash>` for a cookieless
    session (never the cookie's visitor of that session: the client names its session hash, so knowing another's
    hash must not make anyone that visitor), and a new `r:<random>` for a request with neither."""
    raw = verified(_cookie_of(request))
    if raw is not None:
        return f"v:{raw}"
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"s:{session}" if session else f"r:{secrets.token_hex(16)}"


def visitor_key(request: gr.Request | None) -> str:
    """A visitor as stored on disk (history rows): a hash, since the id is the secret half of a cookie."""
    return hashlib.sha256(visitor_id(request).encode()).hexdigest()[:32]


class VisitorCookies:
    """ASGI middleware: sets the signed visitor cookie on a response whose request has no valid one, serves a file
    that a visitor owns (uploads, export downloads) to that visitor only, whichever of Gradio's file routes names it,
    and caps an upload request's files (before Gradio writes them) and each address's upload bytes per hour."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cookie = _cookie_of(_Headers(headers))
        raw = verified(cookie)
        path = scope.get("path", "")
        named = served_file(path)
        if named is not None and not may_download(named, raw):
            return await _plain(send, 404, b"Not found")
        if raw is None:
            send = _with_cookie(send, _cookie_header(scope, headers))
        if scope.get("method") == "POST" and path.rstrip("/").endswith("/upload"):
            return await _counted_upload(self.app, scope, receive, send, headers)
        return await self.app(scope, receive, send)


# Gradio serves a file at /file=<path> and at the deprecated /file/<path> (under /gradio_api, and wherever the app
# is mounted); the path arrives URL-decoded in the ASGI scope.
_FILE_ROUTE = re.compile(r"/file[=/]")


def served_file(path: str) -> str | None:
    """The file a request for `path` names to one of Gradio's file routes, or None when it names none."""
    found = _FILE_ROUTE.search(path)
    return path[found.end():] if found else None


class _Headers:
    def __init__(self, headers: dict):
        self.headers = headers


def _cookie_header(scope, headers: dict) -> bytes:
    https = scope.get("scheme") == "https" or headers.get("x-forwarded-proto", "").split(",")[0].strip() == "https"
    # Over https (a Space, shown in huggingface.co's iframe) the cookie must be third-party capable.
    where = "SameSite=None; Secure; Partitioned" if https else "SameSite=Lax"
    return (f"{VISITOR_COOKIE}={mint_cookie()}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; {where}").encode()


def _with_cookie(send, value: bytes):
    async def sending(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", value)]}
        await send(message)
    return sending


async def _plain(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _TooManyFiles(Exception):
    pass


class _OverBudget(Exception):
    pass


_upload_budgets: Bounded = Bounded(MAX_VISITORS_KEPT)  # address -> (bytes still allowed, when that was counted)
HOUR_S = 3600.0


def upload_allowance(address: str, cap: int, now: float | None = None) -> float:
    """The bytes `address` may still upload: `cap` per hour, refilled steadily (a token bucket)."""
    now = time.monotonic() if now is None else now
    level, then = _upload_budgets.get(address) or (float(cap), now)
    return min(float(cap), level + (now - then) * cap / HOUR_S)


def spend_upload(address: str, cap: int, nbytes: int) -> float:
    """Count `nbytes` received from `address` against its hourly budget; returns what is left (below 0: over)."""
    now = time.monotonic()

    def spent(old):
        level = min(float(cap), old[0] + (now - old[1]) * cap / HOUR_S) if old else float(cap)
        return (level - nbytes, now)

    return _upload_budgets.change(address, spent)[0]


def _budget_message(cap: int) -> bytes:
    return (f"uploads from your address have used this public deployment's allowance of {cap:,} bytes per hour: "
            f"try again later").encode()


def _boundary(content_type: str) -> bytes | None:
    """The multipart boundary of a Content-Type header as the multipart parser reads it (python_multipart, as
    Starlette and Gradio parse it: case, spaces and quotes as they allow), or None when it is not multipart or has
    none."""
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    return options.get(b"boundary") or None


async def _counted_upload(app, scope, receive, send, headers: dict) -> None:
    """An upload request whose multipart body carries more than `max_upload_files` parts, or more bytes than its
    address has left of `max_upload_bytes_per_hour`, is cut off as it streams in (Gradio writes each part to disk
    while parsing; only its per-file size is capped) and answered 413 / 429; one without a boundary is refused."""
    boundary = _boundary(headers.get("content-type", ""))
    if boundary is None:
        return await _plain(send, 400, b"an upload must be multipart/form-data with a boundary")
    caps = limits.current()
    cap, marker, budget = caps.max_upload_files, b"--" + boundary, caps.max_upload_bytes_per_hour
    from starlette.requests import Request

    from .hardening import declared_length, visitor_address

    address = visitor_address(Request(scope))
    if budget > 0:
        declared = declared_length(scope) or 0
        if upload_allowance(address, budget) < max(declared, 1):
            return await _plain(send, 429, _budget_message(budget))
    seen = {"markers": 0, "tail": b"", "started": False}

    async def counting():
        message = await receive()
        if message.get("type") == "http.request":
            body = message.get("body", b"")
            if budget > 0 and body and spend_upload(address, budget, len(body)) < 0:
                raise _OverBudget()
            chunk = seen["tail"] + body
            seen["markers"] += chunk.count(marker)  # a marker in the kept tail alone is too short to count twice
            seen["tail"] = chunk[-(len(marker) - 1):]
            if seen["markers"] - 1 > cap:  # the closing marker ends the last part
                raise _TooManyFiles()
        return message

    async def sending(message):
        seen["started"] = seen["started"] or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, counting, sending)
    except _TooManyFiles:
        if not seen["started"]:
            await _plain(send, 413, f"one upload may carry at most {cap} files".encode())
    except _OverBudget:
        if not seen["started"]:
            await _plain(send, 429, _budget_message(budget))


def middleware() -> list:
    """What `launch` / `mount_gradio_app` take as `app_kwargs["middleware"]`."""
    from starlette.middleware import Middleware

    return [Middleware(VisitorCookies)]


# --- what a visitor owns ------------------------------------------------------------------------------------------
def _file_key(path: str) -> str:
    """A served file as the file system finds it: absolute, normalised, links resolved (so `//tmp/x`, `/tmp//x`
    and `tmp/../tmp/x` are one file)."""
    return os.path.realpath(os.path.abspath(str(path)))


def own_file(request: gr.Request | None, path: str | os.PathLike) -> None:
    """Serve `path` (an upload, a download made for this visitor) at /gradio_api/file= to this visitor only. A
    cookieless caller cannot prove who it is at download time: its files stay unguessable URLs only it was given."""
    vid = visitor_id(request)
    if not public() or not vid.startswith("v:"):
        return
    _file_owners.change(_file_key(path), lambda owners: (owners or frozenset()) | {vid})


def may_download(path: str, raw_visitor: str | None) -> bool:
    """Whether /gradio_api/file=<path> may be served to this cookie's visitor: a file nobody owns follows Gradio's
    own rules; an owned one (named as decoded once or twice) only to its owners."""
    for name in (path, unquote(path)):
        try:
            owners = _file_owners.get(_file_key(name))
        except (OSError, ValueError):  # a name the file system cannot take (a NUL byte): Gradio refuses it too
            return False
        if owners is not None:
            return raw_visitor is not None and f"v:{raw_visitor}" in owners
    return True


def history_filter(request: gr.Request | None) -> str | None:
    """Whose evaluation history the page shows: the visitor's own rows in public mode, everyone's in private."""
    return visitor_key(request) if public() else None


def model_swap() -> str:
    """FORNAX_MODEL_SWAP: `anyone` (the default) or `nobody`; anything else is read as `nobody` (the safe side)."""
    value = os.environ.get("FORNAX_MODEL_SWAP", "anyone").strip().lower() or "anyone"
    return value if value in MODEL_SWAP_CHOICES else "nobody"


def check_swap() -> None:
    """May a visitor load another model into the shared slot (FORNAX_MODEL_SWAP)?"""
    if model_swap() == "nobody":
        raise refusal("this deployment's model is fixed by its operator: visitors cannot load another one "
                      "(FORNAX_MODEL_SWAP=nobody)")


def check_export(loaded_by: str | None, request: gr.Request | None) -> None:
    """Public mode: the operator's model, a Hub model or `default` may be exported by anyone; a model a visitor
    uploaded or trained only by that visitor."""
    if public() and loaded_by is not None and loaded_by != visitor_id(request):
        raise refusal("the loaded model was uploaded or trained by another visitor: only they can export it; "
                      "load default or a Hub model to export it")


def shown_source(source: str) -> str:
    """What the page shows for a model source in public mode: never a server path (an upload's original file
    name, a job's result by its job id)."""
    if not public() or source == "default" or hub_allowed(source) or source.startswith(JOB_SOURCE) or \
            remote.allowed(source):  # an allowlisted remote server: its address is the operator's, not a path
        return source
    return Path(source).name if os.sep in source else source


def public() -> bool:
    return limits.public_mode()


def hub_allowlist() -> list[str]:
    """FORNAX_HUB_ALLOWLIST (comma-separated Hub ids, each `org/name` or pinned `org/name@<revision>`); unset: the
    default model's Hub id only."""
    raw = os.environ.get("FORNAX_HUB_ALLOWLIST")
    if raw is None:
        return [DEFAULT_HUB_ID]
    return [r.strip() for r in raw.split(",") if r.strip()]


def hub_allowed(source: str) -> str | None:
    """What an allowlisted Hub source loads, or None: an entry as written, or a pinned entry's bare `org/name` ->
    `org/name@<its revision>` (so a later push to the repo is never what a visitor fetches). Another revision
    than the entry's, or a revision of an unpinned entry, is not allowed."""
    allowlist = hub_allowlist()
    if source in allowlist:
        return source
    if "@" not in source:
        pinned = [entry for entry in allowlist if entry.partition("@")[0] == source and "@" in entry]
        if pinned:
            return pinned[0]
    return None


def job_owner(request: gr.Request | None) -> str | None:
    """Who owns a training job started by this request: its visitor in public mode, nobody in private."""
    return visitor_id(request) if public() else None


def grant(request: gr.Request | None, folder: str, shown: str | None = None) -> str:
    """Let this visitor load `folder` (the result of its own training job) although it is a path, by `shown`
    (default: the folder itself); returns the name to load it by."""
    shown = shown or folder

    def granted(old):
        grants = Bounded(MAX_GRANTS_PER_VISITOR)
        grants.update(old or {})
        grants.put(shown, folder)
        return grants

    _granted.change(visitor_id(request), granted)
    return shown


def check_source(source: str, request: gr.Request | None = None) -> str:
    """Public mode: `default`, an allowlisted Hub id, or a result granted to this visitor; one message for
    everything else, existing or not. Returns what to load (a granted name's folder)."""
    if not public() or source == "default" or remote.allowed(source):
        return source  # remote.allowed: an openai+http(s) source whose host is in FORNAX_REMOTE_ALLOWLIST
    if (hub := hub_allowed(source)) is not None:
        return hub  # an allowlisted Hub id; a pinned entry's bare id: `org/name@<its revision>`
    folder = (_granted.get(visitor_id(request)) or {}).get(source)
    if folder is not None:
        return folder
    allowed = ", ".join(["default", *hub_allowlist()])
    raise refusal(f"this public deployment loads only these models: {allowed}, or a .gguf file you upload "
                  f"(paths on the server are not available)")


def check_upload(path: str, what: str = "the upload", request: gr.Request | None = None) -> None:
    """An uploaded file within the upload cap, checked before it is read or copied (Gradio's own `max_file_size`
    refuses bigger ones already; this holds for any other way a file arrives); it is served to its uploader only."""
    if not public():
        return
    own_file(request, path)
    limits.check(os.path.getsize(path), limits.current().max_upload_bytes, f"{what}'s size in bytes")


def check_sampling(params: dict, prompt_chars: int) -> None:
    """The panel's values against the caps, before anything is tokenized or allocated."""
    if not public():
        return
    caps = limits.current()
    for name, cap in (("max_new_tokens", caps.max_new_tokens), ("num_samples", caps.max_num_samples)):
        value = params.get(name)
        if isinstance(value, (int, float)):
            limits.check(value, cap, name)
    stops = params.get("stop") or []
    limits.check(len(stops), caps.max_stop_strings, "the number of stop strings")
    for s in stops:
        limits.check(len(s), caps.max_stop_chars, "a stop string's length in characters")
    limits.check(prompt_chars, caps.max_prompt_chars, "the prompt's length in characters")


def check_fill_mask(text_chars: int, top_k: int | None = None) -> None:
    """Fill-mask and pseudo-log-likelihood requests against the caps (PLL runs one forward per token)."""
    caps = limits.current()
    limits.check(text_chars, caps.max_fill_mask_chars, "the text's length in characters")
    if top_k is not None:
        limits.check(top_k, caps.max_fill_mask_top_k, "top-k")


def check_training(steps: int, batch_size: int, lora_r: int) -> None:
    if not public():
        return
    caps = limits.current()
    limits.check(steps, caps.max_finetune_steps, "steps")
    limits.check(batch_size, caps.max_batch_size, "batch size")
    limits.check(lora_r, caps.max_lora_r, "LoRA rank")


def event_options() -> dict:
    """Queue options of an event that runs the model: its time limit (none in private mode by default)."""
    seconds = limits.current().event_time_limit_s
    return dict(time_limit=seconds) if seconds > 0 else {}


def refuse_server_token() -> None:
    """Public mode: the Hub client never sends the server's token (HF_TOKEN, a login) for a visitor's download,
    so a visitor cannot reach private repos through it."""
    import huggingface_hub.constants

    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True
