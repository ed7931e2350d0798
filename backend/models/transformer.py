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

from . import ops
from .config import ModelConfig
from .ops import TorchOps


class Linear(nn.Linear):
    """nn.Linear with a faster matrix-vector product for one row on the CPU.

    With column-major weights (see Transformer.decode_layout) the product is split into two halves of the output
    and run as one batched matmul on strided views, no copy: MKL spreads a batch over the cores but runs a lone
    GEMV on one, so this reads weights ~1.3x faster at batch 1. Everything else is plain F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # (Not under torch.compile: inductor would copy the strided halves every call; its mm on the transposed
        # weight reads them in place.)
        if (x.device.type == "cpu" and w.stride(0) == 1 and w.shape[0] % 2 == 0 and x.shape[:-1].numel() == 1
                and not torch.compiler.is_compiling()):
            w_in_out = w.t()                                                     # (in, out), contiguous
            halves = w_in_out.view(w_in_out.shape[0], 2, -1).transpose(0, 1)    # (2, in, out/2) views
            y = torch.bmm(x.reshape(1, 1, -1).expand(2, 1, -1), halves)         # (2, 1, out/2)
            y = y.reshape(*x.shape[:-1], -1)                                     # (..., out)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


class RMSNorm(nn.Module):
    ops = TorchOps

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    ops = TorchOps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


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


class KVCache(nn.Module):
    """Static cache allocated once for (batch, max_len), written at tensor positions: every decode step has the same
    shapes (what torch.compile and CUDA graphs need), and attention reads the whole cache under a mask."""

    def __init__(self, batch: int, max_len: int, n_kv_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """input_pos (T,), k/v (B, nkv, T, hd) -> the whole cache (B, nkv, S, hd) with them written in."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    ops = TorchOps

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)

    def forward(self, x, rope, input_pos, cache, mask):
        """Without a cache: causal attention over x itself. With one: keys/values written at input_pos, then one
        query (decode: `ops.decode_attention` over the filled prefix) or several (`mask` (T, S) or (B, 1, T, S))."""
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, hd).transpose(1, 2)  # (B, nh + 2*nkv, T, hd)
        q, k, v = qkv.split([nh, nkv, nkv], dim=1)                      # (B, nh, T, hd), (B, nkv, T, hd) x2
        if rope is not None:
            q, k = self.ops.rotary(q, k, *rope)
        if cache is None:
            y = self.ops.attention(q, k, v, causal=True)               # (B, nh, T, hd)
        else:
            k, v = cache.update(input_pos, k, v)                       # (B, nkv, S, hd)
            if mask is None:                                           # decode: positions [0, input_pos] valid
                y = self.ops.decode_attention(q, k, v, input_pos + 1)
            else:
                y = ops.masked_attention(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    ops = TorchOps

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
            return self.down(self.ops.swiglu(gate, up))
        return self.down(self.ops.gelu_tanh(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = (lambda: RMSNorm(cfg.d_model, cfg.norm_eps)) if cfg.family == "llama" else (
            lambda: LayerNorm(cfg.d_model, eps=cfg.norm_eps))
        self.attn_norm, self.attn = norm(), Attention(cfg)
        self.mlp_norm, self.mlp = norm(), MLP(cfg)

    def forward(self, x, rope, input_pos, cache, mask):
        x = x + self.attn(self.attn_norm(x), rope, input_pos, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.family == "llama" else LayerNorm(
            cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.kv_caches: list[KVCache] | None = None
        self.reset_buffers()

    def reset_buffers(self, device=None, length: int = 0):
        """(Re)compute the rotary tables for positions < length (at least 256; they grow on demand up to the
        context, so a model that declares a huge context costs nothing until a sequence uses it)."""
        cfg = self.config
        length = min(cfg.max_seq_len, max(length, 256))
        positions = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(cfg))   # (S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)               # (S, hd)
        device = device or self.tok_emb.weight.device
        self.register_buffer("rope_cos", emb.cos().to(device), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(device), persistent=False)

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (S >= length, hd), rebuilt larger first if needed (outside any compiled region)."""
        if length > self.rope_cos.shape[0]:
            if length > self.config.max_seq_len:
                raise ValueError(f"sequence of {length} tokens exceeds the context of {self.config.max_seq_len}")
            self.reset_buffers(self.rope_cos.device, 1 << (length - 1).bit_length())
        return self.rope_cos, self.rope_sin

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
        """Allocate the static KV cache once; reused while it is large enough (same shapes: no recompilation)."""
        cfg, w = self.config, self.tok_emb.weight
        if max_len > cfg.max_seq_len:
            raise ValueError(f"a cache of {max_len} tokens exceeds the context of {cfg.max_seq_len}")
        self.rope_tables(max_len)
        if self.kv_caches is not None:
            k = self.kv_caches[0].k
            if k.shape[0] == batch and k.shape[2] >= max_len and k.dtype == w.dtype and k.device == w.device:
                return
        self.kv_caches = None  # the old cache goes before the new one is allocated: never both at once
        self.kv_caches = [KVCache(batch, max_len, cfg.n_kv_head, cfg.head_dim, w.dtype, w.device)
                          for _ in range(cfg.n_layer)]

    def free_cache(self):
        self.kv_caches = None

    @property
    def cache_len(self) -> int:
        return 0 if self.kv_caches is None else self.kv_caches[0].k.shape[2]

    # --- forward ---
    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                last_index: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V).

        input_pos None: a whole sequence from position 0, no cache (training, scoring). input_pos (T,) int64: the
        positions of idx; keys/values go to the static cache (see setup_cache), attention reads the whole cache
        under a mask. last_index (1,): only that position's logits (B, 1, V) — prefill needs no more.
        """
        B, T = idx.shape
        if input_pos is None:
            cos, sin = self.rope_tables(T)
            positions, caches, mask = None, [None] * len(self.blocks), None
            rope = (cos[:T], sin[:T])                                   # (T, hd) each
        else:
            if self.kv_caches is None:
                raise RuntimeError("no KV cache: call setup_cache(batch, max_len) first")
            positions, caches = input_pos, self.kv_caches
            rope = (self.rope_cos[input_pos], self.rope_sin[input_pos])  # (T, hd) each
            mask = None
            if T > 1:  # each query sees the cache up to its own position
                mask = torch.arange(self.cache_len, device=idx.device)[None, :] <= input_pos[:, None]  # (T, S)
        x = self.tok_emb(idx)                                           # (B, T, d)
        if self.pos_emb is not None:
            x = x + (self.pos_emb.weight[:T] if positions is None else self.pos_emb(positions))
            rope = None
        else:
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype))
        for block, cache in zip(self.blocks, caches):
            x = block(x, rope, positions, cache, mask)
        if last_index is not None:
            x = x.index_select(1, last_index)                           # (B, 1, d)
        return self.lm_head(self.norm(x))                               # (B, T, V)
