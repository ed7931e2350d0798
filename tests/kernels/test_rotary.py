import pytest
import torch

import kernels

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 1e-2)]


def reference(x, cos, sin):
    """HF's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def tables(T, D, device, offset=0, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = torch.outer(torch.arange(offset, offset + T, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)                                       # (T, D)
    return emb.cos().to(device), emb.sin().to(device)


@pytest.mark.parametrize("B, H, Hk, T, D", [(1, 4, 2, 37, 16), (1, 3, 3, 5, 64), (2, 6, 1, 7, 92)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rotary_forward_and_grads(B, H, Hk, T, D, dtype, atol, rtol, device):
    """q and k as the model makes them: strided views of one fused QKV projection."""
    torch.manual_seed(0)
    qkv = torch.randn(B, T, H + 2 * Hk, D, device=device, dtype=dtype).transpose(1, 2)  # (B, H + 2Hk, T, D)
    cos, sin = tables(T, D, device, offset=3)
    dq = torch.randn(B, H, T, D, device=device, dtype=dtype)
    dk = torch.randn(B, Hk, T, D, device=device, dtype=dtype)
    q1, k1 = qkv[:, :H].clone().requires_grad_(), qkv[:, H:H + Hk].clone().requires_grad_()
    qo, ko = kernels.rotary(qkv[:, :H], qkv[:, H:H + Hk], cos, sin)   # strided views go in as they are
    qo1, ko1 = kernels.rotary(q1, k1, cos, sin)
    ((qo1.float() * dq.float()).sum() + (ko1.float() * dk.float()).sum()).backward()
    q2, k2 = q1.detach().float().requires_grad_(), k1.detach().float().requires_grad_()
    rq, rk = reference(q2, cos, sin), reference(k2, cos, sin)
    ((rq * dq.float()).sum() + (rk * dk.float()).sum()).backward()
    for ours in (qo, qo1):
        torch.testing.assert_close(ours.float(), rq, atol=atol, rtol=rtol)
    for ours in (ko, ko1):
        torch.testing.assert_close(ours.float(), rk, atol=atol, rtol=rtol)
    torch.testing.assert_close(q1.grad.float(), q2.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(k1.grad.float(), k2.grad, atol=atol, rtol=rtol)


def test_rotary_per_sequence_tables(device):
    """cos/sin of shape (B, 1, T, D): each sequence at its own positions."""
    B, H, Hk, T, D = 2, 4, 2, 9, 16
    q, k = torch.randn(B, H, T, D, device=device), torch.randn(B, Hk, T, D, device=device)
    tabs = [tables(T, D, device, offset=o) for o in (0, 11)]
    cos = torch.stack([c for c, _ in tabs])[:, None]                              # (B, 1, T, D)
    sin = torch.stack([s for _, s in tabs])[:, None]
    qo, ko = kernels.rotary(q, k, cos, sin)
    torch.testing.assert_close(qo, reference(q, cos, sin), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, reference(k, cos, sin), atol=1e-5, rtol=1e-5)


def test_rotary_rejects_bad_tables(device):
    q, k = torch.randn(1, 2, 5, 8, device=device), torch.randn(1, 2, 5, 8, device=device)
    with pytest.raises(ValueError, match="do not broadcast"):
        kernels.rotary(q, k, torch.ones(6, 8, device=device), torch.ones(6, 8, device=device))


@pytest.mark.gpu
def test_rotary_large_bf16(device):
    q = torch.randn(4, 32, 2048, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(4, 8, 2048, 128, device=device, dtype=torch.bfloat16)
    cos, sin = tables(2048, 128, device)
    qo, ko = kernels.rotary(q, k, cos, sin)
    torch.testing.assert_close(qo.float(), reference(q.float(), cos, sin), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(ko.float(), reference(k.float(), cos, sin), atol=2e-2, rtol=1e-2)
