"""Flash attention: tiled, online softmax, never the (T, T) matrix; forward and backward; GQA (Hk divides H)."""
import math

import torch
import triton
import triton.language as tl

from .utils import attention_config, check_device, dot, dot_precision, folded_grid, launch, register

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, H, GROUP, T_Q, T_K,
                     HEAD_DIM, qk_scale, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """o = softmax(q k^T * scale + causal mask) v for one (BLOCK_M query rows, head) tile, streaming over key tiles:
    with s = q k^T * scale * log2(e):  m' = max(m, rowmax s),  p = 2^(s - m'),  l' = l 2^(m - m') + rowsum p,
    acc' = acc 2^(m - m') + p v;  o = acc / l;  lse = m + log2 l (base 2, kept for the backward).
    Causal is bottom-right aligned: query i sees keys j <= i + T_K - T_Q (a query block after a cached prefix)."""
    n_m = tl.cdiv(T_Q, BLOCK_M)                                     # a 1-D grid: folded_grid(n_m, B * H)
    start_m = (tl.program_id(0) % n_m) * BLOCK_M
    bh = tl.program_id(0) // n_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + d[None, :],
                mask=(rows[:, None] < T_Q) & dmask[None, :], other=0.0)                    # (BM, BD)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offset = T_K - T_Q
    hi = T_K
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + offset)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < T_K) & dmask[None, :]
        k = tl.load(k_base + cols[:, None] * sk_t + d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        s = dot(q, tl.trans(k), DOT_PRECISION) * qk_scale  # (BM, BN)
        valid = cols[None, :] < T_K
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + offset)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * sv_t + d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    row_mask = rows < T_Q
    o_ptr = O + (bh.to(tl.int64) * T_Q + rows[:, None]) * HEAD_DIM + d[None, :]           # contiguous (B, H, T, D)
    tl.store(o_ptr, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_mask[:, None] & dmask[None, :])
    tl.store(LSE + bh.to(tl.int64) * T_Q + rows, m_i + tl.math.log2(l_i), mask=row_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                          H, HK, GROUP, T_Q, T_K, HEAD_DIM, qk_scale, sm_scale, CAUSAL: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """For one key tile of one KV head, over every query tile of the GROUP query heads that share it:
    p = 2^(s - lse),  dv += p^T do,  dp = do v^T,  ds = p (dp - delta),  dk += ds^T q * scale
    (delta = rowsum(do * o), the softmax's Jacobian term; do is (B, H, T_Q, D) contiguous)."""
    n_n = tl.cdiv(T_K, BLOCK_N)                                     # a 1-D grid: folded_grid(n_n, B * Hk)
    start_n = (tl.program_id(0) % n_n) * BLOCK_N
    bhk = tl.program_id(0) // n_n
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    kv_mask = (cols[:, None] < T_K) & dmask[None, :]
    k = tl.load(K + b * sk_b + hk * sk_h + cols[:, None] * sk_t + d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
    v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_t + d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    offset = T_K - T_Q
    lo = 0
    if CAUSAL:
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M  # earlier queries see none of these keys
    for g in range(0, GROUP):
        bh = b * H + hk * GROUP + g
        q_base = Q + b * sq_b + (hk * GROUP + g) * sq_h
        for start_m in range(lo, T_Q, BLOCK_M):
            rows = start_m + offs_m
            row_mask = rows < T_Q
            q = tl.load(q_base + rows[:, None] * sq_t + d[None, :], mask=row_mask[:, None] & dmask[None, :],
                        other=0.0)                                                            # (BM, BD)
            do = tl.load(DO + (bh * T_Q + rows[:, None]) * HEAD_DIM + d[None, :],
                         mask=row_mask[:, None] & dmask[None, :], other=0.0)                 # (BM, BD)
            lse = tl.load(LSE + bh * T_Q + rows, mask=row_mask, other=0.0)
            delta = tl.load(DELTA + bh * T_Q + rows, mask=row_mask, other=0.0)
            s = dot(q, tl.trans(k), DOT_PRECISION) * qk_scale  # (BM, BN)
            valid = row_mask[:, None] & (cols[None, :] < T_K)
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + offset)
            p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
            dv += dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION)
            dp = dot(do, tl.trans(v), DOT_PRECISION)  # (BM, BN)
            ds = p * (dp - delta[:, None])
            dk += dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION)
    out = (bhk.to(tl.int64) * T_K + cols[:, None]) * HEAD_DIM + d[None, :]                  # contiguous (B, Hk, T_K, D)
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                        H, GROUP, T_Q, T_K, HEAD_DIM, qk_scale, sm_scale, CAUSAL: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """For one query tile: dq = sum over key tiles of ds k * scale, ds = p (do v^T - delta) as in the dk/dv kernel."""
    n_m = tl.cdiv(T_Q, BLOCK_M)                                     # a 1-D grid: folded_grid(n_m, B * H)
    start_m = (tl.program_id(0) % n_m) * BLOCK_M
    bh = (tl.program_id(0) // n_m).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    row_mask = rows < T_Q
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + d[None, :],
                mask=row_mask[:, None] & dmask[None, :], other=0.0)                            # (BM, BD)
    do = tl.load(DO + (bh * T_Q + rows[:, None]) * HEAD_DIM + d[None, :],
                 mask=row_mask[:, None] & dmask[None, :], other=0.0)                           # (BM, BD)
    lse = tl.load(LSE + bh * T_Q + rows, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + bh * T_Q + rows, mask=row_mask, other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offset = T_K - T_Q
    hi = T_K
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + offset)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < T_K) & dmask[None, :]
        k = tl.load(k_base + cols[:, None] * sk_t + d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(v_base + cols[:, None] * sv_t + d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        s = dot(q, tl.trans(k), DOT_PRECISION) * qk_scale  # (BM, BN)
        valid = row_mask[:, None] & (cols[None, :] < T_K)
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + offset)
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = dot(do, tl.trans(v), DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, DOT_PRECISION)
    tl.store(DQ + (bh * T_Q + rows[:, None]) * HEAD_DIM + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_mask[:, None] & dmask[None, :])


def _fwd_fake(q, k, v, causal, scale):
    B, H, T, D = q.shape
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(B, H, T, dtype=torch.float32)


@register("attention_fwd", _fwd_fake)
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T_Q, D = q.shape
    Hk, T_K = k.shape[1], k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)                        # (B, H, T_Q, D)
    lse = torch.empty(B, H, T_Q, dtype=torch.float32, device=q.device)             # base-2 log-sum-exp
    cfg = attention_config(D, q.element_size())
    launch(_attn_fwd_kernel)[folded_grid(triton.cdiv(T_Q, cfg["BLOCK_M"]), B * H)](
        q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), H, H // Hk, T_Q, T_K, D, scale * LOG2E, CAUSAL=causal,
        DOT_PRECISION=dot_precision(q.dtype), **cfg)
    return o, lse


