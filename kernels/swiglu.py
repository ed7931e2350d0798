"""SwiGLU, Llama's MLP activation: silu(gate) * up."""
import torch
import triton
import triton.language as tl

from .utils import as_rows, check_device, elementwise_config, launch, register, rows_per_program


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, n_rows, n_cols, BLOCK_ROWS: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
    """y = silu(g) * u = g * sigmoid(g) * u   (fp32 math; grid over (row blocks, column blocks))."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE))[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)                 # (R, C)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows * n_cols + cols, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, n_rows, n_cols, BLOCK_ROWS: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
    """sig = sigmoid(g):  dg = dy * u * sig * (1 + g * (1 - sig)),  du = dy * g * sig."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE))[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)              # (R, C)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DG + rows * n_cols + cols, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * n_cols + cols, (dy * g * sig).to(DU.dtype.element_ty), mask=mask)


@register("swiglu_fwd", lambda gate, up: torch.empty_like(gate, memory_format=torch.contiguous_format))
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    n = gate.shape[-1]
    g2, u2 = as_rows(gate), as_rows(up)                               # (rows, n), e.g. halves of one gate_up matmul
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block, warps = elementwise_config(n)
    rows = rows_per_program(block)
    launch(_swiglu_fwd_kernel)[(triton.cdiv(g2.shape[0], rows), triton.cdiv(n, block))](
        g2, u2, y, g2.stride(0), u2.stride(0), g2.shape[0], n, BLOCK_ROWS=rows, BLOCK_SIZE=block, num_warps=warps)
    return y


def _bwd_fake(dy, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


@register("swiglu_bwd", _bwd_fake)
def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = gate.shape[-1]
    dy2, g2, u2 = as_rows(dy), as_rows(gate), as_rows(up)            # (rows, n)
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    block, warps = elementwise_config(n)
    rows = rows_per_program(block)
    launch(_swiglu_bwd_kernel)[(triton.cdiv(g2.shape[0], rows), triton.cdiv(n, block))](
        dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), g2.shape[0], n, BLOCK_ROWS=rows,
        BLOCK_SIZE=block, num_warps=warps)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.ops.fornax.swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return torch.ops.fornax.swiglu_bwd(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise, any leading shape (gate and up may be strided halves of one tensor)."""
    check_device(gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    return SwiGLUFunction.apply(gate, up)
