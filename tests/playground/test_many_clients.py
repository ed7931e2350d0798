"""Load: the playground on loopback with a tiny model, driven by 16 gradio_client clients at once, 10 generations
each. Every call must succeed and give exactly the answer its seed gives when run alone (no cross-talk between
requests sharing the one model slot); p50/p99 latency is printed (a figure, not an assertion)."""
import statistics
import threading
import time

import pytest

from playground import build_app, current
from tests.backend.tiny import make_tiny
from tests.playground.serve import PANEL, backend_kwargs, serving

gradio_client = pytest.importorskip("gradio_client")

CLIENTS, CALLS = 16, 10
PROMPTS = ["The cat", "Once upon a time", "def main():", "Hello"]


def request(c: int, i: int) -> dict:
    """Call i of client c: its own seed, prompt and length, so answers differ and any mix-up shows."""
    return dict(prompt=PROMPTS[(c + i) % len(PROMPTS)], **{**PANEL, "seed": 1000 * c + i, "max_new_tokens": 6 + i % 3,
                                                           "num_samples": 1 + (c % 2)})


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from intra-op threads, and on a shared machine their spin-waits cost seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_16_clients_x_10_generations_no_errors_no_cross_talk(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("FORNAX_PUBLIC", "0")
    make_tiny("llama", tmp_path / "tiny")
    handle = current.load(str(tmp_path / "tiny"))
    expected = {}
    for c in range(CLIENTS):
        for i in range(CALLS):
            kw = request(c, i)
            result = handle.generate(kw["prompt"], **backend_kwargs(**{k: v for k, v in kw.items() if k != "prompt"}))
            texts = result.texts
            expected[c, i] = texts[0] if len(texts) == 1 else "\n\n".join(
                f"── sample {n} ──\n{t}" for n, t in enumerate(texts, 1))
    assert len(set(expected.values())) > CLIENTS  # the answers differ, so a swapped one would be noticed

    answers, latencies, errors = {}, [], []
    with serving(build_app()) as url:
        clients = [gradio_client.Client(url, verbose=False) for _ in range(CLIENTS)]
        start = threading.Barrier(CLIENTS)

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

        t0 = time.perf_counter()
        threads = [threading.Thread(target=drive, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        wall = time.perf_counter() - t0

    assert not errors, errors[:5]
    assert len(answers) == CLIENTS * CALLS
    wrong = [(key, answers[key], expected[key]) for key in expected if answers[key] != expected[key]]
    assert not wrong, wrong[:3]
    q = statistics.quantiles(latencies, n=100)
    print(f"\n{CLIENTS} clients x {CALLS} generations: {len(latencies)} ok, 0 errors, wall {wall:.1f} s, "
          f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")
