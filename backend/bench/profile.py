"""Where an ONNX export's decode step goes, from onnxruntime's own profiler.

    python -m backend profile --onnx DIR [--prompt-tokens 128] [--new-tokens 64] [--threads 2]

One prompt, then greedy decode steps one token at a time through Fornax's ONNX runner with ORT's profiler on.
The steps after the first few are split into: the 4-bit matmuls (MatMulNBits), the Q4_1 side products (the
Reshape / ReduceSum / MatMul / Add each such matmul carries for its block minima: export/gguf_blocks.py),
attention, the other operators, ORT's time between operators (its run time less its kernels'), and Python (the
step's wall time less ORT's run time: binding, sampling-free argmax, the loop).
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..errors import FornaxError
from ..formats.tokenizer import Tokenizer
from ..runners.onnx import MODEL_FILE, OnnxRunner, read_onnx_config
from .common import bench_text

ATTENTION_OPS = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "RotaryEmbedding", "Softmax"}
PARTS = ("4-bit matmuls", "Q4_1 side products", "attention", "other operators", "ORT between operators", "Python")
SKIP_STEPS = 3  # the first decode steps warm ORT's arenas: not counted


def profile_decode(folder: str | Path, prompt_tokens: int = 128, new_tokens: int = 64, threads: int = 2) -> dict:
    """{part: milliseconds per decode step} for the export in `folder`, plus "step_ms" (wall) and "steps"."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).exists():
        raise FornaxError(f"--onnx {folder}: no {MODEL_FILE} there (make one with python -m export)")
    if new_tokens <= SKIP_STEPS:
        raise FornaxError(f"--new-tokens must be more than {SKIP_STEPS} (the first steps are not counted)")
    torch.set_num_threads(threads)
    config = read_onnx_config(folder)
    ids = Tokenizer.from_folder(folder).encode(bench_text(), add_special_tokens=False)[:prompt_tokens]
    plain = decode_walls(OnnxRunner(folder / MODEL_FILE, config, threads), ids, new_tokens)
    with tempfile.TemporaryDirectory() as work:
        runner = OnnxRunner(folder / MODEL_FILE, config, threads, profile=str(Path(work) / "ort"))
        walls = decode_walls(runner, ids, new_tokens)
        trace = json.loads(Path(runner.session.end_profiling()).read_text())
    result = split(trace, walls[SKIP_STEPS:], skip_runs=1 + SKIP_STEPS)
    # the profiler's own cost (a timestamp pair per operator) inflates the graph's many small operators most
    result["unprofiled_step_ms"] = float(np.mean(plain[SKIP_STEPS:])) / 1e3
    return result


def decode_walls(runner: OnnxRunner, ids: list[int], new_tokens: int) -> list[float]:
    """The prompt, then `new_tokens` greedy steps; each step's wall time in microseconds (the trace's unit)."""
    runner.start(1, len(ids) + new_tokens)
    logits = runner.forward(torch.tensor([ids]), 0)
    walls = []
    for pos in range(len(ids), len(ids) + new_tokens):
        t = time.perf_counter_ns()
        logits = runner.forward(logits.argmax(-1, keepdim=True), pos)
        walls.append((time.perf_counter_ns() - t) / 1e3)
    runner.free()
    return walls


def split(trace: list[dict], walls_us: list[float], skip_runs: int) -> dict:
    """The profile's decode steps (every model_run after the first `skip_runs`) split into PARTS, in ms per step."""
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip_runs:]
    if not runs or len(runs) != len(walls_us):
        raise FornaxError(f"the profile holds {len(runs)} decode runs for {len(walls_us)} timed steps")
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    nbits_tags = {e["name"].rsplit("/", 1)[0] for e in nodes if e.get("args", {}).get("op_name") == "MatMulNBits"}
    parts = defaultdict(float)
    for e in nodes:
        if not any(a <= e["ts"] <= b for a, b in windows):
            continue
        op, tag = e.get("args", {}).get("op_name", ""), e["name"].rsplit("/", 1)[0]
        if op == "MatMulNBits":
            part = "4-bit matmuls"
        elif "/" in e["name"] and tag in nbits_tags:
            part = "Q4_1 side products"
        elif op in ATTENTION_OPS:
            part = "attention"
        else:
            part = "other operators"
        parts[part] += e["dur"]
    ort_us = sum(r["dur"] for r in runs)
    parts["ORT between operators"] = max(ort_us - sum(parts.values()), 0.0)
    parts["Python"] = max(sum(walls_us) - ort_us, 0.0)
    n = len(runs)
    result = {p: parts[p] / n / 1e3 for p in PARTS}
    result.update(step_ms=float(np.mean(walls_us)) / 1e3, steps=n)
    return result


def print_split(result: dict, label: str = "") -> None:
    step, plain = result["step_ms"], result.get("unprofiled_step_ms")
    print(f"decode step {step:.2f} ms profiled ({1e3 / step:.1f} tok/s) over {result['steps']} steps"
          + (f", {plain:.2f} ms ({1e3 / plain:.1f} tok/s) without the profiler" if plain else "")
          + (f" · {label}" if label else ""))
    for p in PARTS:
        print(f"  {p:<24} {result[p]:7.2f} ms  {100 * result[p] / step:5.1f} %")
