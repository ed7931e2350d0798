"""The Kernel lab tab: one Triton kernel checked against its PyTorch reference (kernels/check.py) at a shape and
dtype the visitor picks — the max error of the forward and of each gradient — and, on a GPU, its speed beside eager
PyTorch and torch.compile. Without a GPU it shows the last committed GPU benchmark (docs/kernels-bench.csv), if any.

On a CPU the check runs in Triton's interpreter, which needs TRITON_INTERPRET=1 before triton is imported: so it
runs in a subprocess (`python -m kernels.check`) and this process never imports `kernels` or sees the variable.
Shapes are capped (backend/limits.py: kernel_lab_cpu_elements / kernel_lab_gpu_elements, tight in public mode).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from backend import budget, limits

from .. import deployment
from ..errors import refusal, user_errors

ROOT = Path(__file__).resolve().parents[2]
BENCH_CSV = ROOT / "docs" / "kernels-bench.csv"
DTYPES = ["float32", "bfloat16"]
# Op -> (what the shape's numbers mean, small presets): the same as kernels.check.CASES (a test holds them equal;
# this module may not import `kernels` on a CPU, see above).
OPS = {
    "rms_norm": ("..., D", ["4, 64", "2, 8, 128", "16, 256"]),
    "layer_norm": ("..., D", ["4, 64", "2, 8, 128", "16, 256"]),
    "rotary": ("B, H, Hk, T, D", ["1, 4, 2, 16, 32", "2, 4, 4, 8, 64", "1, 8, 2, 32, 64"]),
    "swiglu": ("..., D", ["4, 64", "2, 8, 128", "16, 512"]),
    "gelu_tanh": ("..., D", ["4, 64", "2, 8, 128", "16, 512"]),
    "attention": ("B, H, Hk, T, D", ["1, 2, 1, 16, 32", "1, 4, 2, 32, 64", "2, 4, 4, 24, 32"]),
    "decode_attention": ("B, H, Hk, S, D", ["1, 4, 2, 64, 32", "2, 8, 2, 128, 64", "4, 4, 4, 48, 32"]),
    "cross_entropy": ("N, V", ["8, 301", "16, 1024", "4, 2500"]),
    "linear_cross_entropy": ("N, C, V", ["8, 32, 301", "16, 64, 512", "32, 64, 1000"]),
}
MAX_SHAPE_CHARS = 64
CHECK_TIMEOUT_S = 300               # the interpreter subprocess; public mode: the event time limit, if shorter
TABLE_HEADERS = ["tensor", "max |error|", "max |reference|", "relative error", "within tolerance"]


def on_gpu() -> bool:
    """Check in-process on the GPU (compiled kernels) unless this process itself is in Triton's interpreter."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def element_cap() -> int:
    caps = limits.current()
    return caps.kernel_lab_gpu_elements if on_gpu() else caps.kernel_lab_cpu_elements


def parse_shape(text: str) -> tuple[int, ...]:
    """"2, 8, 128" (commas, spaces or x between sizes) -> (2, 8, 128); every size capped before any arithmetic."""
    text = (text or "").strip()
    if not text or len(text) > MAX_SHAPE_CHARS or not re.fullmatch(r"[\d\s,x×()]+", text):
        raise refusal(f"type a shape as sizes separated by commas, like 2, 8, 128 (at most {MAX_SHAPE_CHARS} "
                      "characters)")
    sizes = re.findall(r"\d+", text)
    cap = element_cap()
    if not 1 <= len(sizes) <= 5 or any(len(s) > 12 or int(s) > cap or int(s) < 1 for s in sizes):
        raise refusal(f"a shape has 1 to 5 sizes, each from 1 to {cap:,}; got {text!r}")
    return tuple(int(s) for s in sizes)


# What a check holds per element of its largest tensor: the input, its fp32 reference copy, both outputs, the
# upstream gradient and both gradients, and the reference's softmax / logits intermediates beside them.
CHECK_COPIES = 8


def largest_intermediate(op: str, sizes: tuple[int, ...]) -> tuple[int, str]:
    """(elements, what) of the largest tensor a check of `op` at `sizes` materialises beyond its inputs, or (0, "")
    where none outgrows them (the input cap, checked by kernels.check, bounds those). Attention's reference builds
    B×H×T×T scores, the fused linear cross-entropy's reference N×V logits: quadratic in sizes the per-dimension
    cap lets through. A shape of the wrong rank counts 0 here: the subprocess refuses it."""
    if op == "attention" and len(sizes) == 5:
        B, H, _, T, _ = sizes
        return B * H * T * T, "its B×H×T×T attention scores"
    if op == "linear_cross_entropy" and len(sizes) == 3:
        N, _, V = sizes
        return N * V, "its N×V logits"
    if op == "decode_attention" and len(sizes) == 5:
        B, H, _, S, _ = sizes
        return B * H * S, "its B×H×S attention scores"
    return 0, ""


