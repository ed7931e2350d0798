"""The model's numeric ops in plain PyTorch: the reference every other implementation is checked against.

`backend.models.transformer` calls these through `module.ops`, so a runner can swap in another namespace with the same names
and signatures (`kernels.OPS`: Triton kernels) without touching the model: `kernels.patch(model)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in fp32 like HF Llama so low-precision runs match it."""
    if x.dtype == torch.float32 and not torch.onnx.is_in_onnx_export():  # one fused op; same formula
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, weight.shape, weight, bias, eps)  # weight.shape: a constant when traced


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF half-rotation: x (..., T, hd), cos/sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, nh, T, hd), k (B, nkv, T, hd); cos/sin (T, hd) or (B, 1, T, hd) -> rotated (q, k)."""
    return rotate_half(q, cos, sin), rotate_half(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """q (B, nh, T, hd), k/v (B, nkv, T, hd) with nkv | nh -> (B, nh, T, hd). No cache: a full sequence."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length) -> torch.Tensor:
    """One query per sequence against a static cache: q (B, nh, 1, hd), caches (B, nkv, S, hd), positions
    [0, length) valid (`length` an int or an int tensor of shape () / (1,) / (B,)) -> (B, nh, 1, hd)."""
    B, nh, _, hd = q.shape
    nkv, S = k_cache.shape[1], k_cache.shape[2]
    length = torch.as_tensor(length, device=q.device).reshape(-1, 1, 1, 1)          # (B or 1, 1, 1, 1)
    valid = torch.arange(S, device=q.device) < length                                # (B or 1, 1, 1, S)
    # each KV group's queries folded into rows: no K/V repeat for grouped-query attention
    y = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, hd), k_cache, v_cache, attn_mask=valid,
                                       scale=1 / math.sqrt(hd))                      # (B, nkv, g, hd)
    return y.reshape(B, nh, 1, hd)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, nh, T, hd) against k/v (B, nkv, S, hd) under a boolean (True = attend) or additive float mask
    broadcastable to (B, nh, T, S). K/V are repeated explicitly: that exports to ONNX as plain ops."""
    nh, nkv = q.shape[1], k.shape[1]
    if nkv != nh:
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(q.shape[-1]))


class TorchOps:
    """The namespace the model calls through `self.ops`; `kernels.OPS` has the same names for Triton."""
    rms_norm = staticmethod(rms_norm)
    layer_norm = staticmethod(layer_norm)
    rotary = staticmethod(rotary)
    swiglu = staticmethod(swiglu)
    gelu_tanh = staticmethod(gelu_tanh)
    attention = staticmethod(attention)
    decode_attention = staticmethod(decode_attention)
