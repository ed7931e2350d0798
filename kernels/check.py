"""One op's correctness check against its PyTorch reference (kernels/reference.py), as numbers a person reads:
the max error of the forward output(s) and of every gradient, for one shape and dtype.

    python -m kernels.check rms_norm 4,64 --dtype bfloat16 [--max-elements N]     # prints JSON

On a CUDA GPU it runs the compiled kernels; with TRITON_INTERPRET=1 set before `kernels` is imported, Triton's
interpreter on CPU tensors (slow: keep shapes small; the playground's Kernel lab runs it in a subprocess so the app
process never sees the variable). `speed` times an op against its reference, eager and under torch.compile (GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .utils import INTERPRET

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Largest relative error (max |error| / max |reference|) still counted as agreement: fp32 rounding differences
# over reductions; one or two bf16 roundings of inputs, outputs and upstream gradients.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@dataclass(frozen=True)
class Case:
    dims: str                                     # what the shape's numbers mean, e.g. "B, H, Hk, T, D"
    presets: tuple[tuple[int, ...], ...]          # small shapes the interpreter checks in seconds
    make: Callable                                # (shape, dtype, device) -> dict of named inputs
    kernel: Callable                              # (**inputs) -> tuple of outputs
    ref: Callable                                 # (**inputs) -> tuple of fp32 outputs
    outputs: tuple[str, ...]
    grads: tuple[str, ...]                        # inputs whose gradient is checked (none: inference only)


def _k():
    import kernels  # the package; imported late so `reference` and `CASES` load with it either way
    return kernels


def _tables(T, D, device):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    emb = torch.outer(torch.arange(3, 3 + T, dtype=torch.float32), inv_freq).repeat(1, 2)  # (T, D)
    return emb.cos().to(device), emb.sin().to(device)


def _rand(shape, dtype, device, scale=1.0):
    return (scale * torch.randn(shape, device=device)).to(dtype)


def _targets(n, vocab, device):
    t = torch.randint(0, vocab, (n,), device=device)
    t[::5] = -100                                 # some ignored rows, as padding would be
    return t


def _heads(shape):
    B, H, Hk, T, D = shape
    if H % Hk:
        raise ValueError(f"{Hk} key/value heads must divide {H} query heads")
    return B, H, Hk, T, D


CASES: dict[str, Case] = {
    "rms_norm": Case(
        "..., D", ((4, 64), (2, 8, 128), (16, 256)),
        lambda s, dt, dev: dict(x=_rand(s, dt, dev), weight=_rand(s[-1:], dt, dev, 0.1) + 1),
        lambda x, weight: (_k().rms_norm(x, weight, 1e-6),),
        lambda x, weight: (reference.rms_norm(x, weight, 1e-6),), ("output",), ("x", "weight")),
    "layer_norm": Case(
        "..., D", ((4, 64), (2, 8, 128), (16, 256)),
        lambda s, dt, dev: dict(x=_rand(s, dt, dev), weight=_rand(s[-1:], dt, dev, 0.1) + 1,
                                bias=_rand(s[-1:], dt, dev, 0.1)),
        lambda x, weight, bias: (_k().layer_norm(x, weight, bias, 1e-5),),
        lambda x, weight, bias: (reference.layer_norm(x, weight, bias, 1e-5),), ("output",), ("x", "weight", "bias")),
    "rotary": Case(
        "B, H, Hk, T, D", ((1, 4, 2, 16, 32), (2, 4, 4, 8, 64), (1, 8, 2, 32, 64)),
        lambda s, dt, dev: dict(q=_rand(_heads(s)[:2] + s[3:], dt, dev), k=_rand((s[0], s[2]) + s[3:], dt, dev),
                                **dict(zip(("cos", "sin"), _tables(s[3], s[4], dev)))),
        lambda q, k, cos, sin: _k().rotary(q, k, cos, sin),
        reference.rotary, ("q", "k"), ("q", "k")),
    "swiglu": Case(
        "..., D", ((4, 64), (2, 8, 128), (16, 512)),
        lambda s, dt, dev: dict(gate=_rand(s, dt, dev, 2), up=_rand(s, dt, dev)),
        lambda gate, up: (_k().swiglu(gate, up),),
        lambda gate, up: (reference.swiglu(gate, up),), ("output",), ("gate", "up")),
    "gelu_tanh": Case(
        "..., D", ((4, 64), (2, 8, 128), (16, 512)),
        lambda s, dt, dev: dict(x=_rand(s, dt, dev, 3)),
        lambda x: (_k().gelu_tanh(x),),
        lambda x: (reference.gelu_tanh(x),), ("output",), ("x",)),
    "attention": Case(
        "B, H, Hk, T, D", ((1, 2, 1, 16, 32), (1, 4, 2, 32, 64), (2, 4, 4, 24, 32)),
        lambda s, dt, dev: dict(q=_rand(_heads(s)[:2] + s[3:], dt, dev), k=_rand((s[0], s[2]) + s[3:], dt, dev),
                                v=_rand((s[0], s[2]) + s[3:], dt, dev)),
        lambda q, k, v: (_k().attention(q, k, v, causal=True),),
        lambda q, k, v: (reference.attention(q, k, v, causal=True),), ("output",), ("q", "k", "v")),
    "decode_attention": Case(
        "B, H, Hk, S, D", ((1, 4, 2, 64, 32), (2, 8, 2, 128, 64), (4, 4, 4, 48, 32)),
        lambda s, dt, dev: dict(q=_rand((_heads(s)[0], s[1], 1, s[4]), dt, dev),
                                k_cache=_rand((s[0], s[2], s[3], s[4]), dt, dev),
                                v_cache=_rand((s[0], s[2], s[3], s[4]), dt, dev)),
        lambda q, k_cache, v_cache: (_k().decode_attention(q, k_cache, v_cache, k_cache.shape[2] * 3 // 4 or 1),),
        lambda q, k_cache, v_cache: (reference.decode_attention(q, k_cache, v_cache, k_cache.shape[2] * 3 // 4 or 1),),
        ("output",), ()),
    "cross_entropy": Case(
        "N, V", ((8, 301), (16, 1024), (4, 2500)),
        lambda s, dt, dev: dict(logits=_rand(s, dt, dev, 3), targets=_targets(s[0], s[1], dev)),
        lambda logits, targets: (_k().cross_entropy(logits, targets),),
        lambda logits, targets: (reference.cross_entropy(logits, targets),), ("loss",), ("logits",)),
    "linear_cross_entropy": Case(
        "N, C, V", ((8, 32, 301), (16, 64, 512), (32, 64, 1000)),
        lambda s, dt, dev: dict(hidden=_rand(s[:2], dt, dev), weight=_rand((s[2], s[1]), dt, dev, s[1] ** -0.5),
                                targets=_targets(s[0], s[2], dev)),
        lambda hidden, weight, targets: (_k().linear_cross_entropy(hidden, weight, targets),),
        lambda hidden, weight, targets: (reference.linear_cross_entropy(hidden, weight, targets),), ("loss",),
        ("hidden", "weight")),
}


def input_elements(op: str, shape: tuple[int, ...]) -> int:
    """Elements of all inputs an op's check makes for `shape` (computed before anything is allocated; outputs,
    gradients and the reference's fp32 copies are a small multiple of it)."""
    s = validate_shape(op, shape)
    if CASES[op].dims == "..., D":
        n = 1
        for d in s:
            n *= d
        tensors, vectors = {"rms_norm": (1, 1), "layer_norm": (1, 2), "swiglu": (2, 0), "gelu_tanh": (1, 0)}[op]
        return tensors * n + vectors * s[-1]
    if op == "rotary":                            # q, k and the cos / sin tables
        B, H, Hk, T, D = s
        return B * (H + Hk) * T * D + 2 * T * D
    if op == "attention":
        B, H, Hk, T, D = s
        return B * (H + 2 * Hk) * T * D
    if op == "decode_attention":
        B, H, Hk, S, D = s
        return B * H * D + 2 * B * Hk * S * D
    if op == "cross_entropy":
        return s[0] * s[1] + s[0]
    N, C, V = s
    return N * C + V * C + N


