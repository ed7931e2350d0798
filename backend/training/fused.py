"""`--kernels triton`: train through our Triton kernels (kernels/) instead of PyTorch's ops.

The training process's model gets `kernels.OPS` on every module with an `ops` attribute (fused RMSNorm / LayerNorm,
rotary, SwiGLU / GELU and flash attention, each with its Triton backward), and the loss becomes
`kernels.linear_cross_entropy` of the final norm's output and the output layer's weight, so the (tokens, vocabulary)
logits of a batch are never materialised. Needs a CUDA GPU, or TRITON_INTERPRET=1 (CPU, tests: slow).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..errors import TrainError
from ..models.transformer import Transformer
from ..data.sequences import IGNORE


def kernels_available() -> bool:
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class TritonLoss:
    """Swaps the kernels into `core` (in place: the model belongs to this training run) and computes the summed
    cross-entropy of a batch through the fused linear cross-entropy."""

    def __init__(self, core: Transformer, device: torch.device):
        if not kernels_available():
            raise TrainError("--kernels triton needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's interpreter on "
                             "the CPU); use --kernels eager here")
        if (device.type == "cuda") == (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
            raise TrainError(f"--kernels triton runs on a CUDA device, or on the CPU under TRITON_INTERPRET=1; "
                             f"the model is on {device}")
        import kernels  # only now: TRITON_INTERPRET must be settled before the kernels are decorated

        self.kernels = kernels
        swapped = 0
        for module in core.modules():
            if hasattr(module, "ops"):
                module.ops = kernels.OPS
                swapped += 1
        if not swapped:
            raise TrainError("--kernels triton: this model has no modules that call their ops through `ops`")
        self.core = core

    def loss_sum(self, wrapped: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over target tokens of -log p(target): the forward through `wrapped` (DDP / LoRA wrappers included)
        stops at the final norm, and the output layer is fused into the loss."""
        head = self.core.lm_head
        self.core.lm_head = nn.Identity()
        try:
            hidden = wrapped(x)                                                   # (B, T, d)
        finally:
            self.core.lm_head = head
        n_targets = (y != IGNORE).sum()
        mean = self.kernels.linear_cross_entropy(hidden, head.weight, y, ignore_index=IGNORE)
        return torch.where(n_targets > 0, mean * n_targets, 0.0)  # a batch of prompts only: 0, as a summed loss