def check_work(op: str, sizes: tuple[int, ...], cap: int) -> None:
    """Refuse a check whose largest intermediate passes the elements cap (which bounds the interpreter's time as
    well as its memory) or whose estimated memory passes the budget — before any process starts or tensor exists."""
    elements, what = largest_intermediate(op, sizes)
    shape = ", ".join(map(str, sizes))
    if elements > cap:
        raise refusal(f"{op} at ({shape}) works on {elements:,} elements ({what}); the cap here is {cap:,}: "
                      f"try smaller sizes")
    need = CHECK_COPIES * 4 * elements
    if need:
        budget.check_memory(need, f"checking {op} at ({shape})", {what.removeprefix("its "): need})


def _check_in_subprocess(op: str, shape: tuple[int, ...], dtype: str, cap: int) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    timeout = CHECK_TIMEOUT_S
    if deployment.public() and limits.current().event_time_limit_s > 0:
        timeout = min(timeout, limits.current().event_time_limit_s)
    try:
        done = subprocess.run([sys.executable, "-m", "kernels.check", op, ",".join(map(str, shape)), "--dtype", dtype,
                               "--max-elements", str(cap)], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise refusal(f"the check took over {timeout:.0f} s in Triton's interpreter; try a smaller shape") from None
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"kernels.check exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise refusal(out["error"])
    return out


def error_table(results: dict) -> pd.DataFrame:
    rows = [[name, f"{r['max_abs_error']:.3g}", f"{r['max_abs_reference']:.3g}", f"{r['relative_error']:.3g}",
             "yes" if r["within_tolerance"] else "NO"] for name, r in results.items()]
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


@user_errors
def run_check(op: str, shape: str, dtype: str, progress=gr.Progress()):
    """Check `op` at `shape` and `dtype` against its PyTorch reference: a summary, the error table, and on a GPU
    the speed plot (eager / torch.compile / Triton)."""
    if op not in OPS:
        raise refusal(f"pick an op: {', '.join(OPS)}")
    if dtype not in DTYPES:
        raise refusal(f"pick a dtype: {', '.join(DTYPES)}")
    sizes, cap = parse_shape(shape), element_cap()
    check_work(op, sizes, cap)
    t0 = time.perf_counter()
    speed = None
    if on_gpu():
        import kernels.check  # a GPU process: the compiled kernels, in-process

        progress(0.1, desc="checking on the GPU")
        try:
            results = kernels.check.check(op, sizes, dtype, device="cuda", max_elements=cap)
            progress(0.5, desc="timing eager, torch.compile and Triton")
            speed = pd.DataFrame(kernels.check.speed(op, sizes, dtype, max_elements=cap))
        except ValueError as e:
            raise refusal(str(e)) from None
        where = f"on {torch.cuda.get_device_name()} (compiled Triton)"
    else:
        progress(0.1, desc="checking in Triton's interpreter (CPU, slow)")
        results = _check_in_subprocess(op, sizes, dtype, cap)["results"]
        where = "on the CPU in Triton's interpreter"
    bad = [name for name, r in results.items() if not r["within_tolerance"]]
    summary = (f"**{op}** at ({', '.join(map(str, sizes))}) in {dtype}, checked {where} in "
               f"{time.perf_counter() - t0:.1f} s: " +
               (f"**{', '.join(bad)} outside the tolerance**" if bad else "every output and gradient agrees with "
                "the PyTorch reference (relative error = max |error| / max |reference|)."))
    return summary, error_table(results), gr.update(value=speed, visible=speed is not None)


def bench_frames(op: str) -> tuple[str, pd.DataFrame | None, pd.DataFrame | None]:
    """From the committed GPU benchmark: a note, median ms by size and provider, and the speed-up over eager at
    the largest size measured, for `op` (ms rows of the `full` mode, or `forward` for inference-only ops)."""
    if not BENCH_CSV.is_file():
        return ("No GPU benchmark has been committed yet (`docs/kernels-bench.csv` does not exist), so there are no "
                "GPU speed figures to show. On a CUDA machine, `OUT=dir bash kernels/gpu_check.sh` writes one "
                "(`dir/kernels_bench.csv`)."), None, None
    frame = pd.read_csv(BENCH_CSV)
    rows = frame[(frame["op"] == op) & (frame["metric"] == "ms")]
    if rows.empty:
        return f"`{BENCH_CSV.name}` has no rows for {op}.", None, None
    mode = "full" if (rows["mode"] == "full").any() else "forward"
    rows = rows[rows["mode"] == mode].astype({"x": "int64", "p50": "float64"})
    largest = rows[rows["x"] == rows["x"].max()].set_index("provider")["p50"]
    speedup = None
    if "eager" in largest:
        speedup = pd.DataFrame({"provider": largest.index, "speed-up over eager": largest["eager"] / largest.values})
    first = rows.iloc[0]
    note = (f"The last committed GPU benchmark ({first['device']}, torch {first['torch']}, triton {first['triton']}): "
            f"{op}, {'forward + backward' if mode == 'full' else 'forward'}, median ms by size; speed-up over eager "
            f"at size {int(rows['x'].max())}.")
    return note, rows[["x", "p50", "provider"]].rename(columns={"p50": "ms"}), speedup


def _bars_update(bars: pd.DataFrame | None) -> dict:
    """Bars from zero (the plot would start its axis at the smallest bar, hiding eager's 1.0)."""
    if bars is None:
        return gr.update(value=None, visible=False)
    return gr.update(value=bars, visible=True, y_lim=[0, 1.1 * float(bars["speed-up over eager"].max())])


def show_bench(op: str):
    note, lines, bars = bench_frames(op if op in OPS else "rms_norm")
    return note, gr.update(value=lines, visible=lines is not None), _bars_update(bars)


def presets(op: str):
    dims, shapes = OPS.get(op, OPS["rms_norm"])
    return gr.update(choices=shapes, value=shapes[0], label=f"Shape ({dims}); or type one")


def build() -> None:
    """The tab's components and events (no model involved: its own queue, one check at a time)."""
    gr.Markdown("Check one of Fornax's **Triton kernels** against a plain PyTorch reference: random inputs of the "
                "shape you pick, the same upstream gradient for both, and the largest difference of the output and of "
                "every gradient. " + ("On this GPU the compiled kernels run, and are timed beside eager PyTorch and "
                                      "torch.compile." if on_gpu() else "There is no GPU here: the kernels run in "
                                      "Triton's interpreter on the CPU (slow, so shapes are small)."))
    first = next(iter(OPS))
    with gr.Row(equal_height=True):
        op = gr.Dropdown(list(OPS), value=first, label="Op", scale=2, elem_id="fx-lab-op")
        shape = gr.Dropdown(OPS[first][1], value=OPS[first][1][0], allow_custom_value=True, scale=2,
                            label=f"Shape ({OPS[first][0]}); or type one", elem_id="fx-lab-shape")
        dtype = gr.Radio(DTYPES, value="float32", label="dtype", scale=2, elem_id="fx-lab-dtype")
        run = gr.Button("Check", variant="primary", scale=1, elem_id="fx-lab-run")
    summary = gr.Markdown("", elem_id="fx-lab-summary")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="fx-lab-table")
    speed = gr.BarPlot(None, x="provider", y="ms", color="mode", title="Median time on this GPU (ms)",
                       visible=False, elem_id="fx-lab-speed")
    note, lines, bars = bench_frames(first)
    with gr.Group(visible=not on_gpu()):
        bench_note = gr.Markdown(note, elem_id="fx-lab-bench-note")
        bench_lines = gr.LinePlot(lines, x="x", y="ms", color="provider", title="Median ms by size",
                                  x_title="size (kernels/bench.py SWEEPS)",
                                  visible=lines is not None, elem_id="fx-lab-bench-lines")
        bench_bars = gr.BarPlot(bars, x="provider", y="speed-up over eager", title="Speed-up over eager",
                                visible=bars is not None, elem_id="fx-lab-bench-bars",
                                y_lim=None if bars is None else _bars_update(bars)["y_lim"])
    op.change(presets, op, shape, api_visibility="private", queue=False)
    op.change(show_bench, op, [bench_note, bench_lines, bench_bars], api_visibility="private", queue=False)
    run.click(run_check, [op, shape, dtype], [summary, table, speed], api_name="kernel_check",
              concurrency_id="kernel_lab", concurrency_limit=1, **deployment.event_options())
