"""Issue 18 item 4: a streaming OpenAI client that never reads must not hold the model forever, and requests
waiting for the model must not use up the worker threads (so /v1/models and other visitors keep being answered).

The server runs with small socket buffers (a listening socket with a small SO_SNDBUF, a low asyncio write-buffer
limit) and the client sets a small SO_RCVBUF, so a non-reading client blocks the server's sends after a few KB."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from contextlib import contextmanager

import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol

from playground import current
from playground.openai_api import server
from tests.backend.tiny import make_tiny

SEND_TIMEOUT_S = 1          # FORNAX_STREAM_SEND_TIMEOUT_S for these tests (public default: 10 s)
WAITERS = 45                # more than the worker threads (40): the probe that hung /v1/models
# n=4 samples of up to 110 tokens at seed 2: ~370 streamed chunks (~70 KB), far over the buffers below
PARKED = dict(model="x", messages=[{"role": "user", "content": "Hi"}], stream=True, n=4, max_tokens=110, seed=2,
              temperature=1.0)
SMALL = dict(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, seed=1)
# Waiters that need the model slot but no generation once they have it (public mode runs prepared backends only):
# they show that waiting costs no worker thread, at no CPU cost.
WAITER = {**SMALL, "backend": "not-prepared"}


class SmallWriteBuffer(H11Protocol):
    """uvicorn's h11 protocol pausing its sends after 2 KB waiting in user space (asyncio's default: 64 KB)."""

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=2048)


@contextmanager
def small_buffer_server(app):
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="critical", http=SmallWriteBuffer))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FORNAX_PUBLIC", "1")
    mp.setenv("FORNAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("FORNAX_STREAM_SEND_TIMEOUT_S", str(SEND_TIMEOUT_S))
    # the 46 requests below come from one address: past its public share (32), which is tested in test_network_edge
    mp.setenv("FORNAX_MAX_QUEUED_PER_ADDRESS", "1000")
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny("llama", folder)
    current.load(str(folder))
    with small_buffer_server(server(None)) as p:
        yield p
    mp.undo()


def raw_request(port: int, path: str, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """Send a POST and return the socket, unread."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def read_answer(s: socket.socket, timeout: float) -> bytes:
    """One whole HTTP answer with a Content-Length (headers and body may come in several segments)."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
        chunk = s.recv(65536)
        assert chunk, f"the connection closed mid-answer: {data!r}"
        data += chunk
    return data


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def get(port: int, path: str, timeout: float) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def post(port: int, path: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_client_that_never_reads_loses_the_model_and_nobody_waits_on_threads(port):
    parked = raw_request(port, "/v1/chat/completions", PARKED, rcvbuf=1024)
    waiters = []
    try:
        wait_until(lambda: current._lock.locked(), 30, "the parked stream never took the model")
        started = time.monotonic()
        waiters = [raw_request(port, "/v1/chat/completions", WAITER) for _ in range(WAITERS)]
        # While the model is held and 45 requests wait for it, the model list still answers at once.
        models = get(port, "/v1/models", timeout=5)
        assert models["data"][0]["id"] == "local-model"
        # The parked stream loses its slot after SEND_TIMEOUT_S without progress; everyone waiting gets a turn.
        other = post(port, "/v1/chat/completions", SMALL, timeout=60)
        assert other["choices"][0]["message"]["role"] == "assistant"
        assert time.monotonic() - started < 60
        for w in waiters:  # every waiter was answered, once it had the model: in plain words
            answer = read_answer(w, 60)
            assert answer.startswith(b"HTTP/1.1 400") and b"backend_not_prepared" in answer, answer
        # The parked connection was closed by the server: reading it now ends (EOF) without the stream's [DONE].
        parked.settimeout(30)
        received = b""
        while chunk := parked.recv(65536):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in received
        wait_until(lambda: not current._lock.locked(), 30, "the model slot stayed held")
    finally:
        parked.close()
        for w in waiters:
            w.close()
