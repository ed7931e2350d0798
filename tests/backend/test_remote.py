"""The remote handle and runner (backend/remote.py, backend/runners/remote.py): a handle loaded from
`openai+http://HOST:PORT/v1[#model]` against a
real second server process (Fornax's own `python -m playground --api-only`) gives the local handle's greedy tokens;
a dead port, a 500, a malformed stream and a silent server are plain errors; public mode takes allowlisted hosts
only and the key comes from the environment."""
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import backend
from backend.errors import FornaxError, ModelLoadError
from backend.remote import RemoteHandle
from tests.backend.tiny import make_tiny
from tests.playground.serve import api_only_server, free_port

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny("llama", path)
    return path


@pytest.fixture(scope="module")
def fornax_server(folder, tmp_path_factory):
    """Port of `python -m playground --api-only --model <folder> --port <free>` (loopback)."""
    env = {"FORNAX_PREPARE": "none", "GRADIO_ANALYTICS_ENABLED": "False"}
    with api_only_server(folder, tmp_path_factory.mktemp("logs") / "remote-api-only.log", env, 120) as (base, _, _):
        yield int(base.rsplit(":", 1)[1])


@pytest.fixture
def tokenizer_env(folder, monkeypatch):
    monkeypatch.setenv("FORNAX_REMOTE_TOKENIZER", str(folder))
    monkeypatch.setenv("FORNAX_PUBLIC", "0")


def test_remote_greedy_tokens_equal_local(folder, fornax_server, tokenizer_env):
    local = backend.load(folder)
    remote = backend.load(f"openai+http://127.0.0.1:{fornax_server}/v1#tiny-llama")
    assert isinstance(remote, RemoteHandle) and remote.runner_names() == ["remote"]
    for prompt in ("The capital of France is", [{"role": "user", "content": "Hi there"}]):
        want = local.generate(prompt, temperature=0, max_new_tokens=12, ignore_eos=False, top_logprobs=2)
        stream = remote.stream(prompt, temperature=0, max_new_tokens=12, top_logprobs=2)
        streamed = "".join(d.text for d in stream)
        got = stream.result
        assert got.completions[0].token_ids == want.completions[0].token_ids
        assert streamed == got.text == want.text
        for ours, theirs in zip(got.completions[0].tokens, want.completions[0].tokens):
            assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
            assert [s for _, s, _ in ours.top] == [s for _, s, _ in theirs.top]
        assert got.completions[0].finish_reason == want.completions[0].finish_reason
    with pytest.raises(FornaxError, match="no logits"):
        remote.logits(None)


def test_remote_sampling_with_seed_and_samples_matches(folder, fornax_server, tokenizer_env):
    local = backend.load(folder)
    remote = backend.load(f"openai+http://127.0.0.1:{fornax_server}/v1")  # the server's first model
    kw = dict(temperature=0.9, top_k=20, max_new_tokens=8, seed=7, num_samples=2)
    assert remote.generate("Once upon a time", **kw).texts == local.generate("Once upon a time", **kw).texts


def test_dead_port_is_a_plain_error(tokenizer_env):
    port = free_port()  # nothing listens there
    with pytest.raises(ModelLoadError, match="refused the connection"):
        backend.load(f"openai+http://127.0.0.1:{port}/v1")



