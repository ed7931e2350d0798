import math

import pytest
import torch

import kernels


def reference(q, k, v, causal):
    """softmax(q k^T / sqrt(D) + mask) v in fp32, the (T, S) matrix written out; K/V repeated for GQA; the causal
    mask bottom-right aligned (queries are the last T of S positions)."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                   # (B, H, T, S)
    if causal:
        T, S = q.shape[2], k.shape[2]
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v                                                 # (B, H, T, D)


CASES = [  # B, H, Hk, T, S, D, causal
    (2, 4, 2, 37, 37, 16, True),    # GQA, odd length
    (1, 2, 2, 37, 37, 64, False),
    (1, 4, 1, 5, 40, 16, True),     # a query block after a cached prefix (multi-query)
    (1, 2, 1, 70, 70, 24, True),    # head dim not a power of two, several tiles
]


FP32, BF16 = (torch.float32, 1e-3, 1e-3), (torch.bfloat16, 3e-2, 3e-2)


@pytest.mark.parametrize("B, H, Hk, T, S, D, causal, dtype, atol, rtol",
                         [(*case, *FP32) for case in CASES] + [(*CASES[0], *BF16), (*CASES[2], *BF16)])
def test_attention_forward_and_grads(B, H, Hk, T, S, D, causal, dtype, atol, rtol, device):
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype)
    k = torch.randn(B, Hk, S, D, device=device, dtype=dtype)
    v = torch.randn(B, Hk, S, D, device=device, dtype=dtype)
    do = torch.randn(B, H, T, D, device=device, dtype=dtype)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    o = kernels.attention(*ours, causal=causal)
    o.backward(do)
    ref = reference(*refs, causal)
    ref.backward(do.float())
    assert o.shape == q.shape and o.dtype == dtype
    torch.testing.assert_close(o.float(), ref, atol=atol, rtol=rtol)
    for name, a, r in zip("qkv", ours, refs):
        torch.testing.assert_close(a.grad.float(), r.grad.float(), atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


def test_attention_strided_inputs(device):
    """q, k, v as strided views of one fused projection, as the model produces them."""
    B, T, H, Hk, D = 1, 19, 4, 2, 16
    qkv = torch.randn(B, T, H + 2 * Hk, D, device=device).transpose(1, 2)        # (B, H + 2Hk, T, D)
    q, k, v = qkv[:, :H], qkv[:, H:H + Hk], qkv[:, H + Hk:]
    torch.testing.assert_close(kernels.attention(q, k, v), reference(q, k, v, True), atol=1e-4, rtol=1e-4)


def test_attention_rejects_bad_heads(device):
    with pytest.raises(ValueError, match="do not divide"):
        kernels.attention(torch.randn(1, 3, 4, 16, device=device), torch.randn(1, 2, 4, 16, device=device),
                          torch.randn(1, 2, 4, 16, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_attention_large_bf16(D, device):
    B, H, Hk, T = 2, 16, 4, 1024
    q, k, v = (torch.randn(B, h, T, D, device=device, dtype=torch.bfloat16, requires_grad=True) for h in (H, Hk, Hk))
    o = kernels.attention(q, k, v)
    o.backward(torch.ones_like(o))
    ref = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True,
                                                           enable_gqa=True)
    torch.testing.assert_close(o, ref, atol=3e-2, rtol=3e-2)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
