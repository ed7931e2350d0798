"""Agreement of two execution paths of one model on the same tokens: KL divergence, top-1 agreement, perplexity
of each and their difference. The export parity report (export/verify.py) uses `logits_agreement` too."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..budget import NO_DEADLINE, Deadline
from .perplexity import LogitsFn, check_sequences, check_window, windows


def agreement_sums(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> dict:
    """Sums over N scored positions: ref, got (N, V) logits predicting targets (N,)."""
    ref_logp, got_logp = ref.float().log_softmax(-1), got.float().log_softmax(-1)   # (N, V)
    kl = (ref_logp.exp() * (ref_logp - got_logp)).sum(-1)                         # (N,) KL(ref || got)
    return {"positions": len(targets), "kl": float(kl.double().sum()),
            "top1": int((ref.argmax(-1) == got.argmax(-1)).sum()),
            "nll_ref": float(F.nll_loss(ref_logp, targets, reduction="sum")),
            "nll_got": float(F.nll_loss(got_logp, targets, reduction="sum"))}


def summarize(sums: dict) -> dict:
    n = sums["positions"]
    ppl_ref, ppl_got = math.exp(sums["nll_ref"] / n), math.exp(sums["nll_got"] / n)
    return {"mean_kl": sums["kl"] / n, "top1_agreement": sums["top1"] / n, "perplexity_ref": ppl_ref,
            "perplexity_other": ppl_got, "perplexity_delta": ppl_got - ppl_ref,
            "perplexity_rel_delta": (ppl_got - ppl_ref) / ppl_ref, "tokens": n}


def logits_agreement(ref: torch.Tensor, got: torch.Tensor, ids: torch.Tensor) -> dict:
    """One window already run by both: ref, got (T, V) logits of the tokens ids (T,); positions 0..T-2 are
    scored against the next token."""
    return summarize(agreement_sums(ref[:-1], got[:-1], ids[1:].to(ref.device)))


@torch.inference_mode()
def backend_agreement(ref_fn: LogitsFn, other_fn: LogitsFn, token_ids: Sequence[Sequence[int]],
                      max_length: int = 1024, stride: int | None = None, context: int | None = None,
                      on_window: Callable[[], None] | None = None, deadline: Deadline = NO_DEADLINE) -> dict:
    """Agreement over every scored position of the same sliding windows as perplexity uses; `deadline` is checked
    before every window."""
    max_length, stride = check_window(max_length, stride, context)
    check_sequences(token_ids)
    total = {"positions": 0, "kl": 0.0, "top1": 0, "nll_ref": 0.0, "nll_got": 0.0}
    for ids in token_ids:
        seq = torch.as_tensor(list(ids), dtype=torch.long)
        for begin, end, first in windows(len(seq), max_length, stride):
            deadline.check()
            window = seq[begin:end][None]                                    # (1, W)
            rows = slice(first - 1 - begin, end - 1 - begin)
            ref = ref_fn(window)[0, rows].float().cpu()                      # (end - first, V)
            got = other_fn(window)[0, rows].float().cpu()
            for key, value in agreement_sums(ref, got, seq[first:end]).items():
                total[key] += value
            if on_window is not None:
                on_window()
    return {**summarize(total), "max_length": max_length, "stride": stride}
