"""The Transformer: GPT-2 family and Llama family in one readable module.

GPT-2: LayerNorm, learned positions, GELU (tanh) MLP, biases everywhere.
Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, optional QKV bias (Qwen2).
Q, K and V share one matmul (`attn.qkv`) and so do SwiGLU's gate and up (`mlp.gate_up`): fewer, larger
matmuls are what decode speed on a CPU is made of. Loaders split and join HF weights to fit.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class Linear(nn.Linear):
    """nn.Linear with a faster matrix-vector product for one row on the CPU.

    With column-major weights (see Transformer.decode_layout) the product is split into two halves of the output
    and run as one batched matmul on strided views, no copy: MKL spreads a batch over the cores but runs a lone
    GEMV on one, so this reads weights ~1.3x faster at batch 1. Everything else is plain F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type == "cpu" and w.stride(0) == 1 and w.shape[0] % 2 == 0 and x.shape[:-1].numel() == 1:
            w_in_out = w.t()                                                     # (in, out), contiguous
            halves = w_in_out.view(w_in_out.shape[0], 2, -1).transpose(0, 1)    # (2, in, out/2) views
            y = torch.bmm(x.reshape(1, 1, -1).expand(2, 1, -1), halves)         # (2, 1, out/2)
            y = y.reshape(*x.shape[:-1], -1)                                     # (..., out)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like HF Llama so low-precision runs match it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.onnx.is_in_onnx_export():  # one fused op; same formula
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,), with HF's "linear" and "llama3" scaling."""
    hd = cfg.head_dim
    # float32 arithmetic, as transformers does it, so rotary angles match theirs bit for bit
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (HF layout): x (B, nh, T, hd), cos/sin (T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Static cache allocated once for (batch, max_len); `update` writes at `pos` and returns the filled prefix."""

    def __init__(self, batch: int, max_len: int, n_kv_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]  # (B, nkv, pos+T, hd)


class PastKV:
    """Cache for graph export: past (B, nkv, P, hd) in, present (B, nkv, P + T, hd) out by concatenation."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)  # given explicitly so exported graphs hold a constant
        self.qkv = Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)

    def forward(self, x, rope, pos: int, cache: KVCache | None, mask):
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, hd).transpose(1, 2)  # (B, nh + 2*nkv, T, hd)
        qk, v = qkv[:, :nh + nkv], qkv[:, nh + nkv:]
        if rope is not None:
            qk = apply_rope(qk, *rope)              # one rotation for the query and key heads together
        q, k = qk[:, :nh], qk[:, nh:]              # (B, nh, T, hd), (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(pos, k, v)         # (B, nkv, S, hd), S = pos + T
        if mask is not None and nkv != nh:         # explicit K/V repeat: exports to ONNX as plain ops
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        if T == 1 and nkv != nh and mask is None:
            # One query per head: fold each KV group's queries into rows so no K/V copy is needed.
            y = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, hd), k, v, scale=self.scale)  # (B, nkv, g, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scale, enable_gqa=mask is None and nkv != nh)  # (B, nh, T, hd)
        return self.proj(y.reshape(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.family == "llama"
        if self.gated:  # SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one matmul
            self.gate_up = Linear(cfg.d_model, 2 * cfg.d_ff, bias=cfg.mlp_bias)
        else:           # GPT-2: down(gelu_tanh(up(x)))
            self.up = Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down = Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.gated:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = (lambda: RMSNorm(cfg.d_model, cfg.norm_eps)) if cfg.family == "llama" else (
            lambda: nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps))
        self.attn_norm, self.attn = norm(), Attention(cfg)
        self.mlp_norm, self.mlp = norm(), MLP(cfg)

    def forward(self, x, rope, pos, cache, mask):
        x = x + self.attn(self.attn_norm(x), rope, pos, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.family == "llama" else nn.LayerNorm(
            cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.kv_caches: list[KVCache] | None = None
        self.reset_buffers()

    def reset_buffers(self, device=None):
        """(Re)compute the rotary tables (after building on the meta device and assigning weights)."""
        cfg = self.config
        positions = torch.arange(cfg.max_seq_len, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(cfg))   # (S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)               # (S, hd)
        device = device or self.tok_emb.weight.device
        self.register_buffer("rope_cos", emb.cos().to(device), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(device), persistent=False)

    def contiguous_layout(self):
        """Row-major weights again (for training and graph export)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and not m.weight.is_contiguous():
                m.weight = nn.Parameter(m.weight.detach().contiguous(), requires_grad=m.weight.requires_grad)
        if self.config.tie_embeddings:
            self.tok_emb.weight = self.lm_head.weight
        return self

    def decode_layout(self):
        """Store Linear weights column-major (same values, transposed strides). At batch 1 a matmul is a
        matrix-vector product, and MKL reads (in, out)-major weights 1.3-1.9x faster than (out, in)-major."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.is_contiguous():
                m.weight = nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=m.weight.requires_grad)
        if self.config.tie_embeddings:
            self.tok_emb.weight = self.lm_head.weight
        return self

    def init_weights(self, std: float = 0.02):
        """GPT-2 style init for training from scratch; residual outputs scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            else:
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("proj.weight", "down.weight")) else 1
                nn.init.normal_(p, 0.0, std * scale)

    # --- KV cache ---
    def setup_cache(self, batch: int, max_len: int):
        """Allocate the static KV cache once; reused while it is large enough."""
        cfg, w = self.config, self.tok_emb.weight
        if self.kv_caches is not None:
            k = self.kv_caches[0].k
            if k.shape[0] == batch and k.shape[2] >= max_len and k.dtype == w.dtype and k.device == w.device:
                return
        self.kv_caches = [KVCache(batch, max_len, cfg.n_kv_head, cfg.head_dim, w.dtype, w.device)
                          for _ in range(cfg.n_layer)]

    def free_cache(self):
        self.kv_caches = None

    @property
    def cache_len(self) -> int:
        return 0 if self.kv_caches is None else self.kv_caches[0].k.shape[2]

    # --- forward ---
    def rope(self, pos: int, T: int, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.pos_emb is not None:
            return None
        return self.rope_cos[pos:pos + T].to(dtype), self.rope_sin[pos:pos + T].to(dtype)  # (T, hd) each

    def forward(self, idx: torch.Tensor, pos: int = 0, use_cache: bool = False,
                last_only: bool = False) -> torch.Tensor:
        """idx (B, T) token ids starting at position `pos` -> logits (B, T, V), or (B, 1, V) if last_only.

        With use_cache the keys/values are written to the static cache (see setup_cache) at pos..pos+T.
        """
        B, T = idx.shape
        if pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the context of {self.config.max_seq_len}")
        if use_cache and (self.kv_caches is None or pos + T > self.cache_len):
            raise RuntimeError("KV cache too small: call setup_cache(batch, max_len) first")
        x = self.tok_emb(idx)                                          # (B, T, d)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[pos:pos + T]
        rope = self.rope(pos, T, x.dtype)
        mask = None
        if use_cache and pos > 0 and T > 1:  # a chunk after cached tokens: causal within the chunk, all before it
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=idx.device).tril(diagonal=pos)
        caches = self.kv_caches if use_cache else [None] * len(self.blocks)
        for block, cache in zip(self.blocks, caches):
            x = block(x, rope, pos, cache, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))                              # (B, T, V)

    def forward_with_past(self, idx: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                          past: list[tuple[torch.Tensor, torch.Tensor]]):
        """The exported graph's forward: explicit positions, a padding mask, and past keys/values in -> logits and
        present keys/values out. idx, position_ids (B, T); attention_mask (B, P + T) with 1 for real tokens."""
        B, T = idx.shape
        P = past[0][0].shape[2]
        x = self.tok_emb(idx)                                                  # (B, T, d)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        rope = None
        if self.pos_emb is None:
            rope = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)  # (B, 1, T, hd)
        keys = torch.arange(P + T, device=idx.device)
        queries = torch.arange(T, device=idx.device) + P
        causal = keys[None, :] <= queries[:, None]                             # (T, P + T)
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, P + T)
        allowed = allowed | (keys[None, :] == queries[:, None])[None, None]    # a padded query still sees itself
        # additive float mask, built once for all layers (a boolean one is converted again in every layer's graph)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
        caches = [PastKV(k, v) for k, v in past]
        for block, cache in zip(self.blocks, caches):
            x = block(x, rope, 0, cache, mask)
        return self.lm_head(self.norm(x)), [(c.k, c.v) for c in caches]
