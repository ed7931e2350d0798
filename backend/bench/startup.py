"""Cold start of the playground, as a newcomer meets it: `python -m playground` in a fresh process with an empty
cache (so the default model's first GGUF conversion is included), timed until the page answers and until a first
completion comes back. `python -m backend bench-startup [--runs 3] [--warm]` prints each run and the median; the
playground is started as a subprocess (the backend does not import it).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_page(url: str, app: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise RuntimeError(f"the playground exited with code {app.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"no page at {url} after {timeout_s:.0f} s")


def _first_completion(base: str) -> str:
    body = json.dumps({"model": "default", "prompt": "The capital of France is", "max_tokens": 4,
                       "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["text"]


def one_start(cache: str, prepare: str = "fast", timeout_s: float = 180.0) -> dict:
    """Start the playground on the default model with `cache` as its cache; seconds to the page and to an answer."""
    port = _free_port()
    env = {**os.environ, "FORNAX_CACHE": cache, "FORNAX_PREPARE": prepare, "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()[0]  # another process busy on the cores shows here, not in our timings
    t0 = time.perf_counter()
    app = subprocess.Popen([sys.executable, "-m", "playground", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_page(base + "/", app, timeout_s)
        page_s = time.perf_counter() - t0
        text = _first_completion(base)
        return dict(page_s=page_s, answer_s=time.perf_counter() - t0, text=text, load_avg=load_before)
    finally:
        app.terminate()
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            app.kill()


def run_bench_startup(runs: int = 3, warm: bool = False, prepare: str = "fast") -> list[dict]:
    """`runs` cold starts (a new empty cache each; `warm`: one cache kept across runs after a first start)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fornax-startup-") as tmp:
        if warm:
            one_start(str(Path(tmp) / "cache"), prepare)
        for i in range(runs):
            cache = str(Path(tmp) / ("cache" if warm else f"cache{i}"))
            row = one_start(cache, prepare)
            rows.append(row)
            print(f"run {i + 1}: page {row['page_s']:.1f} s · first answer {row['answer_s']:.1f} s "
                  f"({row['text']!r}; load average {row['load_avg']:.1f} on {os.cpu_count()} cores before it)",
                  flush=True)
    page = statistics.median(r["page_s"] for r in rows)
    answer = statistics.median(r["answer_s"] for r in rows)
    print(f"{'warm' if warm else 'cold'} start, median of {runs}: page {page:.1f} s · first answer {answer:.1f} s")
    busiest = max(r["load_avg"] for r in rows)
    if busiest > 0.5 * (os.cpu_count() or 1):
        print(f"(the machine was busy: a load average up to {busiest:.1f} on {os.cpu_count()} cores; rerun when quiet)")
    return rows
