"""Fused linear + cross-entropy: the loss of `hidden @ weight.T` without ever holding the (N, V) logits.

The forward walks the rows in chunks: logits of one chunk, its loss, its logits gradient written over the logits
in place, then that chunk's share of d hidden and d weight. The backward only scales those by dloss. Peak memory
is one (chunk, V) block instead of (N, V) logits, their softmax and their gradient (Liger-Kernel's idea).
"""
import torch
import triton

from .cross_entropy import ce_rows_forward, ce_rows_grad
from .utils import check_device, register


def _fake(hidden, weight, targets, ignore_index, chunk, need_dhidden, need_dweight):
    dh = torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    return hidden.new_empty((), dtype=torch.float32), dh, dw


@register("linear_cross_entropy_fwd", _fake)
def _linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                              chunk: int, need_dhidden: bool,
                              need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, d = hidden.shape
    V = weight.shape[0]
    n_valid = (targets != ignore_index).sum()
    scale = (1.0 / n_valid.float()).reshape(1)                                     # d mean / d row loss
    loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)         # (N,)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)               # (N,)
    dhidden = torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0)   # (N, d)
    # the matmuls run in hidden's dtype (bf16 under autocast, even over fp32 master weights: what F.linear would
    # do there); d weight accumulates in fp32 and comes back in the weight's own dtype
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)        # (V, d)
    dweight = torch.zeros(V, d, dtype=torch.float32, device=weight.device) if need_dweight else weight.new_empty(0)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h = hidden[start:end]                                                      # (c, d)
        logits = h @ w.t()                                                         # (c, V), the only big block
        ce_rows_forward(logits, targets[start:end], ignore_index, loss_rows[start:end], lse[start:end])
        ce_rows_grad(logits, targets[start:end], lse[start:end], scale, ignore_index, logits)  # now d loss/d logits
        if need_dhidden:
            dhidden[start:end] = logits @ w                                        # (c, d)
        if need_dweight:
            if logits.dtype == torch.float32:
                dweight.addmm_(logits.t(), h)                                      # (V, d)
            else:
                dweight += (logits.t() @ h).float()
    loss = loss_rows.sum() / n_valid
    return loss, dhidden, dweight.to(weight.dtype) if need_dweight else dweight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = torch.ops.fornax.linear_cross_entropy_fwd(hidden, weight, targets, ignore_index, chunk,
                                                                 need_dh, need_dw)
        ctx.save_for_backward(dh, dw)
        ctx.needs = (need_dh, need_dw)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        dh = dh * dloss.to(dh.dtype) if ctx.needs[0] else None
        dw = dw * dloss.to(dw.dtype) if ctx.needs[1] else None
        return dh, dw, None, None, None


def default_chunk(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk so one (chunk, V) logits block is about as large as the (N, d) hidden states."""
    return max(1, min(triton.next_power_of_2(triton.cdiv(n_rows, triton.cdiv(vocab_size, hidden_size))), n_rows))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets, ignore_index) (mean over non-ignored rows) without the full
    logits; hidden (..., d), weight (V, d), targets (...). `chunk` rows at a time (default: see `default_chunk`)."""
    check_device(hidden, weight, targets)
    if hidden.shape[:-1] != targets.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} must be (..., d), (V, d) and (...)")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # compute in autocast's dtype, as F.linear there would
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    hidden2 = hidden.reshape(-1, hidden.shape[-1])                                 # (N, d)
    chunk = default_chunk(hidden2.shape[0], weight.shape[1], weight.shape[0]) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")
    # autocast off inside: the op picks its dtypes itself (an autocast matmul next to fp32 in-place accumulation
    # was "mat1 and mat2 must have the same dtype" with fp32 weights)
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropyFunction.apply(hidden2, weight, targets.reshape(-1).contiguous(),
                                                int(ignore_index), chunk)
