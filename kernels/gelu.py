"""GELU with the tanh approximation, GPT-2's MLP activation."""
import torch
import triton
import triton.language as tl

from .utils import as_rows, check_device, elementwise_config, launch, register, rows_per_program


@triton.jit
def _tanh(z):
    # tanh(z) = 1 - 2 / (exp(2z) + 1): portable (no libdevice); |z| <= 20 is already +-1 in fp32, no overflow
    z = tl.minimum(tl.maximum(z, -20.0), 20.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _gelu_tanh_kernel(X, DY, OUT, stride_x, stride_dy, n_rows, n_cols, BACKWARD: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """k = sqrt(2/pi), z = k (x + 0.044715 x^3), t = tanh(z):
    forward   y  = 0.5 x (1 + t)
    backward  dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2))"""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE))[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)                 # (R, C)
    k = 0.7978845608028654
    t = _tanh(k * (x + 0.044715 * x * x * x))
    if BACKWARD:
        dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        out = dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x))
    else:
        out = 0.5 * x * (1.0 + t)
    tl.store(OUT + rows * n_cols + cols, out.to(OUT.dtype.element_ty), mask=mask)


def _fake(x, dy):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register("gelu_tanh", _fake)
def _gelu_tanh(x: torch.Tensor, dy: torch.Tensor | None) -> torch.Tensor:
    """Forward when dy is None, else the input gradient."""
    n = x.shape[-1]
    x2 = as_rows(x)                                                   # (rows, n)
    dy2 = as_rows(dy) if dy is not None else x2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block, warps = elementwise_config(n)
    rows = rows_per_program(block)
    launch(_gelu_tanh_kernel)[(triton.cdiv(x2.shape[0], rows), triton.cdiv(n, block))](
        x2, dy2, out, x2.stride(0), dy2.stride(0), x2.shape[0], n, BACKWARD=dy is not None, BLOCK_ROWS=rows,
        BLOCK_SIZE=block, num_warps=warps)
    return out


class GeluTanhFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.ops.fornax.gelu_tanh(x, None)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return torch.ops.fornax.gelu_tanh(x, dy)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise (F.gelu(x, approximate="tanh"))."""
    check_device(x)
    return GeluTanhFunction.apply(x)
