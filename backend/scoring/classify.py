"""Classification by label likelihood: each text gets the label whose tokens (and end-of-sequence) the model finds
most likely after the prompt "<text>\\nLabel:" (the format finetuning teaches, backend/training/data.py). Scored with
any logits function, so a handle, one runner or a module in training all work."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ScoringError
from ..training.data import IGNORE, Sequences, classify_example
from .perplexity import LogitsFn
from .scores import accuracy, confusion, precision_recall_f1


@torch.no_grad()
def label_scores(logits_fn: LogitsFn, tokenizer, texts: Sequence[str], labels: Sequence[str], seq_len: int,
                 batch_rows: int = 8, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Total log-probability of each label after each text: (len(texts), len(labels)). Every (text, label) row has
    the same prompt, cut to leave room for the longest label, so the labels compete on equal context."""
    if not texts:
        raise ScoringError("no labelled rows to classify: the data is empty")
    if len(labels) < 2:
        raise ScoringError(f"classification needs at least two labels, got {list(labels)}")
    longest = max(labels, key=lambda lab: len(tokenizer.encode(" " + lab, add_special_tokens=False)))
    rows = Sequences()
    for text in texts:
        prompt, _ = classify_example(tokenizer, text, longest, seq_len)   # room for the longest label
        for label in labels:
            _, answer = classify_example(tokenizer, text, label, seq_len)
            rows.add(prompt + answer, [False] * len(prompt) + [True] * len(answer))
    scores, i = [], 0
    while i < len(rows):
        index = _batch_within(rows, i, batch_rows, LOGITS_BUDGET // (4 * max(1, vocab_size(tokenizer))))
        i += len(index)
        x, y = rows.batch(index)                                               # (B, T) each
        logits = logits_fn(x).float()                                          # (B, T, V)
        y = y.to(logits.device)
        # log p(target) = logit[target] - logsumexp(logits), without a second (B, T, V) tensor
        tok = logits.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (B, T)
        scores.append((tok * (y != IGNORE)).sum(-1).cpu())
        if on_batch is not None:
            on_batch(len(x))
    return torch.cat(scores).view(len(texts), len(labels))


LOGITS_BUDGET = 512 * 1024**2  # bytes of fp32 logits one batch may make: long rows go in smaller batches


def vocab_size(tokenizer) -> int:
    return getattr(tokenizer, "vocab_size", 0) or 0


def _batch_within(rows: Sequences, start: int, most: int, max_tokens: int) -> list[int]:
    """Rows start.. for one batch: at most `most`, and (padded to the longest) at most max_tokens positions."""
    index, longest = [start], len(rows.ids[start])
    for j in range(start + 1, min(len(rows), start + most)):
        longest = max(longest, len(rows.ids[j]))
        if longest * (len(index) + 1) > max_tokens:
            break
        index.append(j)
    return index


def classification_report(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro- and micro-F1 (over the labels seen), the majority label's share as the chance level, and
    the confusion matrix over all labels (rows: true label, columns: predicted)."""
    names, matrix = confusion(predictions, references, labels)
    majority = max(list(references).count(k) for k in set(references)) / len(references)
    return {"accuracy": accuracy(predictions, references)["accuracy"],
            "macro_f1": precision_recall_f1(predictions, references, "macro")["f1"],
            "micro_f1": precision_recall_f1(predictions, references, "micro")["f1"],
            "majority_baseline": majority, "n": len(references), "labels": list(names),
            "confusion": matrix.tolist()}
