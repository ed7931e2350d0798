"""Rotary position embedding, HF half-rotation layout, for the query and key heads in one launch (GQA shapes)."""
import torch
import triton
import triton.language as tl

from .utils import check_device, folded_grid, launch, register, rows_per_program


@triton.jit
def _rotary_kernel(Q, K, COS, SIN, QO, KO, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sc_b, sc_t, n_q_heads, n_k_heads,
                   T, HALF, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    """x = [x1, x2] (halves of the head dim), c = [c1, c2], s = [s1, s2]:
    forward  (x * cos + rotate_half(x) * sin):   o1 = x1 c1 - x2 s1,   o2 = x2 c2 + x1 s2
    backward (the transpose, for the gradient):  o1 = x1 c1 + x2 s2,   o2 = x2 c2 - x1 s1
    One program per (batch, BLOCK_T positions) rotates all query and key heads; outputs are contiguous (B, H, T, D)."""
    n_t = tl.cdiv(T, BLOCK_T)                                   # a 1-D grid: folded_grid(n_t, B); past 65,535
    b = (tl.program_id(0) // n_t).to(tl.int64)                  # positions axis 1 would refuse the launch
    t = ((tl.program_id(0) % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)            # (BT,)
    t_mask = t < T
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    c_mask = t_mask[:, None] & d_mask[None, :]
    c_off = b * sc_b + t[:, None] * sc_t + d[None, :]                                         # (BT, BH2)
    c1 = tl.load(COS + c_off, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]             # (BT, 1, BH2)
    c2 = tl.load(COS + c_off + HALF, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(SIN + c_off, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(SIN + c_off + HALF, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    if BACKWARD:  # the transpose of the rotation: swap the sine halves and their signs
        s_first = -s2
        s2 = -s1
        s1 = s_first
    _rotate_heads(Q, QO, b, t, t_mask, sq_b, sq_h, sq_t, n_q_heads, T, HALF, c1, c2, s1, s2, d, d_mask, BLOCK_H)
    _rotate_heads(K, KO, b, t, t_mask, sk_b, sk_h, sk_t, n_k_heads, T, HALF, c1, c2, s1, s2, d, d_mask, BLOCK_H)


@triton.jit
def _rotate_heads(X, O, b, t, t_mask, s_b, s_h, s_t, n_heads, T, HALF, c1, c2, s1, s2, d, d_mask,
                  BLOCK_H: tl.constexpr):
    """o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2 for every head of X at (b, t), into contiguous O (B, heads, T, D)."""
    h = tl.arange(0, BLOCK_H)[None, :, None]
    tt = t[:, None, None]
    dd = d[None, None, :]
    mask = t_mask[:, None, None] & (h < n_heads) & d_mask[None, None, :]
    x_ptr = X + b * s_b + tt * s_t + h * s_h + dd                                             # (BT, BH, BH2)
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    o_ptr = O + ((b * n_heads + h) * T + tt) * (2 * HALF) + dd
    tl.store(o_ptr, (x1 * c1 - x2 * s1).to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, (x2 * c2 + x1 * s2).to(O.dtype.element_ty), mask=mask)


def _fake(q, k, cos, sin, backward):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)


@register("rotary", _fake)
def _rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    Hk = k.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)              # stride 0 over batch for a (T, D) table
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)      # (B, H, T, D)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)      # (B, Hk, T, D)
    block_h, block_half = triton.next_power_of_2(max(H, Hk)), triton.next_power_of_2(D // 2)
    block_t = rows_per_program(block_h * block_half)
    launch(_rotary_kernel)[folded_grid(triton.cdiv(T, block_t), B)](
        q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), cos.stride(1), H, Hk, T, D // 2, BACKWARD=backward, BLOCK_T=block_t, BLOCK_H=block_h,
        BLOCK_HALF=block_half, num_warps=4)
    return q_out, k_out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.fornax.rotary(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = torch.ops.fornax.rotary(dq, dk, cos, sin, True)
        return dq, dk, None, None  # the tables are fixed functions of position: no gradient


def _table(x: torch.Tensor, B: int, T: int, D: int) -> torch.Tensor:
    """(T, D), (1 or B, 1, T, D) or (1 or B, T, D) -> a (B?, T, D) view the launcher can stride through."""
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"rotary: cos/sin of shape {tuple(x.shape)} must have one head, (B, 1, T, D)")
        x = x[:, 0]
    if x.shape[-2:] != (T, D) or (x.dim() == 3 and x.shape[0] not in (1, B)):
        raise ValueError(f"rotary: cos/sin of shape {tuple(x.shape)} do not broadcast to (B={B}, T={T}, D={D})")
    return x


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin); q (B, H, T, D), k (B, Hk, T, D),
    cos/sin (T, D) or broadcastable (B, 1, T, D). No gradient flows to cos and sin."""
    check_device(q, k, cos, sin)
    B, _, T, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (T, D) or D % 2:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, T, D) with even D")
    return RotaryFunction.apply(q, k, _table(cos, B, T, D), _table(sin, B, T, D))
