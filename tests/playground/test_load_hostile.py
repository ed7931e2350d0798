"""Load with hostile visitors, on a public deployment (FORNAX_PUBLIC=1): 16 gradio_client clients × 10 generations
while four hostile clients attack at the same time — a streaming OpenAI client that never reads, a chat-template
bomb, an oversized evaluation, and a file input naming a URL. The 16 get no error and exactly the answers their
seeds give alone (no cross-talk); each attack gets its plain refusal; the URL is never fetched; and the server
process's peak RSS stays within HOSTILE_RSS_BOUND of where it started. Latency p50/p99 is printed (a figure, not an
assertion)."""
from __future__ import annotations

import json
import statistics
import threading
import time

import pytest

from playground import build_app, current
from playground.openai_api import server
from tests.backend.bad_files import peak_rss_bytes, peak_rss_reset
from tests.backend.test_evaluate_caps import labelled_csv
from tests.backend.tiny import make_tiny
from tests.playground.serve import PANEL, backend_kwargs
from tests.playground.test_many_clients import CALLS, CLIENTS, one_thread, request  # noqa: F401 (a fixture)
from tests.playground.test_network_edge import big_file_server
from tests.playground.test_openai_backpressure import raw_request, small_buffer_server

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

ATTACKS = 3                      # each hostile client attacks this many times while the load runs
HOSTILE_RSS_BOUND = 400 * 1024**2  # the server's peak RSS growth under load and attack (the 16 alone: ~100 MB)
# ChatML, except that a message saying BOMB runs 10^10 loop iterations (the 2 s public template deadline stops it)
TEMPLATE = ("{% for m in messages %}{% if m['content'] == 'BOMB' %}{% for i in range(100000) %}"
            "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")
PARKED = dict(model="x", messages=[{"role": "user", "content": "Hi"}], stream=True, n=4, max_tokens=110, seed=2,
              temperature=1.0)


def expected_answers(handle) -> dict:
    expected = {}
    for c in range(CLIENTS):
        for i in range(CALLS):
            kw = request(c, i)
            texts = handle.generate(kw["prompt"], **backend_kwargs(**{k: v for k, v in kw.items()
                                                                       if k != "prompt"})).texts
            expected[c, i] = texts[0] if len(texts) == 1 else "\n\n".join(
                f"── sample {n} ──\n{t}" for n, t in enumerate(texts, 1))
    return expected


class Hostile:
    """The four attacks, each run ATTACKS times on its own thread; `outcomes` keeps what each attack got back."""

    def __init__(self, url: str, port: int, tmp_path, big_url: str):
        self.url, self.port, self.big_url = url, port, big_url
        self.csv = labelled_csv(tmp_path / "many-labels.csv", 200, 30, 400)  # ~80 KB, 30 labels: over the caps
        self.outcomes: dict[str, list[str]] = {"stream": [], "bomb": [], "evaluate": [], "url": []}
        self.load_done = threading.Event()  # set when the 16 clients are done

    def refused(self, name: str, call) -> None:
        try:
            call()
            self.outcomes[name].append("answered")
        except AppError as e:
            self.outcomes[name].append(str(e))

    def non_reading_stream(self):
        """Parked streams that read nothing until the load is over: by then the server must have dropped each."""
        parked = []
        for _ in range(ATTACKS):
            parked.append(raw_request(self.port, "/v1/chat/completions", PARKED, rcvbuf=1024))
            time.sleep(1)
        self.load_done.wait(timeout=600)
        for s in parked:
            s.settimeout(30)
            received = b""
            try:
                while chunk := s.recv(65536):
                    received += chunk
            except OSError:
                pass
            s.close()
            self.outcomes["stream"].append("closed without [DONE]" if b"[DONE]" not in received else "finished")

    def template_bomb(self):
        client = gradio_client.Client(self.url, verbose=False)
        for _ in range(ATTACKS):
            self.refused("bomb", lambda: client.predict(message="BOMB", history=[], system_prompt="", **PANEL,
                                                        api_name="/chat"))

    def oversized_evaluation(self):
        client = gradio_client.Client(self.url, verbose=False)
        for _ in range(ATTACKS):
            self.refused("evaluate", lambda: client.predict(
                upload=gradio_client.handle_file(str(self.csv)), sample=None, metrics=["accuracy"],
                runner_name="eager", against="", max_length=64, stride=32, max_new_tokens=8, temperature=0.0,
                api_name="/evaluate"))

    def url_file(self):
        client = gradio_client.Client(self.url, verbose=False)
        for _ in range(ATTACKS):
            self.refused("url", lambda: client.predict(gradio_client.handle_file(self.big_url), "auto",
                                                       api_name="/load_upload"))

    def threads(self) -> list[threading.Thread]:
        return [threading.Thread(target=f, daemon=True) for f in
                (self.non_reading_stream, self.template_bomb, self.oversized_evaluation, self.url_file)]


