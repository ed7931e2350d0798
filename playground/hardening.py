"""Request-level guards of a public deployment, below the handlers: what a visitor can send before any handler of
ours runs.

- `BodyCap` (ASGI middleware): a request body over `max_request_bytes` (uploads: the upload cap plus room for the
  form) is refused with 413, declared (Content-Length) or counted as a chunked body arrives, before it is parsed.
- `patch_gradio()`: Gradio downloads a file input whose FileData `path` is a URL, and `/gradio_api/file=<url>`
  fetches any public URL for the caller; in public mode a visitor uploads, it never names a URL to fetch, so both
  are refused in plain words (nothing is fetched).
- `cap_queue(demo)`: one browser session, or one address, cannot fill the queue that every visitor shares;
  `admit_api_request` holds the OpenAI API's requests (which wait for the model outside that queue) to the same
  shares, counted while each is waiting or running.

Everything here checks `limits.public_mode()` per request: a private app in the same process keeps Gradio's ways.
"""
from __future__ import annotations

import os
import threading

from backend import limits

# The multipart form around an uploaded file (boundaries, headers, the file's name) beside the file's own bytes.
UPLOAD_FORM_SLACK_BYTES = 1024 * 1024
URL_REFUSAL = ("this public deployment does not fetch files from URLs: upload the file from your computer "
               "instead")


# --- request bodies ---------------------------------------------------------------------------------------------
class RequestTooLarge(Exception):
    """A request body grew past its cap while the app was reading it."""


def body_cap(path: str) -> int | None:
    """The most bytes a request to `path` may carry in public mode (None: no cap)."""
    caps = limits.current()
    if path.rstrip("/").endswith("/upload"):
        return caps.max_upload_bytes + UPLOAD_FORM_SLACK_BYTES
    return caps.max_request_bytes if caps.max_request_bytes > 0 else None


def declared_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def too_large_message(cap: int, size: int | None = None) -> str:
    size_text = f"{size:,} bytes" if size is not None else f"more than {cap:,} bytes"
    return f"the request body is {size_text} but this public deployment accepts at most {cap:,} bytes per request"


