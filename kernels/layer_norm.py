"""LayerNorm (GPT-2's norm) with an optional bias."""
import torch
import triton
import triton.language as tl

from .utils import as_rows, check_device, launch, num_programs, register, row_config, rows_per_program


@triton.jit
def _layer_norm_fwd_kernel(X, Y, W, B, MEAN, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
                           HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """mean = mean(x);  rstd = 1 / sqrt(mean((x - mean)^2) + eps);  y = (x - mean) * rstd * w + b."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)   # (R, C)
    mean = tl.sum(x, axis=1) / n_cols                                                                # (R,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    y = xc * rstd[:, None] * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_x, stride_dx,
                           n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """x_hat = (x - mean) * rstd,  g = dy * w:
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  dw = sum_rows dy * x_hat,  db = sum_rows dy.
    Per-program partial dw / db rows (over row blocks pid, pid + P, ...), summed by the caller."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    db = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    n_blocks = tl.cdiv(n_rows, BLOCK_ROWS)
    for i in range(0, tl.cdiv(n_blocks - pid, n_progs)):
        rows = ((pid + i * n_progs) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (R, C)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - (tl.sum(g, axis=1) / n_cols)[:, None]
                              - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)
    tl.store(DB_PARTIAL + pid * n_cols + cols, db, mask=col_mask)


def _fwd_fake(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@register("layer_norm_fwd", _fwd_fake)
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = as_rows(x)                                                   # (rows, n)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block, warps = row_config(n, x.element_size())
    rows = rows_per_program(block)
    launch(_layer_norm_fwd_kernel)[(triton.cdiv(x2.shape[0], rows),)](
        x2, y2, weight, bias if bias is not None else weight, mean, rstd, x2.stride(0), y2.stride(0), x2.shape[0], n,
        eps, HAS_BIAS=bias is not None, BLOCK_ROWS=rows, BLOCK_SIZE=block, num_warps=warps)
    return y, mean, rstd


def _bwd_fake(dy, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


@register("layer_norm_bwd", _bwd_fake)
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)                                 # (rows, n)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, n)
    block, warps = row_config(n, 4)
    rows = rows_per_program(block)
    progs = num_programs(triton.cdiv(x2.shape[0], rows))
    dw_partial = torch.empty(progs, n, dtype=torch.float32, device=x.device)  # (P, n)
    db_partial = torch.empty_like(dw_partial)
    launch(_layer_norm_bwd_kernel)[(progs,)](
        dy2, x2, weight, mean, rstd, dx2, dw_partial, db_partial, dy2.stride(0), x2.stride(0), dx2.stride(0),
        x2.shape[0], n, BLOCK_ROWS=rows, BLOCK_SIZE=block, num_warps=warps)
    return dx, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.ops.fornax.layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.fornax.layer_norm_bwd(dy, x, weight, mean, rstd)
        return dx, dw, (db if ctx.has_bias else None), None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim, any leading shape; fp32 math."""
    check_device(x, weight, bias)
    return LayerNormFunction.apply(x, weight, bias, eps)