def test_playground_and_its_api_run_on_a_remote_handle(folder, fornax_server, tokenizer_env):
    """The slot holds the remote handle: the Completion tab streams from it, and Fornax's own OpenAI API (a second
    hop: client -> this app -> the remote server) answers with the local model's greedy text."""
    from playground import build_app, current
    from playground.openai_api import server
    from playground.tabs.completion import complete
    from tests.playground.serve import serving_asgi

    local = backend.load(folder)
    want = local.generate("The capital of France is", temperature=0, max_new_tokens=8).text
    previous = current.handle
    try:
        current.load(f"openai+http://127.0.0.1:{fornax_server}/v1#tiny-llama")
        assert current.info()["runners"] == ["remote"]
        *_, (text, token_html, stats) = complete("The capital of France is", "remote", 8, 0.0, 0, 1.0, 0.0, 1.0,
                                                 0.0, 0.0, [], 1, 1)
        assert text == want and "mean log-prob" in token_html  # per-token colours from the server's logprobs
        from playground.tabs.race import race
        *_, last = race("The capital of France is", ["remote"], True, "remote", 8, 0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0,
                        [], 1)
        assert want in [getattr(box, "value", box) for box in last if isinstance(getattr(box, "value", box), str)]
        with serving_asgi(server(build_app())) as url:
            body = json.dumps({"model": "x", "prompt": "The capital of France is", "max_tokens": 8,
                               "temperature": 0}).encode()
            request = urllib.request.Request(url + "v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                assert json.loads(r.read())["choices"][0]["text"] == want
    finally:
        current.handle = previous



def test_evaluate_generation_metrics_on_remote_and_a_plain_perplexity_refusal(folder, fornax_server, tokenizer_env,
                                                                               tmp_path):
    from backend.scoring.run import evaluate_model

    rows = tmp_path / "gen.jsonl"
    rows.write_text(json.dumps({"prompt": "The capital of France is", "reference": "Paris"}) + "\n")
    texts = tmp_path / "text.txt"
    texts.write_text("The capital of France is Paris. " * 4)
    remote = backend.load(f"openai+http://127.0.0.1:{fornax_server}/v1")
    sampling = dict(temperature=0, max_new_tokens=6)
    got = evaluate_model(remote, ["exact_match", "chrf"], rows, sampling=sampling, history=False)
    want = evaluate_model(backend.load(folder), ["exact_match", "chrf"], rows, sampling=sampling, history=False)
    assert got["values"] == want["values"]
    with pytest.raises(FornaxError, match="perplexity and label scores cannot be computed"):
        evaluate_model(remote, ["perplexity"], texts, history=False)


# --- a tiny fake server for failures ---

class Fake(BaseHTTPRequestHandler):
    mode = "ok"
    seen_headers: list = []
    release = threading.Event()

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Fake.seen_headers.append(dict(self.headers))
        self._send(200, json.dumps({"data": [{"id": "fake", "object": "model"}]}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        Fake.seen_headers.append(dict(self.headers))
        if Fake.mode == "500":
            return self._send(500, json.dumps({"error": {"message": "engine crashed"}}).encode())
        if Fake.mode == "silent":
            Fake.release.wait(10)  # until the test is done: the client must give up first
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = {"choices": [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": None}]}
        self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if Fake.mode == "malformed":
            self.wfile.write(b"data: {not json\n\n")
        elif Fake.mode == "bad-logprobs":
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "", "logprobs": {"tokens": ["a"], '
                             b'"token_logprobs": ["x"]}}]}\n\n')
        elif Fake.mode == "bad-index":
            self.wfile.write(b'data: {"choices": [{"index": 7, "text": "x"}]}\n\n')
        elif Fake.mode == "truncated":
            pass  # the connection closes without [DONE]
        else:
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n'
                             b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture
def fake(tokenizer_env):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Fake.mode, Fake.seen_headers = "ok", []
    Fake.release.clear()
    try:
        yield server.server_address[1]
    finally:
        Fake.release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode, message", [("500", "answered 500: engine crashed"),
                                           ("malformed", "malformed stream"),
                                           ("truncated", "ended the stream before"),
                                           ("bad-logprobs", "malformed stream \\(bad logprobs\\)"),
                                           ("bad-index", "malformed stream \\(bad choices\\)")])
def test_server_failures_are_plain_errors(fake, mode, message):
    h = backend.load(f"openai+http://127.0.0.1:{fake}/v1")
    assert h.generate("Hi", max_new_tokens=4).text == "hello"  # the fake works when asked to
    Fake.mode = mode
    with pytest.raises(FornaxError, match=message):
        h.generate("Hi", max_new_tokens=4)
    Fake.mode = "ok"
    assert h.generate("Hi", max_new_tokens=4).text == "hello"  # the handle (and its lock) still works


def test_silent_server_times_out(fake, monkeypatch):
    monkeypatch.setenv("FORNAX_REMOTE_TIMEOUT", "0.5")
    h = backend.load(f"openai+http://127.0.0.1:{fake}/v1")
    Fake.mode = "silent"
    t0 = time.monotonic()
    with pytest.raises(FornaxError, match="did not answer within 0.5 s"):
        h.generate("Hi", max_new_tokens=4)
    assert time.monotonic() - t0 < 10


def test_key_comes_from_the_environment(fake, monkeypatch):
    monkeypatch.setenv("FORNAX_REMOTE_API_KEY", "sk-operator")
    backend.load(f"openai+http://127.0.0.1:{fake}/v1").generate("Hi", max_new_tokens=4)
    assert Fake.seen_headers and all(h.get("Authorization") == "Bearer sk-operator" for h in Fake.seen_headers)
    with pytest.raises(ModelLoadError, match="no user, password"):
        backend.load(f"openai+http://user:key@127.0.0.1:{fake}/v1")


def test_public_mode_takes_allowlisted_hosts_only(fake, monkeypatch):
    from backend import limits

    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.delenv("FORNAX_REMOTE_ALLOWLIST", raising=False)
    assert limits.public_mode()
    Fake.seen_headers = []
    with pytest.raises(ModelLoadError, match="not one of them"):
        backend.load(f"openai+http://127.0.0.1:{fake}/v1")
    assert Fake.seen_headers == []  # refused before any connection
    monkeypatch.setenv("FORNAX_REMOTE_ALLOWLIST", f"127.0.0.1:{fake}")
    assert backend.load(f"openai+http://127.0.0.1:{fake}/v1").generate("Hi", max_new_tokens=4).text == "hello"


def test_playground_public_check_source_allows_allowlisted_remote(fake, monkeypatch):
    from playground import deployment

    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    source = f"openai+http://127.0.0.1:{fake}/v1"
    monkeypatch.delenv("FORNAX_REMOTE_ALLOWLIST", raising=False)
    with pytest.raises(Exception, match="loads only these models"):  # gradio's Error, shown as it is
        deployment.check_source(source)
    monkeypatch.setenv("FORNAX_REMOTE_ALLOWLIST", f"127.0.0.1:{fake}")
    assert deployment.check_source(source) == source


def test_llama_cpp_server_if_installed(tokenizer_env):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is not installed: no llama.cpp server test")
    pytest.skip("llama.cpp's server needs a GGUF model; run by hand: python -m llama_cpp.server --model F.gguf")