def test_16_clients_x_10_generations_beside_4_hostile_clients(tmp_path, monkeypatch, one_thread):
    import httpx
    from gradio import processing_utils

    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FORNAX_STREAM_SEND_TIMEOUT_S", "1")
    monkeypatch.setattr(processing_utils, "async_transport", httpx.AsyncHTTPTransport())  # as for a public host
    folder = tmp_path / "tiny"
    make_tiny("llama", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    model_config = json.loads((folder / "config.json").read_text())  # no EOS: every run is as long as it asks
    (folder / "config.json").write_text(json.dumps({**model_config, "eos_token_id": None}))
    handle = current.load(str(folder))
    expected = expected_answers(handle)
    assert len(set(expected.values())) > CLIENTS  # the answers differ, so a swapped one would be noticed

    answers, latencies, errors = {}, [], []
    with big_file_server() as (big_url, served), small_buffer_server(server(build_app())) as port:
        url = f"http://127.0.0.1:{port}/"
        clients = [gradio_client.Client(url, verbose=False) for _ in range(CLIENTS)]
        hostile = Hostile(url, port, tmp_path, big_url)
        start = threading.Barrier(CLIENTS + 1)

        def drive(c: int):
            start.wait()
            for i in range(CALLS):
                t0 = time.perf_counter()
                try:
                    text, _, _ = clients[c].predict(**request(c, i), api_name="/complete")
                except Exception as e:  # every error is a failure, reported below with its call
                    errors.append((c, i, repr(e)))
                    continue
                latencies.append(time.perf_counter() - t0)
                answers[c, i] = text

        measured = peak_rss_reset()
        rss_before = peak_rss_bytes()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=drive, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        attackers = hostile.threads()
        start.wait()
        for t in attackers:
            t.start()
        for t in threads:
            t.join(timeout=600)
        hostile.load_done.set()
        for t in attackers:
            t.join(timeout=120)
        wall = time.perf_counter() - t0
        grew = peak_rss_bytes() - rss_before
        hits = served.hits

    assert not errors, errors[:5]
    wrong = [(key, answers.get(key), expected[key]) for key in expected if answers.get(key) != expected[key]]
    assert not wrong, wrong[:3]
    out = hostile.outcomes
    assert out["stream"] == ["closed without [DONE]"] * ATTACKS, out["stream"]
    assert all("chat template ran longer than" in m for m in out["bomb"]) and len(out["bomb"]) == ATTACKS, out["bomb"]
    assert all("the number of labels is 30" in m for m in out["evaluate"]) and len(out["evaluate"]) == ATTACKS, \
        out["evaluate"]
    assert len(out["url"]) == ATTACKS and all("answered" != m and "Traceback" not in m for m in out["url"]), out["url"]
    assert hits == 0  # the URL was never fetched
    if measured:
        assert grew < HOSTILE_RSS_BOUND, f"the server's peak RSS grew by {grew / 1e6:.0f} MB"
    q = statistics.quantiles(latencies, n=100)
    print(f"\n{CLIENTS} clients x {CALLS} generations beside 4 hostile clients: {len(latencies)} ok, 0 errors, "
          f"wall {wall:.1f} s, latency p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms; "
          f"peak RSS growth {grew / 1e6:.0f} MB")
