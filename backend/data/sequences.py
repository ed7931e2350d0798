"""Tokenized datasets: token sequences with a loss mask (causal models), whole encoder inputs with one label each,
and their right-padded batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

IGNORE = -100                 # target id that cross_entropy skips


@dataclass
class Sequences:
    """Token sequences with a loss mask: token i is a target (predicted from tokens < i) iff mask[i]."""
    ids: list[torch.Tensor] = field(default_factory=list)    # each (L,) int64
    mask: list[torch.Tensor] = field(default_factory=list)   # each (L,) bool; mask[0] is never used

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: list[int], mask: list[bool]):
        self.ids.append(torch.tensor(ids, dtype=torch.long))
        self.mask.append(torch.tensor(mask, dtype=torch.bool))

    def subset(self, index: list[int]) -> "Sequences":
        return Sequences([self.ids[i] for i in index], [self.mask[i] for i in index])

    def batch(self, index: list[int], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded inputs x (B, L) and targets y (B, L), y = IGNORE where there is no loss (and on padding)."""
        L = max(len(self.ids[i]) for i in index) - 1
        x = torch.full((len(index), L), pad_id, dtype=torch.long)
        y = torch.full((len(index), L), IGNORE, dtype=torch.long)
        for b, i in enumerate(index):
            ids, mask = self.ids[i], self.mask[i]
            n = len(ids) - 1
            x[b, :n] = ids[:-1]
            y[b, :n] = torch.where(mask[1:], ids[1:], IGNORE)
        return x, y

    @property
    def n_targets(self) -> int:
        return int(sum(m[1:].sum() for m in self.mask))


class EncoderBatch(NamedTuple):
    ids: torch.Tensor                    # (B, T) right-padded
    attention_mask: torch.Tensor         # (B, T) 1 on tokens, 0 on padding
    token_types: torch.Tensor            # (B, T) 0 = first segment, 1 = second
    labels: torch.Tensor                 # (B,) class index (classify) or 0 next / 1 random (next-sentence)


@dataclass
class EncoderExamples:
    """Whole encoder inputs ([CLS] ... [SEP], maybe a second segment) with one label each."""
    ids: list[torch.Tensor] = field(default_factory=list)     # each (L,) int64
    types: list[torch.Tensor] = field(default_factory=list)   # each (L,) int64
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: list[int], label: int, types: list[int] | None = None):
        self.ids.append(torch.tensor(ids, dtype=torch.long))
        self.types.append(torch.tensor(types if types is not None else [0] * len(ids), dtype=torch.long))
        self.labels.append(label)

    def batch(self, index: list[int], pad_id: int = 0) -> EncoderBatch:
        T = max(len(self.ids[i]) for i in index)
        ids = torch.full((len(index), T), pad_id, dtype=torch.long)
        types = torch.zeros((len(index), T), dtype=torch.long)
        mask = torch.zeros((len(index), T), dtype=torch.long)
        for b, i in enumerate(index):
            n = len(self.ids[i])
            ids[b, :n], types[b, :n], mask[b, :n] = self.ids[i], self.types[i], 1
        return EncoderBatch(ids, mask, types, torch.tensor([self.labels[i] for i in index], dtype=torch.long))
