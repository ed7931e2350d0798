"""kernels.check (the Kernel lab's check): every op agrees with its reference at a preset shape; the references
themselves agree with torch's own functions; a wrong kernel is caught; caps and bad shapes are refused first."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import check as lab
from kernels import reference


@pytest.mark.parametrize("op", list(lab.CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_op_agrees_with_its_reference(op, dtype, device):
    case = lab.CASES[op]
    results = lab.check(op, case.presets[0], dtype, device=device)
    names = ["forward"] if len(case.outputs) == 1 else [f"forward {o}" for o in case.outputs]
    assert list(results) == names + [f"grad {g}" for g in case.grads]
    for name, r in results.items():
        assert r["within_tolerance"], (name, r)
        assert r["max_abs_reference"] > 0
        assert r["relative_error"] <= (1e-5 if dtype == "float32" else 2e-2), (name, r)


def test_references_match_torch_functions():
    """The lab's references against torch's own implementations (independent of the kernels)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 64), torch.randn(64), torch.randn(64)
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6))
    torch.testing.assert_close(reference.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (64,), w, b, 1e-5))
    torch.testing.assert_close(reference.swiglu(x, w), F.silu(x) * w)
    torch.testing.assert_close(reference.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    causal = torch.ones(9, 12, dtype=torch.bool).tril(3)
    torch.testing.assert_close(reference.attention(q, k, v), F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal, enable_gqa=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference.decode_attention(q[:, :, :1], k, v, 7), F.scaled_dot_product_attention(
        q[:, :, :1], k[:, :, :7], v[:, :, :7], enable_gqa=True), atol=1e-5, rtol=1e-5)
    logits, t = torch.randn(10, 33), torch.randint(0, 33, (10,))
    t[::3] = -100
    torch.testing.assert_close(reference.cross_entropy(logits, t), F.cross_entropy(logits, t))
    h, W = torch.randn(10, 8), torch.randn(33, 8)
    torch.testing.assert_close(reference.linear_cross_entropy(h, W, t), F.cross_entropy(h @ W.t(), t))
    cos, sin = torch.randn(9, 16), torch.randn(9, 16)
    rq, _ = reference.rotary(q, k[:, :, :9], cos, sin)
    torch.testing.assert_close(rq, q * cos + torch.cat((-q[..., 8:], q[..., :8]), -1) * sin)


def test_a_wrong_kernel_is_caught(monkeypatch, device):
    """The check can fail: an RMSNorm with the wrong epsilon, and a backward that loses the weight's gradient."""
    wrong_eps = dataclasses.replace(lab.CASES["rms_norm"], kernel=lambda x, weight: (kernels.rms_norm(x, weight, 0.5),))
    monkeypatch.setitem(lab.CASES, "rms_norm", wrong_eps)
    results = lab.check("rms_norm", (4, 64), "float32", device=device)
    assert not results["forward"]["within_tolerance"] and results["forward"]["relative_error"] > 0.01

    def detached_weight(x, weight):
        return (kernels.rms_norm(x, weight.detach(), 1e-6) + 0 * weight,)
    monkeypatch.setitem(lab.CASES, "rms_norm", dataclasses.replace(wrong_eps, kernel=detached_weight))
    results = lab.check("rms_norm", (4, 64), "float32", device=device)
    assert results["forward"]["within_tolerance"] and not results["grad weight"]["within_tolerance"]


@pytest.mark.parametrize("op, shape, message", [
    ("rms_norm", (64, 4096), "the cap here is 100,000"),
    ("attention", (1, 4, 3, 8, 16), "3 key/value heads must divide 4"),
    ("rotary", (1, 2, 2, 8, 15), "even head size"),
    ("cross_entropy", (4,), r"\(N, V\)"),
    ("rms_norm", (0, 8), "positive sizes"),
    ("softmax", (4, 8), "unknown op"),
])
def test_bad_or_over_cap_shapes_are_refused_before_anything_runs(op, shape, message):
    with pytest.raises(ValueError, match=message):
        lab.check(op, shape, max_elements=100_000)


def test_input_elements_counts_what_is_allocated(device):
    for op, case in lab.CASES.items():
        inputs = case.make(case.presets[1], torch.float32, device)
        assert lab.input_elements(op, case.presets[1]) == sum(t.numel() for t in inputs.values()), op


def test_command_line_prints_json(capsys):
    assert lab.main(["gelu_tanh", "4,64", "--dtype", "bfloat16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["op"] == "gelu_tanh" and out["shape"] == [4, 64] and set(out["results"]) == {"forward", "grad x"}
    assert lab.main(["gelu_tanh", "4,64", "--max-elements", "10"]) == 2
    assert "cap" in json.loads(capsys.readouterr().out)["error"]


def test_the_playground_offers_the_same_ops_and_presets():
    """playground/tabs/kernel_lab.py keeps its own copy (it may not import `kernels` on a CPU)."""
    pytest.importorskip("gradio")             # absent on the GPU machines
    from playground.tabs import kernel_lab

    assert list(kernel_lab.OPS) == list(lab.CASES)
    for op, (dims, shapes) in kernel_lab.OPS.items():
        assert dims == lab.CASES[op].dims
        assert [tuple(int(d) for d in s.split(",")) for s in shapes] == list(lab.CASES[op].presets)
        assert all(math.prod(p) > 0 for p in lab.CASES[op].presets)