def validate_shape(op: str, shape) -> tuple[int, ...]:
    if op not in CASES:
        raise ValueError(f"unknown op {op!r}; pick one of {', '.join(CASES)}")
    s = tuple(int(d) for d in shape)
    dims = CASES[op].dims
    want = None if dims == "..., D" else len(dims.split(","))
    if (want is None and not 1 <= len(s) <= 4) or (want is not None and len(s) != want) or min(s, default=0) < 1:
        raise ValueError(f"{op} takes a shape ({dims}) of positive sizes{' (1 to 4 numbers)' if want is None else ''}"
                         f"; got {s}")
    if op in ("rotary", "attention", "decode_attention"):
        _heads(s)
    if op == "rotary" and s[-1] % 2:
        raise ValueError(f"rotary needs an even head size D; got {s[-1]}")
    return s


def default_device() -> str:
    return "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def _errors(ours: torch.Tensor, ref: torch.Tensor, dtype: str) -> dict:
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    rel = err / scale if scale > 0 else err
    return dict(max_abs_error=err, max_abs_reference=scale, relative_error=rel,
                within_tolerance=bool(rel <= TOLERANCE[dtype]))


def check(op: str, shape, dtype: str = "float32", device: str | None = None, max_elements: int | None = None,
          seed: int = 0) -> dict[str, dict]:
    """Run `op` and its reference on the same random inputs; per forward output ("forward q", ...) and per
    gradient ("grad x", ...): max |error|, max |reference|, their ratio and whether that is within TOLERANCE.
    The backward gets the same random upstream gradient in both. Shapes over `max_elements` are refused first."""
    case, s = CASES.get(op), validate_shape(op, shape)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: pick one of {', '.join(DTYPES)}")
    n = input_elements(op, s)
    if max_elements is not None and n > max_elements:
        raise ValueError(f"{op} at {s} needs {n:,} input elements; the cap here is {max_elements:,}")
    device = device or default_device()
    if device == "cpu" and not INTERPRET:
        raise RuntimeError("kernels.check on the CPU needs Triton's interpreter: TRITON_INTERPRET=1 set before "
                           "`kernels` is imported")
    torch.manual_seed(seed)
    inputs = case.make(s, DTYPES[dtype], device)
    ours_in = {k: v.detach().clone().requires_grad_(k in case.grads) for k, v in inputs.items()}
    ref_in = {k: (v.detach().float() if v.is_floating_point() else v).requires_grad_(k in case.grads)
              for k, v in inputs.items()}
    with torch.set_grad_enabled(bool(case.grads)):
        ours, ref = case.kernel(**ours_in), case.ref(**ref_in)
    names = ["forward"] if len(case.outputs) == 1 else [f"forward {o}" for o in case.outputs]
    result = {name: _errors(o, r, dtype) for name, o, r in zip(names, ours, ref)}
    if case.grads:
        upstream = [torch.randn(o.shape, device=device).to(o.dtype) for o in ours]
        torch.autograd.backward(ours, upstream)
        torch.autograd.backward(ref, [u.float() for u in upstream])
        for g in case.grads:
            result[f"grad {g}"] = _errors(ours_in[g].grad, ref_in[g].grad, dtype)
    return result


