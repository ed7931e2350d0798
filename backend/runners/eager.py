"""PyTorch eager execution of our Transformer with its static KV cache."""
from __future__ import annotations

import torch

from ..models.transformer import Transformer

CACHE_ROUND = 256  # KV cache lengths are rounded up so consecutive requests reuse one allocation (and one shape)


def cache_length(max_len: int, context: int) -> int:
    return min(context, -(-max_len // CACHE_ROUND) * CACHE_ROUND)


class EagerRunner:
    name = "eager"

    def __init__(self, model: Transformer):
        self.model = model
        self.device = model.tok_emb.weight.device
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def memory_plan(self, max_len: int) -> dict:
        """What `start(batch, max_len)` will allocate, as keyword arguments of budget.generation_parts."""
        return dict(cache_len=cache_length(max_len, self.model.config.max_seq_len),
                    kv_dtype=self.model.tok_emb.weight.dtype)

    def start(self, batch: int, max_len: int) -> None:
        self.model.setup_cache(batch, cache_length(max_len, self.model.config.max_seq_len))

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        T = ids.shape[1]
        input_pos = torch.arange(pos, pos + T, device=self.device)
        last = torch.tensor([T - 1], device=self.device)
        return self.model(ids.to(self.device), input_pos, last)[:, -1].float()  # (B, V)

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device)).float()

    def free(self) -> None:
        self.model.free_cache()
