"""Generation benchmark: our eager engine against transformers' eager generate, same weights, same run.

    python -m backend bench [--model default] [--prompt-tokens 128] [--new-tokens 128] [--threads 2] [--csv F]

Greedy, fixed prompt length, EOS ignored so every run decodes the same number of tokens. Prints prefill and
decode tok/s, weight bandwidth achieved (weight bytes x decode steps/s) and the ratios, and appends tidy CSV rows.
"""
from __future__ import annotations

import csv
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .loading import load, resolve

REPEATS = 3


def bench_text() -> str:
    """Real English prose: the shared corpus when it is beside the repo, else the Python docs shipped with Python."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "prideprejudice.txt"
    if shared.exists():
        return shared.read_text(encoding="utf-8")[20000:80000]
    from pydoc_data.topics import topics

    return "\n".join(topics.values())[:60000]


def memory_read_gb_s(threads: int) -> float:
    """Streaming read bandwidth with `threads` threads: the ceiling for bandwidth-bound decoding."""
    x = torch.ones(256 * 1024 * 1024 // 4)  # 256 MB, far beyond any cache
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    return 5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9


def bench_ours(handle, ids: list[int], new_tokens: int) -> dict:
    """Our engine on whatever path the handle runs (eager weights, or ONNX Runtime for an export)."""
    handle.generate(ids[:16], max_new_tokens=8, temperature=0, ignore_eos=True)  # warm-up
    runs = [handle.generate(ids, max_new_tokens=new_tokens, temperature=0, ignore_eos=True).timings
            for _ in range(REPEATS)]
    return dict(prefill_tok_s=statistics.median(t.prefill_tok_s for t in runs),
                decode_tok_s=statistics.median(t.decode_tok_s for t in runs),
                weight_bytes=runs[0].weight_bytes)


def bench_transformers(folder: Path, ids: list[int], new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(x[:, :16], max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
        prefill, decode = [], []
        for _ in range(REPEATS):
            t = time.perf_counter()
            model(x, use_cache=True)
            prefill.append(time.perf_counter() - t)
            t = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, **kwargs)
            first = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            decode.append((new_tokens - 1) / (time.perf_counter() - t - first))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(prefill_tok_s=len(ids) / statistics.median(prefill), decode_tok_s=statistics.median(decode),
                weight_bytes=weight_bytes)


def measure(engine: str, source: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """One engine on one model source, in this process: tok/s, bandwidth and this process's peak RSS."""
    torch.set_num_threads(threads)
    if engine == "transformers":
        tokenizer_handle = load(source)  # only for the tokenizer and the resolved weights folder
        ids = tokenizer_handle.tokenizer.encode(bench_text(), add_special_tokens=False)[:prompt_tokens]
        folder = resolve(source)
        del tokenizer_handle
        result = bench_transformers(folder, ids, new_tokens)
    else:
        handle = load(source, dtype="float32", device="cpu")
        ids = handle.tokenizer.encode(bench_text(), add_special_tokens=False)[:prompt_tokens]
        result = bench_ours(handle, ids, new_tokens)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the
    parent, so a child spawned by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(rows: list[tuple[str, str, str]] | None = None, model: str = "default", prompt_tokens: int = 128,
              new_tokens: int = 128, threads: int = 2, csv_path: str | None = None,
              skip_transformers: bool = False) -> dict:
    """Time each (label, engine, source) row in its own process, so each gets a clean peak-RSS figure.

    engine "fornax" runs whatever `load(source)` gives (eager weights, or ONNX Runtime for an export folder);
    "transformers" runs transformers' generate on the same weights."""
    import json
    import subprocess

    rows = rows or [("fornax eager", "fornax", model)] + ([] if skip_transformers else
                                                          [("transformers eager", "transformers", model)])
    torch.set_num_threads(threads)
    floor = memory_read_gb_s(threads)
    print(f"{prompt_tokens}-token prompt · {new_tokens} new tokens · greedy · {threads} threads · "
          f"memory read {floor:.1f} GB/s (each engine in its own process)", file=sys.stderr)
    results = {}
    for label, engine, source in rows:
        cmd = [sys.executable, "-m", "backend.bench", "--one", engine, source, str(prompt_tokens), str(new_tokens),
               str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{label}: failed\n{done.stderr[-1500:]}", file=sys.stderr)
            continue
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"{'engine':22s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'GB/s':>6s} {'% of read':>9s} "
          f"{'peak RSS MB':>12s}")
    for name, r in results.items():
        r["bandwidth_gb_s"] = r["weight_bytes"] * r["decode_tok_s"] / 1e9
        print(f"{name:22s} {r['prefill_tok_s']:14.0f} {r['decode_tok_s']:13.1f} {r['bandwidth_gb_s']:6.1f} "
              f"{100 * r['bandwidth_gb_s'] / floor:8.0f}% {r['peak_rss_mb']:12.0f}")
    base = results.get("transformers eager")
    if base:
        for name, r in results.items():
            if name != "transformers eager":
                print(f"{name} / transformers: prefill {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x, "
                      f"decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x")
    if csv_path:
        append_csv(csv_path, ["date", "model", "engine", "metric", "value", "threads", "prompt_tokens", "new_tokens",
                              "torch"],
                   [[datetime.date.today(), model, name, metric, round(r[metric], 2), threads, prompt_tokens,
                     new_tokens, torch.__version__]
                    for name, r in results.items()
                    for metric in ("prefill_tok_s", "decode_tok_s", "bandwidth_gb_s", "peak_rss_mb")])
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:  # a child of run_bench: measure one engine, print one JSON line
        import json

        engine, source, p, n, t = sys.argv[2:7]
        print(json.dumps(measure(engine, source, int(p), int(n), int(t))))
    else:
        from .__main__ import main

        sys.exit(main(["bench", *sys.argv[1:]]))


def append_csv(path: str, header: list[str], rows: list[list]) -> None:
    """Append benchmark rows to a CSV file (header first if the file is new), so runs accumulate over time."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerows(rows)
