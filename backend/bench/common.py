"""What the benchmarks share: the text they feed, the machine's read bandwidth, peak memory, CSV rows, and running
one measurement in a child process (each engine gets its own process, so each gets a clean peak-RSS figure)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def bench_text() -> str:
    """Real English prose: the shared corpus when it is beside the repo, else the Python docs shipped with Python."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / "prideprejudice.txt"
    if shared.exists():
        return shared.read_text(encoding="utf-8")[20000:80000]
    from pydoc_data.topics import topics

    return "\n".join(topics.values())[:60000]


def memory_read_gb_s(threads: int) -> float:
    """Streaming read bandwidth with `threads` threads: the ceiling for bandwidth-bound decoding."""
    torch.set_num_threads(threads)
    x = torch.ones(256 * 1024 * 1024 // 4)  # 256 MB, far beyond any cache
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    return 5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the
    parent, so a child spawned by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_csv(path: str, header: list[str], rows: list[list]) -> None:
    """Append benchmark rows to a CSV file (header first if the file is new), so runs accumulate over time."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerows(rows)


def run_child(function: str, args: list, threads: int) -> dict | None:
    """Call `module:function(*args)` in a fresh Python process; it returns a JSON-able dict. None if it failed."""
    module, name = function.split(":")
    code = (f"import json, sys; from {module} import {name}; "
            f"print(json.dumps({name}(*json.loads(sys.argv[1]))))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        print(f"{function}{tuple(args)} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])