def speed(op: str, shape, dtype: str = "bfloat16", max_elements: int | None = None) -> list[dict]:
    """Median ms of the forward (and forward + backward where the op trains) on a CUDA GPU for three providers:
    the reference in eager PyTorch, the reference under torch.compile, and the Triton kernel."""
    import triton

    if not torch.cuda.is_available() or INTERPRET:
        raise RuntimeError("kernels.speed needs a CUDA GPU (and TRITON_INTERPRET unset)")
    case, s = CASES[op], validate_shape(op, shape)
    n = input_elements(op, s)
    if max_elements is not None and n > max_elements:
        raise ValueError(f"{op} at {s} needs {n:,} input elements; the cap here is {max_elements:,}")
    torch.manual_seed(0)
    inputs = {k: v.requires_grad_(k in case.grads) for k, v in case.make(s, DTYPES[dtype], "cuda").items()}
    compiled_ref = torch.compile(case.ref)
    rows = []
    for provider, fn in (("eager", case.ref), ("compile", compiled_ref), ("triton", case.kernel)):
        with torch.no_grad():
            rows.append(dict(provider=provider, mode="forward", ms=triton.testing.do_bench(lambda: fn(**inputs))))
        if case.grads:
            def full():
                outs = fn(**inputs)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            rows.append(dict(provider=provider, mode="forward + backward", ms=triton.testing.do_bench(full)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.check", description=__doc__.split("\n\n")[0])
    p.add_argument("op", choices=list(CASES))
    p.add_argument("shape", help="comma-separated sizes, e.g. 4,64")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--max-elements", type=int, default=None)
    a = p.parse_args(argv)
    try:
        shape = tuple(int(d) for d in a.shape.split(","))
        out = dict(op=a.op, shape=list(shape), dtype=a.dtype, device=default_device(),
                   results=check(a.op, shape, a.dtype, max_elements=a.max_elements))
    except (ValueError, RuntimeError) as e:
        print(json.dumps(dict(error=str(e))))
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
