"""RMSNorm, and RMSNorm fused with the residual add that precedes it in every pre-norm block."""
import torch
import triton
import triton.language as tl

from .utils import as_rows, check_device, launch, num_programs, register, row_config, rows_per_program


@triton.jit
def _rms_norm_fwd_kernel(X, R, S, Y, W, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """s = x (+ r);  rstd = 1 / sqrt(mean(s^2) + eps);  y = s * rstd * w   (BLOCK_ROWS rows per program, fp32 math)."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (R, C)
    if HAS_RESIDUAL:
        s += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s.to(S.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / n_cols + eps)                                      # (R,)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = s * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, DS, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_ds, stride_x, stride_dx, n_rows,
                         n_cols, HAS_DS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """x_hat = x * rstd,  g = dy * w:   dx = rstd * (g - x_hat * mean(g * x_hat)) (+ ds),   dw = sum_rows dy * x_hat.

    Each program walks row blocks pid, pid + P, ... and writes its own partial dw row; the caller sums the P rows.
    """
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    n_blocks = tl.cdiv(n_rows, BLOCK_ROWS)
    for i in range(0, tl.cdiv(n_blocks - pid, n_progs)):  # row blocks pid, pid + P, ...
        rows = ((pid + i * n_progs) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (R, C)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


def _fwd_fake(x, residual, weight, eps):
    n = x.shape[-1]
    rows = x.numel() // n
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), s, x.new_empty(rows, dtype=torch.float32)


@register("rms_norm_fwd", _fwd_fake)
def _rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = as_rows(x)                                                   # (rows, n)
    r2 = as_rows(residual) if residual is not None else x2
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x.new_empty(0)
    y2, s2 = y.view(-1, n), (s.view(-1, n) if residual is not None else y.view(-1, n))
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    block, warps = row_config(n, x.element_size())
    rows = rows_per_program(block)
    launch(_rms_norm_fwd_kernel)[(triton.cdiv(x2.shape[0], rows),)](
        x2, r2, s2, y2, weight, rstd, x2.stride(0), r2.stride(0), s2.stride(0), y2.stride(0), x2.shape[0], n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_ROWS=rows, BLOCK_SIZE=block, num_warps=warps)
    return y, s, rstd


def _bwd_fake(dy, ds, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


@register("rms_norm_bwd", _bwd_fake)
def _rms_norm_bwd(dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                  rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)                                 # (rows, n)
    ds2 = as_rows(ds) if ds is not None else dy2
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, n)
    block, warps = row_config(n, 4)
    rows = rows_per_program(block)
    progs = num_programs(triton.cdiv(x2.shape[0], rows))
    dw_partial = torch.empty(progs, n, dtype=torch.float32, device=x.device)  # (P, n)
    launch(_rms_norm_bwd_kernel)[(progs,)](
        dy2, ds2, x2, weight, rstd, dx2, dw_partial, dy2.stride(0), ds2.stride(0), x2.stride(0), dx2.stride(0),
        x2.shape[0], n, HAS_DS=ds is not None, BLOCK_ROWS=rows, BLOCK_SIZE=block, num_warps=warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rstd = torch.ops.fornax.rms_norm_fwd(x, None, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.fornax.rms_norm_bwd(dy, None, x, weight, rstd)
        return dx, dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, s, rstd = torch.ops.fornax.rms_norm_fwd(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, rstd = ctx.saved_tensors
        dsum, dw = torch.ops.fornax.rms_norm_bwd(dy, ds, s, weight, rstd)  # ds: the sum is also returned
        return dsum, dsum, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight over the last dim, any leading shape; fp32 math, x's dtype out."""
    check_device(x, weight)
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass: the pre-norm block's residual add fused in."""
    check_device(x, residual, weight)
    if residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    return AddRMSNormFunction.apply(x, residual, weight, eps)
