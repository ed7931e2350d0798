"""The one protocol the generation loop drives: a KV-cached forward pass (backend/runners/ holds the runners)."""
from __future__ import annotations

from typing import Protocol

import torch


class Runner(Protocol):
    """A KV-cached forward pass. Logits come back as fp32 on `device`, where sampling then runs too."""
    name: str
    device: torch.device
    weight_bytes: int     # bytes of weights one decode step reads (for the bandwidth figure)

    def start(self, batch: int, max_len: int) -> None:
        """Prepare caches for `batch` sequences of up to `max_len` tokens; forgets earlier sequences."""

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids (B, T) at positions pos..pos+T-1 -> logits of the last position (B, V)."""

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """A whole sequence without cache: ids (B, T) -> logits (B, T, V)."""

    def free(self) -> None:
        """Drop caches (the weights stay)."""
