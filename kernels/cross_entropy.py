"""Cross-entropy over a vocabulary, streaming each row in chunks; the gradient kernel is shared with the fused
linear cross-entropy (`linear_cross_entropy.py`)."""
import torch
import triton
import triton.language as tl

from .utils import check_device, chunk_config, launch, register, rows_per_program


@triton.jit
def _ce_fwd_kernel(X, TARGET, LOSS, LSE, stride_x, n_rows, n_cols, ignore_index, BLOCK_ROWS: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr):
    """lse = log(sum_j exp(x_j)) by an online max/sum over column blocks;  loss = lse - x[target]
    (0 where target == ignore_index). BLOCK_ROWS rows per program."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_mask = rows < n_rows
    x_row = X + tl.minimum(rows, n_rows - 1) * stride_x               # (R,) rows past the end re-read the last one
    x_rows = x_row[:, None]
    target = tl.load(TARGET + rows, mask=row_mask, other=ignore_index)
    m = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(x_rows + cols[None, :], mask=cols[None, :] < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))                                                   # (R,)
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(l)
    ignored = target == ignore_index
    x_target = tl.load(x_row + tl.where(ignored, 0, target)).to(tl.float32)
    tl.store(LOSS + rows, tl.where(ignored, 0.0, lse - x_target), mask=row_mask)
    tl.store(LSE + rows, lse, mask=row_mask)


@triton.jit
def _ce_grad_kernel(X, TARGET, LSE, GRAD, SCALE, stride_x, stride_g, n_rows, n_cols, ignore_index,
                    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """dloss/dx_j = (softmax(x)_j - [j == target]) * scale, 0 on ignored rows; scale = dloss_mean / n_valid is read
    from memory (no host sync). GRAD may be X itself (the fused linear CE overwrites its logits chunk)."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_mask = rows < n_rows
    target = tl.load(TARGET + rows, mask=row_mask, other=ignore_index)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    scale = tl.where(target == ignore_index, 0.0, tl.load(SCALE))                                  # (R,)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (R, C)
        g = (tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)) * scale[:, None]
        tl.store(GRAD + rows[:, None] * stride_g + cols[None, :], g.to(GRAD.dtype.element_ty), mask=mask)


def ce_rows_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                    loss: torch.Tensor, lse: torch.Tensor) -> None:
    """Per-row loss and log-sum-exp of (N, V) logits into the (N,) fp32 `loss` and `lse`."""
    block, warps = chunk_config(logits.shape[1])
    rows = rows_per_program(block)
    launch(_ce_fwd_kernel)[(triton.cdiv(logits.shape[0], rows),)](
        logits, targets, loss, lse, logits.stride(0), logits.shape[0], logits.shape[1], ignore_index,
        BLOCK_ROWS=rows, BLOCK_SIZE=block, num_warps=warps)


def ce_rows_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                 ignore_index: int, grad: torch.Tensor) -> None:
    """grad = (softmax(logits) - onehot(targets)) * scale into `grad` (which may be `logits`)."""
    block, warps = chunk_config(logits.shape[1])
    rows = rows_per_program(block)
    launch(_ce_grad_kernel)[(triton.cdiv(logits.shape[0], rows),)](
        logits, targets, lse, grad, scale, logits.stride(0), grad.stride(0), logits.shape[0], logits.shape[1],
        ignore_index, BLOCK_ROWS=rows, BLOCK_SIZE=block, num_warps=warps)


def _fwd_fake(logits, targets, ignore_index):
    n = logits.shape[0]
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@register("cross_entropy_fwd", _fwd_fake)
def _cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = logits.shape[0]
    loss_rows = torch.empty(n, dtype=torch.float32, device=logits.device)          # (N,)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)                # (N,)
    ce_rows_forward(logits, targets, ignore_index, loss_rows, lse)
    n_valid = (targets != ignore_index).sum()
    return loss_rows.sum() / n_valid, lse                                          # nan if every row is ignored


@register("cross_entropy_bwd", lambda dloss, logits, targets, lse, ignore_index: torch.empty_like(logits))
def _cross_entropy_bwd(dloss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       ignore_index: int) -> torch.Tensor:
    scale = (dloss.float() / (targets != ignore_index).sum()).reshape(1)           # dloss / n_valid
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)     # (N, V)
    ce_rows_grad(logits, targets, lse, scale, ignore_index, grad)
    return grad


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        loss, lse = torch.ops.fornax.cross_entropy_fwd(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        return torch.ops.fornax.cross_entropy_bwd(dloss, logits, targets, lse, ctx.ignore_index), None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean over non-ignored rows of -log softmax(logits)[target], like F.cross_entropy; logits (..., V),
    targets (...) integer class indices. The (N, V) softmax is never stored: the backward recomputes it."""
    check_device(logits, targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    logits2 = logits.reshape(-1, logits.shape[-1])                                 # (N, V)
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    loss = CrossEntropyFunction.apply(logits2, targets.reshape(-1).contiguous(), int(ignore_index))
    return loss
