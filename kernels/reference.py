"""Plain PyTorch versions of every kernel's op, written out in fp32 (the same math as tests/kernels' references,
which keep their own copies): what `kernels.check` and the playground's Kernel lab compare the kernels against."""
from __future__ import annotations

import math

import torch


def rms_norm(x, weight, eps=1e-6):
    """HF Llama's RMSNorm."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def layer_norm(x, weight, bias=None, eps=1e-5):
    x32 = x.float()
    mean = x32.mean(-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(-1, keepdim=True)
    y = (x32 - mean) * torch.rsqrt(var + eps) * weight.float()
    return y if bias is None else y + bias.float()


def rotary(q, k, cos, sin):
    """HF's apply_rotary_pos_emb (half rotation): x * cos + rotate_half(x) * sin, for q and k."""
    def rot(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return x.float() * cos.float() + torch.cat((-x2, x1), dim=-1) * sin.float()
    return rot(q), rot(k)


def swiglu(gate, up):
    """silu(gate) * up."""
    g = gate.float()
    return g * torch.sigmoid(g) * up.float()


def gelu_tanh(x):
    """GPT-2's gelu: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = x.float()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


def attention(q, k, v, causal=True):
    """softmax(q k^T / sqrt(D) + mask) v with the (T, S) matrix written out; K/V repeated for GQA; the causal mask
    bottom-right aligned (queries are the last T of S positions)."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                   # (B, H, T, S)
    if causal:
        T, S = q.shape[2], k.shape[2]
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v                                                 # (B, H, T, D)


def decode_attention(q, k_cache, v_cache, length):
    """One query per sequence over cache positions [0, length): q (B, H, 1, D), caches (B, Hk, S, D)."""
    n = int(length)
    return attention(q, k_cache[:, :, :n], v_cache[:, :, :n], causal=False)      # (B, H, 1, D)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean over non-ignored rows of logsumexp(x) - x[target]."""
    x = logits.float().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore_index
    picked = x.gather(1, t.clamp_min(0)[:, None])[:, 0]
    return (torch.logsumexp(x, dim=-1) - picked)[keep].sum() / keep.sum()


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100):
    """The unfused way: all (N, V) logits, then cross_entropy."""
    return cross_entropy(hidden.float() @ weight.float().t(), targets, ignore_index)
