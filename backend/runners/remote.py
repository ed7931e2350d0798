"""The runner of a model served by another server's OpenAI API: its HTTP client (capped reads, server-sent events)
and `RemoteRunner`. The handle over it, which tokenizes here and streams from there, is backend/remote.py.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
from typing import Iterator

import torch

from .. import limits
from ..formats import remote as sources
from ..budget import Deadline
from ..errors import GenerationError

MAX_LINE_BYTES = 1 << 20        # one server-sent event line; a longer one is a malformed stream
MAX_BODY_BYTES = 64 << 20       # a whole answer (streamed or not)
MAX_ERROR_CHARS = 200           # of the server's own error message, quoted in ours
# finish reasons the OpenAI API gives -> ours ("stop" is EOS unless a stop string was asked for)
FINISH = {"length": "length", "stop": "eos", "eos": "eos", "abort": "cancelled", "content_filter": "stop"}


NO_LOGITS = ("a remote model gives no logits here, so perplexity and label scores cannot be computed on it (the "
             "server returns its generated tokens' log-probabilities, not the prompt's); generation metrics work")


class RemoteError(GenerationError):
    """The remote server could not be reached, refused the request, or answered something that is not the API."""


class RemoteClient:
    """JSON over HTTP(S) to one OpenAI-compatible server: `get(path)` and `post_stream(path, body)` (SSE)."""

    def __init__(self, source: sources.RemoteSource, timeout: float | None = None, key: str | None = None):
        self.source, self.timeout = source, timeout or sources.timeout_seconds()
        self.key = key if key is not None else sources.api_key()

    def _connection(self) -> http.client.HTTPConnection:
        if self.source.scheme == "https":
            return http.client.HTTPSConnection(self.source.host, self.source.port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self.source.host, self.source.port, timeout=self.timeout)

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers

    def request(self, method: str, path: str, body: dict | None = None, deadline: Deadline | None = None):
        """(connection, response) with a 2xx status, else a RemoteError naming the status and the server's message."""
        conn = self._connection()
        if deadline is not None and deadline.at is not None:
            conn.timeout = min(self.timeout, max(deadline.remaining(), 0.1))
        try:
            conn.request(method, self.source.base_path + path, None if body is None else json.dumps(body),
                         self._headers())
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise RemoteError(self._unreachable(e)) from None
        if response.status >= 400:
            message = _error_message(_read_capped(response, 64 << 10))
            conn.close()
            raise RemoteError(f"the remote server at {self.source.address} answered {response.status}"
                              + (f": {message}" if message else ""))
        return conn, response

    def _unreachable(self, e: Exception) -> str:
        if isinstance(e, (socket.timeout, TimeoutError)):
            return f"the remote server at {self.source.address} did not answer within {self.timeout:g} s"
        if isinstance(e, ConnectionRefusedError):
            return f"the remote server at {self.source.address} refused the connection (is it running?)"
        if isinstance(e, socket.gaierror):
            return f"the remote server's host {self.source.host} is unknown"
        return f"could not talk to the remote server at {self.source.address} ({type(e).__name__})"

    def get(self, path: str) -> dict:
        conn, response = self.request("GET", path)
        try:
            raw = _read_capped(response, MAX_BODY_BYTES)
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(self._unreachable(e)) from None
        finally:
            conn.close()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RemoteError(f"the remote server at {self.source.address} answered {path} with something that "
                              f"is not JSON") from None

    def post_stream(self, path: str, body: dict, deadline: Deadline | None = None) -> Iterator[dict]:
        """The JSON objects of a server-sent event stream, until `data: [DONE]`. Each read waits at most the
        timeout, and no longer than the deadline leaves (the caller checks the deadline between events)."""
        conn, response = self.request("POST", path, {**body, "stream": True}, deadline)
        try:
            yield from sse_events(response, self.source.address)
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(self._unreachable(e)) from None
        finally:
            conn.close()


def _read_capped(response, cap: int) -> bytes:
    raw = response.read(cap + 1)
    if len(raw) > cap:
        raise RemoteError(f"the remote server's answer is over {cap:,} bytes")
    return raw


def _error_message(raw: bytes) -> str:
    """The `error.message` of an OpenAI-shaped error body (or `detail`, or nothing), trimmed; in public mode
    nothing (a remote server's text may name its own paths)."""
    if limits.public_mode():
        return ""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else \
        body.get("detail") if isinstance(body, dict) else None
    return str(message)[:MAX_ERROR_CHARS] if message else ""


def sse_events(response, address: str) -> Iterator[dict]:
    """Parse `data: {...}` lines (blank-line separated events; comments and other fields skipped) up to
    `data: [DONE]`. A line that is not JSON, an unterminated stream, or too many bytes: RemoteError."""
    total = 0
    malformed = f"the remote server at {address} sent a malformed stream"
    while True:
        line = response.readline(MAX_LINE_BYTES + 1)
        total += len(line)
        if len(line) > MAX_LINE_BYTES or total > MAX_BODY_BYTES:
            raise RemoteError(f"{malformed} (an event over {MAX_LINE_BYTES:,} bytes)")
        if not line:
            raise RemoteError(f"the remote server at {address} ended the stream before [DONE]")
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, ": keep-alive" comments, event:/id: fields
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RemoteError(malformed) from None
        if not isinstance(event, dict):
            raise RemoteError(malformed)
        if "error" in event:
            raise RemoteError(f"the remote server at {address} failed mid-stream"
                              + (f": {_error_message(data)}" if _error_message(data) else ""))
        yield event


class RemoteRunner:
    """The Runner slot of a remote handle: it has no local forward pass (the server runs the model)."""
    name = "remote"
    device = torch.device("cpu")
    weight_bytes = 0

    def __init__(self, client: RemoteClient):
        self.client = client

    def start(self, batch: int, max_len: int) -> None:
        raise GenerationError(NO_LOGITS)

    forward = full_logits = start

    def free(self) -> None:
        pass
