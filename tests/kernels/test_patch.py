"""kernels.patch on a small stand-in for a model whose modules call their ops through `self.ops`."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


def _rotary(q, k, cos, sin):
    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rot(q), rot(k)


EAGER_OPS = SimpleNamespace(
    rms_norm=lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps), rotary=_rotary,
    swiglu=lambda g, u: F.silu(g) * u,
    attention=lambda q, k, v, causal=True: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.ops = EAGER_OPS

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, 1e-6)


class TinyBlock(nn.Module):
    """Pre-norm attention + SwiGLU MLP, every op through `self.ops`, as the model's modules call them."""

    def __init__(self, d=32, n_head=4, n_kv_head=2, T=12):
        super().__init__()
        self.n_head, self.n_kv_head, self.hd = n_head, n_kv_head, d // n_head
        self.norm = Norm(d)
        self.qkv = nn.Linear(d, (n_head + 2 * n_kv_head) * self.hd)
        self.gate_up = nn.Linear(d, 2 * 48)
        self.down = nn.Linear(48, d)
        freqs = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos())
        self.register_buffer("sin", emb.sin())
        self.ops = EAGER_OPS

    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(B, T, -1, self.hd).transpose(1, 2)      # (B, nh + 2 nkv, T, hd)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        q, k = self.ops.rotary(q, k, self.cos[:T], self.sin[:T])
        y = self.ops.attention(q, k, v, causal=True).transpose(1, 2).reshape(B, T, -1)
        gate, up = self.gate_up(y).chunk(2, dim=-1)
        return x + self.down(self.ops.swiglu(gate, up))


def test_patch_shares_weights_and_matches_eager(device):
    torch.manual_seed(0)
    model = TinyBlock().to(device)
    patched = kernels.patch(model)
    assert patched is not model and patched.norm is not model.norm
    assert all(p is q for p, q in zip(model.parameters(), patched.parameters()))       # shared, not copied
    assert patched.cos is model.cos
    assert patched.ops is kernels.OPS and patched.norm.ops is kernels.OPS
    assert model.ops is EAGER_OPS and model.norm.ops is EAGER_OPS                      # the original is untouched
    x = torch.randn(2, 12, 32, device=device)
    torch.testing.assert_close(patched(x), model(x), atol=1e-4, rtol=1e-4)
    patched(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for ours, ref in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_patch_refuses_a_model_without_ops():
    with pytest.raises(ValueError, match="no module"):
        kernels.patch(nn.Linear(2, 2))
