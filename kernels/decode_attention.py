"""Decode attention: one query per sequence against a static KV cache, split-K over the cache length."""
import math

import torch
import triton
import triton.language as tl

from .utils import check_device, decode_config, dot, dot_precision, launch, register

LOG2E = 1.4426950408889634


@triton.jit
def _decode_partial_kernel(Q, K, V, LENGTHS, O_PART, LSE_PART, sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                           HK, GROUP, HEAD_DIM, qk_scale, SPLIT_LEN, NUM_SPLITS, DOT_PRECISION: tl.constexpr,
                           BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program = one KV head's GROUP query heads x one split [start, start + SPLIT_LEN) of the cache, cut at the
    sequence's length: online softmax as in flash attention, writing o_split = acc / l and lse_split = m + log2 l
    (-inf for an empty split). Each K/V tile is read once for all the heads that share it."""
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    length = tl.load(LENGTHS + b)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    h = hk * GROUP + g                                                                          # query heads
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + d[None, :], mask=(g[:, None] < GROUP) & dmask[None, :],
                other=0.0)                                                                      # (BG, BD)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < end) & dmask[None, :]
        k = tl.load(K + b * sk_b + hk * sk_h + cols[:, None] * sk_t + d[None, :], mask=kv_mask, other=0.0)
        s = dot(q, tl.trans(k), DOT_PRECISION) * qk_scale                                      # (BG, BN)
        s = tl.where(cols[None, :] < end, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_t + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION)                      # (BG, BD)
        m_i = m_new
    lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    part = (b * HK * GROUP + h) * NUM_SPLITS + split                                            # (BG,)
    gmask = g < GROUP
    tl.store(O_PART + part[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
    tl.store(LSE_PART + part, lse, mask=gmask)


@triton.jit
def _decode_combine_kernel(O_PART, LSE_PART, O, HEAD_DIM, NUM_SPLITS, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),  M = max_s lse_s: the splits' softmaxes made one."""
    bh = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = sp < NUM_SPLITS
    lse = tl.load(LSE_PART + bh * NUM_SPLITS + sp, mask=smask, other=float("-inf"))
    w = tl.where(smask & (lse > float("-inf")), tl.math.exp2(lse - tl.max(lse, axis=0)), 0.0)   # (BS,)
    o = tl.load(O_PART + (bh * NUM_SPLITS + sp[:, None]) * HEAD_DIM + d[None, :],
                mask=smask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)                       # (BS, BD)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(O + bh * HEAD_DIM + d, out.to(O.dtype.element_ty), mask=d < HEAD_DIM)


def _fake(q, k_cache, v_cache, lengths, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@register("decode_attention", _fake)
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                      scale: float) -> torch.Tensor:
    B, H, _, D = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    cfg = decode_config(S, B * Hk, D, q.element_size())
    n_splits = cfg["NUM_SPLITS"]
    o_part = torch.empty(B, H, n_splits, D, dtype=torch.float32, device=q.device)   # per-split outputs
    lse_part = torch.empty(B, H, n_splits, dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    launch(_decode_partial_kernel)[(B * Hk, n_splits)](
        q, k_cache, v_cache, lengths, o_part, lse_part, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hk, H // Hk, D, scale * LOG2E, cfg["SPLIT_LEN"], n_splits, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_G=max(16, triton.next_power_of_2(H // Hk)), BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)                        # (B, H, 1, D)
    launch(_decode_combine_kernel)[(B * H,)](
        o_part, lse_part, o, D, n_splits, BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=block_d,
        num_warps=4)
    return o


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int | torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over cache positions [0, length); q (B, H, 1, D), caches (B, Hk, S, D) with Hk
    dividing H; `length` an int, a 0-d tensor or one length per sequence (B,), each in [1, S]. Inference only."""
    check_device(q, k_cache, v_cache)
    B, H, T, D = q.shape
    if T != 1 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or \
            k_cache.shape[3] != D or H % k_cache.shape[1]:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} must be (B, H, 1, D) and the caches "
                         f"{tuple(k_cache.shape)} (B, Hk, S, D) with Hk dividing H")
    if any(t.requires_grad for t in (q, k_cache, v_cache)) and torch.is_grad_enabled():
        raise RuntimeError("decode_attention is inference-only (no backward); use attention for training")
    S = k_cache.shape[2]
    if isinstance(length, torch.Tensor):
        lengths = length.to(device=q.device, dtype=torch.int32).reshape(-1).expand(B).contiguous()  # (B,)
    else:
        if not 1 <= int(length) <= S:
            raise ValueError(f"decode_attention: length {length} outside [1, {S}]")
        lengths = torch.full((B,), int(length), dtype=torch.int32, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return torch.ops.fornax.decode_attention(q, k_cache, v_cache, lengths, scale)
