"""What an encoder (BERT-style masked LM) is for: fill [MASK]s, and score a sentence by pseudo-log-likelihood
(each token masked in turn and predicted from both sides; Salazar et al. 2020).

Both take an optional `deadline` (budget.Deadline), checked before each forward: a pseudo-log-likelihood runs one
forward per `batch_size` tokens, so a long text stops on the deployment's time limit (budget.TimeBudgetError, a
plain error) instead of holding the model."""
from __future__ import annotations

import math

import torch

from ..budget import Deadline
from ..errors import GenerationError

MASK_TOKEN = "[MASK]"
MAX_TOP_K = 100


def _check_encoder(handle) -> int:
    """The [MASK] id of an encoder handle; a plain error for anything else."""
    if not handle.family.fills_masks:
        raise GenerationError(f"fill-mask needs an encoder (BERT-style masked LM); this model is a "
                              f"{handle.family.title} model that predicts the next token")
    if handle.config.labels is not None:
        raise GenerationError("this encoder is a sequence classifier; fill-mask needs a masked-LM head")
    mask_id = handle.tokenizer.token_to_id(MASK_TOKEN)
    if mask_id is None:
        raise GenerationError(f"the tokenizer has no {MASK_TOKEN} token")
    return mask_id


def _encode(handle, text: str) -> list[int]:
    if not isinstance(text, str) or not text.strip():
        raise GenerationError("the text is empty")
    ids = handle.tokenizer.encode(text)  # with [CLS] ... [SEP] (the tokenizer's post-processor)
    if len(ids) > handle.config.max_seq_len:
        raise GenerationError(f"the text has {len(ids)} tokens; this encoder reads at most {handle.config.max_seq_len}")
    return ids


def fill_mask(handle, text: str, top_k: int = 5, deadline: Deadline | None = None) -> list[list[dict]]:
    """For each [MASK] in `text`, left to right: its top_k candidates [{"token", "id", "prob"}], best first.
    Several masks are predicted together, each from the same input (as transformers' fill-mask pipeline does)."""
    mask_id = _check_encoder(handle)
    if not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise GenerationError(f"top_k must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    if MASK_TOKEN not in (text or ""):
        raise GenerationError(f"the text has no {MASK_TOKEN}: write {MASK_TOKEN} where a word should be filled in")
    ids = _encode(handle, text)
    where = [i for i, t in enumerate(ids) if t == mask_id]
    if not where:
        raise GenerationError(f"the text has no {MASK_TOKEN} token after tokenization")
    if deadline is not None:
        deadline.check()
    logits = handle.logits(torch.tensor([ids]))[0, where]                       # (n_masks, V)
    probs = logits.softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[{"token": handle.tokenizer.id_to_text(i), "id": i, "prob": p}
             for p, i in zip(row_p.tolist(), row_i.tolist())] for row_p, row_i in zip(top.values, top.indices)]


def pseudo_log_likelihood(handle, text: str, batch_size: int = 32, deadline: Deadline | None = None) -> dict:
    """Each token's log p(token | every other token) with it masked, the sum (the PLL) and the pseudo-perplexity
    exp(-PLL / n). Special tokens ([CLS], [SEP]) are context, not scored."""
    mask_id = _check_encoder(handle)
    ids = _encode(handle, text)
    special = set(handle.tokenizer.special_ids)
    scored = [i for i, t in enumerate(ids) if t not in special]
    if not scored:
        raise GenerationError("the text has no ordinary tokens to score")
    base = torch.tensor(ids)
    logprobs = []
    for start in range(0, len(scored), batch_size):
        if deadline is not None:
            deadline.check()  # between forwards: each one scores `batch_size` tokens
        rows = scored[start:start + batch_size]
        batch = base.repeat(len(rows), 1)                                        # (n, T): row r masks token rows[r]
        batch[torch.arange(len(rows)), torch.tensor(rows)] = mask_id
        logits = handle.logits(batch)[torch.arange(len(rows)), torch.tensor(rows)]  # (n, V)
        logprobs += logits.log_softmax(-1).gather(-1, base[rows].unsqueeze(-1)).squeeze(-1).tolist()
    tokens = [{"token": handle.tokenizer.id_to_text(ids[i]), "id": ids[i], "logprob": lp}
              for i, lp in zip(scored, logprobs)]
    total = sum(logprobs)
    return {"tokens": tokens, "pll": total, "pseudo_perplexity": math.exp(-total / len(logprobs))}