def _bwd_fake(do, q, k, v, o, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@register("attention_bwd", _bwd_fake)
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, T_Q, D = q.shape
    Hk, T_K = k.shape[1], k.shape[2]
    do = do.contiguous()                                                            # (B, H, T_Q, D)
    delta = (do.float() * o.float()).sum(-1)                                        # (B, H, T_Q)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    cfg = attention_config(D, q.element_size(), backward=True)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    launch(_attn_bwd_dkdv_kernel)[folded_grid(triton.cdiv(T_K, cfg["BLOCK_N"]), B * Hk)](
        q, k, v, do, lse, delta, dk, dv, *strides, H, Hk, H // Hk, T_Q, T_K, D, scale * LOG2E, scale,
        CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype), **cfg)
    launch(_attn_bwd_dq_kernel)[folded_grid(triton.cdiv(T_Q, cfg["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *strides, H, H // Hk, T_Q, T_K, D, scale * LOG2E, scale,
        CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype), **cfg)
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = torch.ops.fornax.attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.fornax.attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) [+ causal mask]) v; q (B, H, T_Q, D), k and v (B, Hk, T_K, D) with Hk dividing H.
    Causal masks are bottom-right aligned (T_Q <= T_K: the queries are the last T_Q positions)."""
    check_device(q, k, v)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "(B, H, T, D) and (B, Hk, S, D)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {k.shape[1]} key/value heads do not divide {q.shape[1]} query heads")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"attention: causal with more queries ({q.shape[2]}) than keys ({k.shape[2]})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return AttentionFunction.apply(_unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v), causal, scale)
