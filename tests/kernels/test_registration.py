"""The ops as torch ops: torch.compile traces through them (no graph break), and the plain-message errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels

ROOT = Path(__file__).resolve().parents[2]


def _rms_norm_block(x, w):
    return kernels.rms_norm(x, w, 1e-6) * 2


def _attention_block(q, k, v):
    return kernels.attention(q, k, v, causal=True).sum(-1)


def _cross_entropy_block(x, t):
    return kernels.cross_entropy(x * 2, t)


@pytest.mark.parametrize("fn, make, reference", [
    (_rms_norm_block, lambda d: (torch.randn(3, 5, 40, device=d), torch.randn(40, device=d)),
     lambda x, w: F.rms_norm(x, (40,), w, 1e-6) * 2),
    (_attention_block, lambda d: tuple(torch.randn(1, h, 9, 16, device=d) for h in (2, 1, 1)),
     lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum(-1)),
    (_cross_entropy_block, lambda d: (torch.randn(6, 50, device=d), torch.randint(0, 50, (6,), device=d)),
     lambda x, t: F.cross_entropy(x * 2, t)),
])
def test_torch_compile_traces_through_forward_and_backward(fn, make, reference, device):
    torch._dynamo.reset()
    inputs = make(device)
    ours = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    refs = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*ours)          # fullgraph: a break would raise
    out.sum().backward()
    ref = reference(*refs)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, r in zip(ours, refs):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, r.grad, atol=1e-4, rtol=1e-4)


def test_ops_registered_under_the_fornax_namespace():
    for name in ("rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "rotary", "swiglu_fwd", "gelu_tanh",
                 "attention_fwd", "attention_bwd", "decode_attention", "cross_entropy_fwd",
                 "linear_cross_entropy_fwd"):
        assert hasattr(torch.ops.fornax, name)


def test_without_cuda_or_interpreter_every_function_says_what_it_needs():
    script = """
import torch, kernels
x = torch.randn(2, 4, 8, 16)
calls = {
    "rms_norm": lambda: kernels.rms_norm(x, torch.ones(16), 1e-6),
    "add_rms_norm": lambda: kernels.add_rms_norm(x, x, torch.ones(16), 1e-6),
    "layer_norm": lambda: kernels.layer_norm(x, torch.ones(16), None, 1e-5),
    "rotary": lambda: kernels.rotary(x, x, torch.ones(8, 16), torch.ones(8, 16)),
    "swiglu": lambda: kernels.swiglu(x, x),
    "gelu_tanh": lambda: kernels.gelu_tanh(x),
    "attention": lambda: kernels.attention(x, x, x),
    "decode_attention": lambda: kernels.decode_attention(x[:, :, :1], x, x, 3),
    "cross_entropy": lambda: kernels.cross_entropy(x[0, 0], torch.zeros(8, dtype=torch.long)),
    "linear_cross_entropy": lambda: kernels.linear_cross_entropy(x[0], x[0, 0], torch.zeros(4, 8, dtype=torch.long)),
}
for name, call in calls.items():
    try:
        call()
    except RuntimeError as e:
        assert "Triton kernels need a CUDA GPU; set TRITON_INTERPRET=1" in str(e), (name, e)
    else:
        raise AssertionError(name + " ran")
assert sorted(calls) == sorted(vars(kernels.OPS)), sorted(vars(kernels.OPS))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
