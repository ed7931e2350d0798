"""Benchmark every kernel against eager PyTorch and torch.compile on a CUDA GPU.

    python -m kernels.bench [--out DIR] [--ops rms_norm,attention] [--quick] [--budget-s 240]

Per op, a sweep over one size (`x`: the hidden size, sequence length, cache length or vocabulary named in SWEEPS),
per provider (`eager`, `compile`, `triton`; attention adds SDPA's `sdpa_flash`) and mode (`forward`, `backward`,
`full` = forward + backward): time in ms (p20/p50/p80 from triton.testing.do_bench) and peak memory in MB above
the inputs (`full`, or `forward` for inference-only ops). Rows go to DIR/kernels_bench.csv as they are measured
(op, provider, mode, metric, x, p20, p50, p80, device, torch, triton); one plot per op (DIR/<op>.png) when
matplotlib is installed; speed-ups against eager are printed. Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEVICE = "cuda"
ROWS = 8192          # rows (tokens) of the row-wise ops
HEADER = ["op", "provider", "mode", "metric", "x", "p20", "p50", "p80", "device", "torch", "triton"]
BF16 = torch.bfloat16


# ---- eager references (what the model does without kernels) -------------------------------------------------------

def _rotary_eager(q, k, cos, sin):
    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rot(q), rot(k)


def _attention_eager(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _attention_flash(q, k, v):
    g = q.shape[1] // k.shape[1]  # flash needs equal heads: repeat K/V as an eager model would
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)


def _decode_eager(q, k_cache, v_cache, length):
    return F.scaled_dot_product_attention(q, k_cache[:, :, :length], v_cache[:, :, :length], enable_gqa=True)


def _attention_explicit(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    T = q.shape[2]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s.float().softmax(-1).to(q.dtype) @ v


# ---- the sweeps: x values, input builders (tensors needing grad first), and the three providers -------------------

def _specs(quick: bool):
    import kernels

    def t(*shape, grad=True, dtype=BF16):
        return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)

    def tables(T, D):
        ang = torch.randn(T, D // 2, device=DEVICE)
        emb = torch.cat((ang, ang), -1)
        return emb.cos(), emb.sin()

    pick = (lambda xs: xs[::2]) if quick else (lambda xs: xs)
    rows = ROWS
    return {  # the targets first: a time budget cuts the tail
        "rms_norm": dict(x_name="hidden size", xs=pick([1024, 2048, 4096, 8192]),
                         make=lambda n: (t(rows, n), t(n)),
                         eager=lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
                         triton=lambda x, w: kernels.rms_norm(x, w, 1e-6)),
        "rotary": dict(x_name="sequence length", xs=pick([512, 1024, 2048, 4096]),
                       make=lambda T: (t(4, 32, T, 128), t(4, 8, T, 128), *tables(T, 128)),
                       eager=_rotary_eager, triton=kernels.rotary),
        "cross_entropy": dict(x_name="vocabulary", xs=pick([8192, 32768, 49152, 128256]),
                              make=lambda V: (t(rows // 2, V), torch.randint(0, V, (rows // 2,), device=DEVICE)),
                              eager=F.cross_entropy, triton=kernels.cross_entropy),
        "linear_cross_entropy": dict(
            x_name="vocabulary", xs=pick([8192, 32768, 49152]),
            make=lambda V: (t(rows, 576), t(V, 576), torch.randint(0, V, (rows,), device=DEVICE)),
            eager=lambda h, w, y: F.cross_entropy(h @ w.t(), y), triton=kernels.linear_cross_entropy),
        "attention": dict(x_name="sequence length", xs=pick([512, 1024, 2048, 4096]),
                          make=lambda T: (t(4, 16, T, 128), t(4, 4, T, 128), t(4, 4, T, 128)),
                          eager=_attention_eager, compile_fn=_attention_explicit,
                          triton=lambda q, k, v: kernels.attention(q, k, v, causal=True),
                          extra={"sdpa_flash": _attention_flash}),
        "decode_attention": dict(x_name="cache length", xs=pick([1024, 4096, 16384, 32768]), inference=True,
                                 make=lambda S: (t(8, 32, 1, 128, grad=False), t(8, 8, S, 128, grad=False),
                                                 t(8, 8, S, 128, grad=False), S - 1),
                                 eager=_decode_eager, triton=kernels.decode_attention),
        "swiglu": dict(x_name="d_ff", xs=pick([2048, 4096, 8192, 14336]),
                       make=lambda n: (t(rows // 2, n), t(rows // 2, n)),
                       eager=lambda g, u: F.silu(g) * u, triton=kernels.swiglu),
        "gelu_tanh": dict(x_name="d_ff", xs=pick([2048, 4096, 8192, 14336]), make=lambda n: (t(rows // 2, n),),
                          eager=lambda x: F.gelu(x, approximate="tanh"), triton=kernels.gelu_tanh),
        "layer_norm": dict(x_name="hidden size", xs=pick([1024, 2048, 4096, 8192]),
                           make=lambda n: (t(rows, n), t(n), t(n)),
                           eager=lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
                           triton=lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5)),
        "add_rms_norm": dict(x_name="hidden size", xs=pick([1024, 2048, 4096, 8192]),
                             make=lambda n: (t(rows, n), t(rows, n), t(n)),
                             eager=lambda x, r, w: (F.rms_norm(x + r, (x.shape[-1],), w, 1e-6), x + r),
                             triton=lambda x, r, w: kernels.add_rms_norm(x, r, w, 1e-6)),
    }


# ---- measuring ------------------------------------------------------------------------------------------------------

def _loss_of(out):
    outs = out if isinstance(out, tuple) else (out,)
    return sum(o.float().sum() for o in outs)


def _measure(fn, inputs, mode: str, rep: int):
    """(p20, p50, p80) ms of one mode and the peak MB above what was allocated before the run."""
    from triton.testing import do_bench
    leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]

    def clear():
        for a in leaves:
            a.grad = None

    if mode == "forward":
        with torch.no_grad() if not leaves else torch.enable_grad():
            run = lambda: fn(*inputs)  # noqa: E731
            ms = do_bench(run, quantiles=[0.2, 0.5, 0.8], rep=rep)
    elif mode == "backward":
        out = fn(*inputs)
        grads = [torch.ones_like(o) for o in (out if isinstance(out, tuple) else (out,))]
        outs = out if isinstance(out, tuple) else (out,)
        run = lambda: torch.autograd.backward(outs, grads, retain_graph=True)  # noqa: E731
        ms = do_bench(run, quantiles=[0.2, 0.5, 0.8], rep=rep, grad_to_none=leaves)
    else:
        run = lambda: (clear(), _loss_of(fn(*inputs)).backward())  # noqa: E731
        ms = do_bench(run, quantiles=[0.2, 0.5, 0.8], rep=rep)
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad() if mode == "forward" and not leaves else torch.enable_grad():
        run()
    torch.cuda.synchronize()
    clear()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def run(out_dir: Path, ops: list[str] | None, quick: bool, budget_s: float) -> Path:
    import torch._functorch.config as functorch_config
    import triton
    functorch_config.donated_buffer = False  # the backward-only timing replays one compiled graph's backward
    specs = _specs(quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "kernels_bench.csv"
    new = not csv_path.exists()
    device = torch.cuda.get_device_name()
    versions = [device, torch.__version__, triton.__version__]
    start = time.perf_counter()
    rep = 40 if quick else 100
    with open(csv_path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(HEADER)
        for op in ops or list(specs):
            spec = specs[op]
            providers = {"eager": spec["eager"], "compile": torch.compile(spec.get("compile_fn", spec["eager"])),
                         "triton": spec["triton"], **spec.get("extra", {})}
            modes = ["forward"] if spec.get("inference") else ["forward", "backward", "full"]
            for x in spec["xs"]:
                p50 = {}
                for name, fn in providers.items():
                    for mode in modes:
                        if time.perf_counter() - start > budget_s:
                            print(f"time budget of {budget_s:.0f} s spent; stopping", flush=True)
                            return csv_path
                        try:
                            torch.manual_seed(0)
                            inputs = spec["make"](x)
                            ms, mb = _measure(fn, inputs, mode, rep)
                        except Exception as e:  # noqa: BLE001  (an OOM or a compile failure must not end the sweep)
                            print(f"{op} {name} {mode} x={x}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                            torch.cuda.empty_cache()
                            continue
                        writer.writerow([op, name, mode, "ms", x, *(f"{v:.5f}" for v in ms), *versions])
                        if mode == modes[-1]:
                            writer.writerow([op, name, mode, "peak_mb", x, *(f"{mb:.1f}",) * 3, *versions])
                        f.flush()
                        p50[name, mode] = (ms[1], mb)
                        del inputs
                for mode in modes:
                    if ("eager", mode) in p50 and ("triton", mode) in p50:
                        line = "  ".join(f"{n} {p50[n, mode][0]:.3f} ms" for n in providers if (n, mode) in p50)
                        print(f"{op:22s} {spec['x_name']}={x:<6} {mode:8s} {line}  triton/eager speed-up "
                              f"{p50['eager', mode][0] / p50['triton', mode][0]:.2f}x", flush=True)
                mode = modes[-1]
                if ("eager", mode) in p50 and ("triton", mode) in p50:
                    print(f"{op:22s} {spec['x_name']}={x:<6} peak memory eager {p50['eager', mode][1]:.0f} MB, "
                          f"triton {p50['triton', mode][1]:.0f} MB", flush=True)
    return csv_path


def plot(csv_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per op: time per mode and peak memory against x, a line per provider (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (the CSV has every number)")
        return []
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    written = []
    for op in sorted({r["op"] for r in rows}):
        mine = [r for r in rows if r["op"] == op]
        panels = sorted({(r["metric"], r["mode"]) for r in mine}, key=lambda p: (p[0] != "ms", p[1]))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
        for ax, (metric, mode) in zip(axes[0], panels):
            for provider in sorted({r["provider"] for r in mine}):
                pts = sorted((int(r["x"]), float(r["p50"]), float(r["p20"]), float(r["p80"])) for r in mine
                             if r["provider"] == provider and r["metric"] == metric and r["mode"] == mode)
                if pts:
                    xs, mid, lo, hi = zip(*pts)
                    ax.plot(xs, mid, marker="o", label=provider)
                    ax.fill_between(xs, lo, hi, alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode} ({'ms, p20-p80' if metric == 'ms' else 'peak MB'})")
            ax.set_xlabel("x")
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "kernels_bench"), help="folder for the CSV and plots")
    p.add_argument("--ops", default=None, help="comma-separated subset of the ops")
    p.add_argument("--quick", action="store_true", help="every other size, shorter timing runs")
    p.add_argument("--budget-s", type=float, default=600.0, help="stop sweeping after this many seconds")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU (and TRITON_INTERPRET unset): nothing to measure here.")
        return 0
    ops = args.ops.split(",") if args.ops else None
    out_dir = Path(args.out)
    csv_path = run(out_dir, ops, args.quick, args.budget_s)
    print(f"wrote {csv_path}")
    for path in plot(csv_path, out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
