"""Generation benchmark: every execution path of ours against transformers' eager generate, same weights, one run.

    python -m backend bench [--model default] [--backends eager,compiled,onnx] [--onnx DIR] [--prompt-tokens 128]
                            [--new-tokens 128] [--threads 2] [--csv F]

Greedy, fixed prompt length, EOS ignored so every run decodes the same number of tokens. Each engine runs in its own
process (clean peak RSS). Prints prefill and decode tok/s, weight bandwidth achieved (weight bytes x decode
steps/s) against the machine's read bandwidth, compile time, and the ratios; appends tidy CSV rows.
ONNX Runtime fp32 is the export of the model found in the export cache (`python -m export --model M` makes it; or
`--onnx DIR`): the backend reads export folders but never imports the exporter.
"""
from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .common import append_csv, bench_text, memory_read_gb_s, peak_rss_mb, run_child
from ..disk.caches import cache_root
from ..loading import load, resolve

REPEATS = 3


def bench_ours(handle, backend: str, ids: list[int], new_tokens: int) -> dict:
    """Our engine on one of the handle's execution paths. The warm-up also compiles (timed as compile_s)."""
    t = time.perf_counter()
    handle.generate(ids, backend=backend, max_new_tokens=8, temperature=0, ignore_eos=True)
    warmup_s = time.perf_counter() - t
    runs = [handle.generate(ids, backend=backend, max_new_tokens=new_tokens, temperature=0, ignore_eos=True).timings
            for _ in range(REPEATS)]
    runner = handle.runner(backend)
    return dict(prefill_tok_s=statistics.median(t.prefill_tok_s for t in runs),
                decode_tok_s=statistics.median(t.decode_tok_s for t in runs),
                weight_bytes=runs[0].weight_bytes, compile_s=getattr(runner, "compile_s", 0.0) or 0.0,
                warmup_s=warmup_s)


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
                weight_bytes=weight_bytes, compile_s=0.0)


def measure(engine: str, backend: str, source: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """One engine on one model source, in this (child) process: tok/s, bandwidth and peak RSS."""
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
        result = bench_ours(handle, backend, ids, new_tokens)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def cached_onnx_fp32(source: str) -> Path | None:
    """The newest fp32 export of `source` in the export cache (written by export/cache.py), if any."""
    found = []
    for meta in (cache_root() / "exports").glob("*-none/fornax.json"):
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if info.get("source") == source and (meta.parent / "model.onnx").exists():
            found.append((meta.stat().st_mtime, meta.parent))
    return max(found)[1] if found else None


def default_rows(model: str, backends: list[str], onnx: str | None, skip_transformers: bool) -> list[tuple]:
    rows = [] if skip_transformers else [("transformers eager", "transformers", "", model)]
    for name in backends:
        if name == "onnx":
            folder = onnx or cached_onnx_fp32(model)
            if folder is None:
                print(f"onnx: no fp32 export of {model!r} in the export cache; run `python -m export --model {model} "
                      f"--out DIR` and pass --onnx DIR (or `python -m export bench`)", file=sys.stderr)
                continue
            rows.append(("onnx fp32", "fornax", "onnx", str(folder)))
        else:
            rows.append((f"fornax {name}", "fornax", name, model))
    return rows


def run_bench(rows: list[tuple[str, str, str, str]] | None = None, model: str = "default", prompt_tokens: int = 128,
              new_tokens: int = 128, threads: int = 2, csv_path: str | None = None, skip_transformers: bool = False,
              backends: list[str] | None = None, onnx: str | None = None) -> dict:
    """Time each (label, engine, backend, source) row in its own process. engine "fornax" runs `load(source)` on
    `backend` (an export folder runs on "onnx"); "transformers" runs transformers' generate on the same weights."""
    rows = rows or default_rows(model, backends or ["eager", "compiled", "onnx"], onnx, skip_transformers)
    floor = memory_read_gb_s(threads)
    print(f"{prompt_tokens}-token prompt · {new_tokens} new tokens · greedy · {threads} threads · "
          f"memory read {floor:.1f} GB/s (each engine in its own process)", file=sys.stderr)
    results = {}
    for label, engine, backend, source in rows:
        r = run_child("backend.bench.speed:measure", [engine, backend, source, prompt_tokens, new_tokens, threads],
                      threads)
        if r is not None:
            results[label] = r
            print(f"  {label}: decode {r['decode_tok_s']:.1f} tok/s", file=sys.stderr)

    print(f"{'engine':20s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'GB/s':>6s} {'% of read':>9s} "
          f"{'compile s':>9s} {'peak RSS MB':>12s}")
    for name, r in results.items():
        r["bandwidth_gb_s"] = r["weight_bytes"] * r["decode_tok_s"] / 1e9
        print(f"{name:20s} {r['prefill_tok_s']:14.0f} {r['decode_tok_s']:13.1f} {r['bandwidth_gb_s']:6.1f} "
              f"{100 * r['bandwidth_gb_s'] / floor:8.0f}% {r['compile_s']:9.1f} {r['peak_rss_mb']:12.0f}")
    for base_name in ("transformers eager", "onnx fp32"):
        base = results.get(base_name)
        for name, r in results.items():
            if base and name != base_name:
                print(f"{name} / {base_name}: prefill {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x, "
                      f"decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x")
    if csv_path:
        append_csv(csv_path, ["date", "model", "engine", "metric", "value", "threads", "prompt_tokens", "new_tokens",
                              "torch"],
                   [[datetime.date.today(), model, name, metric, round(r[metric], 2), threads, prompt_tokens,
                     new_tokens, torch.__version__]
                    for name, r in results.items()
                    for metric in ("prefill_tok_s", "decode_tok_s", "bandwidth_gb_s", "compile_s", "peak_rss_mb")])
    return results