async def refuse_body(scope, send, message: str) -> None:
    """413 in the shape the caller expects: OpenAI's error object under /v1, Gradio's {"detail"} elsewhere."""
    import json

    if scope.get("path", "").startswith("/v1/"):
        payload = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                             "code": "request_too_large"}}
    else:
        payload = {"detail": message}
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyCap:
    """ASGI middleware: refuses a request body over `body_cap(path)` before the app parses it (public mode only).

    A declared Content-Length over the cap is refused before a byte is read; a chunked body is counted as the app
    pulls it, and past the cap the app's own answer (whatever it made of the error) is replaced by the 413."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("fornax.body_capped") or not limits.public_mode():
            return await self.app(scope, receive, send)
        cap = body_cap(scope.get("path", ""))
        if cap is None:
            return await self.app(scope, receive, send)
        scope = {**scope, "fornax.body_capped": True}  # a second BodyCap below (the mounted Gradio app) passes
        declared = declared_length(scope)
        if declared is not None and declared > cap:
            return await refuse_body(scope, send, too_large_message(cap, declared))
        state = {"seen": 0, "over": False, "started": False}

        async def counted_receive():
            if state["over"]:
                raise RequestTooLarge(too_large_message(cap))
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > cap:
                    state["over"] = True
                    raise RequestTooLarge(too_large_message(cap))
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # the refusal below answers instead
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await refuse_body(scope, send, too_large_message(cap))


def middleware() -> list:
    """What `launch` / `mount_gradio_app` take in `app_kwargs["middleware"]`."""
    from starlette.middleware import Middleware

    return [Middleware(BodyCap)]


# --- Gradio: no URL is fetched for a visitor ---------------------------------------------------------------------
_patched = False


def is_url(value) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://", "//"))


def url_file_inputs(data) -> bool:
    """Whether `data` (a component's input as the client sent it) holds a FileData whose path is a URL."""
    if isinstance(data, dict):
        meta = data.get("meta")
        if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData" and is_url(data.get("path")):
            return True
        return any(url_file_inputs(v) for v in data.values())
    if isinstance(data, (list, tuple)):
        return any(url_file_inputs(v) for v in data)
    return False


def patch_gradio() -> None:
    """Install, once per process, the public-mode refusals of URL files in Gradio (see the module's docstring)."""
    global _patched
    if _patched:
        return
    from fastapi import HTTPException
    from gradio import processing_utils, routes
    from gradio.exceptions import Error

    move_files = processing_utils.async_move_files_to_cache

    async def move_files_refusing_urls(data, block, postprocess=False, *args, **kwargs):
        if not postprocess and limits.public_mode():
            raw = data.model_dump() if hasattr(data, "model_dump") else data
            if url_file_inputs(raw):
                raise Error(URL_REFUSAL, print_exception=False)
        return await move_files(data, block, postprocess, *args, **kwargs)

    url_stream = routes.secure_url_stream_response

    async def url_stream_refused(url, request):
        if limits.public_mode():
            raise HTTPException(status_code=403, detail=URL_REFUSAL)
        return await url_stream(url, request)

    processing_utils.async_move_files_to_cache = move_files_refusing_urls
    routes.secure_url_stream_response = url_stream_refused
    _patched = True


# --- the queue --------------------------------------------------------------------------------------------------
def visitor_address(request) -> str:
    """The address a request came from: on a Space, the one its proxy saw (the last X-Forwarded-For entry, which a
    client cannot forge), elsewhere the peer's own address."""
    try:
        headers, client = request.headers, request.client
    except AttributeError:
        return "unknown"
    forwarded = headers.get("x-forwarded-for") if os.environ.get("SPACE_ID") else None
    if forwarded:
        return forwarded.split(",")[-1].strip()
    return client.host if client is not None else "unknown"


def queue_refusal(queue, body, request) -> str | None:
    """Why this event may not join the queue now, or None: a session, or an address, already has its share."""
    caps = limits.current()
    session, address = body.session_hash, visitor_address(request)
    events = list(queue.event_ids_to_events.values())
    mine = sum(1 for e in events if session is not None and e.session_hash == session)
    if mine >= caps.max_queued_per_session:
        return (f"you already have {mine} requests waiting or running; this public deployment takes at most "
                f"{caps.max_queued_per_session} per visitor: wait for them to finish")
    from_address = sum(1 for e in events if visitor_address(e.request) == address)
    if from_address >= caps.max_queued_per_address:
        return (f"{from_address} requests from your address are waiting or running; this public deployment takes "
                f"at most {caps.max_queued_per_address} per address: wait for them to finish")
    return None


def cap_queue(demo) -> None:
    """Wrap `demo`'s queue (after `demo.queue(...)`) so that one visitor's share of it is capped in public mode."""
    queue = demo._queue
    push = queue.push

    async def capped_push(body, request, username):
        if limits.public_mode():
            why = queue_refusal(queue, body, request)
            if why is not None:
                return False, why, "queue_full"
        return await push(body, request, username)

    queue.push = capped_push


# --- the OpenAI API's share ---------------------------------------------------------------------------------------
class InFlight:
    """How many requests each key (a visitor, an address) has waiting or running now."""

    def __init__(self):
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, wanted: list[tuple[str, int]]) -> "Ticket | tuple[str, int, int]":
        """One more request for every key, or (key, count, cap) of the first key already at its cap (nothing
        counted then)."""
        with self._lock:
            for key, cap in wanted:
                if self._counts.get(key, 0) >= cap:
                    return key, self._counts.get(key, 0), cap
            for key, _ in wanted:
                self._counts[key] = self._counts.get(key, 0) + 1
        return Ticket(self, [key for key, _ in wanted])

    def give_back(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                left = self._counts.get(key, 0) - 1
                if left > 0:
                    self._counts[key] = left
                else:
                    self._counts.pop(key, None)  # (so the table holds only keys with requests in flight)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def total(self) -> int:
        return sum(self._counts.values())


class Ticket:
    """One admitted request's place in `InFlight`; `release()` (once or more) gives it back."""

    def __init__(self, table: InFlight, keys: list[str]):
        self._table, self._keys = table, keys
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            keys, self._keys = self._keys, []
        if keys:
            self._table.give_back(keys)


api_in_flight = InFlight()


def admit_api_request(request, visitor: str | None) -> Ticket | str:
    """A ticket for one OpenAI API request (released when the request ends), or why it is refused now: its visitor
    (a signed cookie, when it sends one) or its address already has its share of requests waiting or running."""
    caps = limits.current()
    wanted = [(f"address:{visitor_address(request)}", caps.max_queued_per_address)]
    if visitor is not None:
        wanted.insert(0, (f"visitor:{visitor}", caps.max_queued_per_session))
    taken = api_in_flight.take(wanted)
    if isinstance(taken, Ticket):
        return taken
    key, count, cap = taken
    if key.startswith("visitor:"):
        return (f"you already have {count} requests waiting or running; this deployment takes at most {cap} per "
                f"visitor: wait for them to finish")
    return (f"{count} requests from your address are waiting or running; this deployment takes at most {cap} per "
            f"address: wait for them to finish")
