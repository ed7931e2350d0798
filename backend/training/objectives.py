"""What a training run minimises, chosen once before the loop: next-token cross-entropy (eager, or through the
Triton kernels' fused linear cross-entropy: fused.py) for a causal model; an encoder's own objective, masked LM
[+ next sentence] (mlm.py) or its classification head (encoder_classify.py).

Every objective has the same small interface (`Objective`); the loop sums `counts` over the whole global batch
(every micro-batch of every process) before any loss, so each loss term is a mean over the global batch whatever
its split into micro-batches and processes."""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from ..data.records import Records
from ..data.sequences import IGNORE, Sequences
from ..errors import TrainError
from ..formats.tokenizer import Tokenizer
from ..models import family
from .config import TrainConfig
from .data import Data, build_data
from .validation import autocast, evaluate_classify, evaluate_loss


class Objective(Protocol):
    def batches(self, split, micro: list[list[int]], step: int) -> list:
        """This process's micro-batches of global step `step` (`micro`: their example indices in `split`)."""

    def counts(self, batch) -> list[float]:
        """[the loss terms' denominators..., input tokens] of one batch (summed over the global batch: totals)."""

    def loss(self, module: torch.nn.Module, batch, totals: list[float], device: torch.device
             ) -> tuple[torch.Tensor, float]:
        """(loss, n): the batch's loss, of which the step's loss is the sum over the global batch divided by n."""

    def evaluate(self, module: torch.nn.Module, val, batch_size: int, device: torch.device
                 ) -> tuple[float, float, dict | None, str]:
        """(validation loss, its perplexity, metrics or None, the log line(s))."""


class TokenBatch(NamedTuple):
    x: torch.Tensor               # (B, T) inputs, right-padded
    y: torch.Tensor               # (B, T) targets, IGNORE where there is no loss
    inputs: int                   # input tokens, padding not counted


class NextToken:
    """Next-token cross-entropy summed over the target tokens, the step's loss its mean over every target of the
    global batch. `fused` (fused.TritonLoss) computes the same sum without materialising the (B, T, V) logits.
    Validation: loss and perplexity; on labelled rows also accuracy and macro-F1 by label words."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, vocab: int, data: Data, fused=None):
        self.tokenizer, self.seq_len, self.vocab, self.fused = tokenizer, seq_len, vocab, fused
        self.labelled = (data.val_records, data.labels) if data.task == "classify" and data.val_records else None

    def batches(self, split: Sequences, micro: list[list[int]], step: int) -> list[TokenBatch]:
        return [TokenBatch(*split.batch(idx, 0), sum(len(split.ids[i]) - 1 for i in idx)) for idx in micro]

    def counts(self, batch: TokenBatch) -> list[float]:
        return [int((batch.y != IGNORE).sum()), batch.inputs]

    def loss(self, module, batch: TokenBatch, totals: list[float], device) -> tuple[torch.Tensor, float]:
        x, y = batch.x.to(device), batch.y.to(device)
        if self.fused is not None:                                         # Triton: no (B, T, V) logits
            with autocast(device):
                return self.fused.loss_sum(module, x, y), totals[0]
        with autocast(device):
            logits = module(x)                                             # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, self.vocab), y.view(-1), ignore_index=IGNORE,
                               reduction="sum")
        return loss, totals[0]

    def evaluate(self, module, val: Sequences, batch_size: int, device) -> tuple[float, float, dict | None, str]:
        loss, ppl = evaluate_loss(module, val, batch_size, device)
        line = f"val loss {loss:.4f}, perplexity {ppl:.2f}"
        if self.labelled is None:
            return loss, ppl, None, line
        records, labels = self.labelled
        metrics = evaluate_classify(module, self.tokenizer, records, labels, self.seq_len, device)
        line += (f"\naccuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
                 f"(majority {metrics['majority_baseline']:.3f})")
        return loss, ppl, {**metrics, "method": "label words"}, line


def objective_for(cfg: TrainConfig, core: torch.nn.Module, tokenizer: Tokenizer, records: Records, seq_len: int,
                  device: torch.device) -> tuple[Data, Objective]:
    """The tokenized data and the objective of this run (its model's family decides; an encoder's run eager)."""
    fam = family(core.config)
    objective = None
    if fam.objective == "encoder":
        from .encoder_classify import encoder_objective

        data, objective = encoder_objective(cfg, core, tokenizer, records, seq_len)
    else:
        data = build_data(records, tokenizer, seq_len, cfg.val_fraction, cfg.seed)
    if (data.task == "chat" and not fam.chats) or (cfg.mode == "lora" and not fam.lora):
        raise TrainError(f"{fam.described} has no chat template and no attention projections for LoRA: train "
                         "it on text (--task lm) with --mode pretrain or full")
    if objective is not None:
        return data, objective
    fused = None
    if cfg.kernels == "triton":
        from .fused import TritonLoss

        fused = TritonLoss(core, device)
    return data, NextToken(tokenizer, seq_len, core.config.vocab_size, data, fused)
