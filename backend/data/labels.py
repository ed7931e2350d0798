"""Label words: how a causal model classifies. Finetuning teaches the prompt "<text>\\nLabel:" followed by
" <label>" and end-of-sequence (backend/training/data.py); a classification gives each text the label whose tokens
(and end-of-sequence) the model finds most likely after that prompt. Scored with any logits function, so a handle,
one runner or a module in training all work (an evaluation: backend/scoring/run.py; a finetune's validation:
backend/training/validation.py)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..budget import NO_DEADLINE, Deadline
from ..errors import ScoringError
from ..formats.tokenizer import Tokenizer
from .files import DataError
from .sequences import IGNORE, Sequences

CLASSIFY_PROMPT = "{text}\nLabel:"
BATCH_ROWS = 8  # (text, label) rows one forward scores at most
LOGITS_BUDGET = 512 * 1024**2  # bytes of fp32 logits one batch may make: long rows go in smaller batches


def eos_id(tokenizer: Tokenizer) -> int | None:
    return tokenizer.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None


def classify_example(tokenizer: Tokenizer, text: str, label: str | None, seq_len: int
                     ) -> tuple[list[int], list[int]]:
    """(prompt ids, label ids + end-of-sequence) for one row; the prompt loses its start if the row is too long."""
    answer = tokenizer.encode(" " + label, add_special_tokens=False) if label is not None else []
    eos = eos_id(tokenizer)
    answer += [eos] if eos is not None and label is not None else []
    prompt = tokenizer.encode(CLASSIFY_PROMPT.format(text=text))
    room = seq_len + 1 - len(answer)
    if room < 1:
        raise DataError(f"the label {label!r} alone is {len(answer)} tokens, more than seq_len allows")
    return prompt[-room:], answer


class LabelRows:
    """The (text, label) rows of a classification, planned without building them: each prompt and each label's
    answer tokenized once, so the forwards and token positions are known before the first forward, and the rows
    made batch by batch (rows x labels sequences held at once once cost tens of GB)."""

    def __init__(self, tokenizer, texts: Sequence[str], labels: Sequence[str], seq_len: int):
        if not texts:
            raise ScoringError("no labelled rows to classify: the data is empty")
        if len(labels) < 2:
            raise ScoringError(f"classification needs at least two labels, got {list(labels)}")
        longest = max(labels, key=lambda lab: len(tokenizer.encode(" " + lab, add_special_tokens=False)))
        self.answers = [classify_example(tokenizer, "", label, seq_len)[1] for label in labels]
        # every (text, label) row has the same prompt, cut to leave room for the longest label
        self.prompts = [classify_example(tokenizer, text, longest, seq_len)[0] for text in texts]
        self.n_labels = len(labels)

    def __len__(self) -> int:
        return len(self.prompts) * self.n_labels

    @property
    def tokens(self) -> int:
        """Token positions of all rows together."""
        return sum(len(p) for p in self.prompts) * self.n_labels + sum(map(len, self.answers)) * len(self.prompts)

    @property
    def longest(self) -> int:
        return max(map(len, self.prompts)) + max(map(len, self.answers))

    def __iter__(self):
        for prompt in self.prompts:
            for answer in self.answers:
                yield prompt + answer, [False] * len(prompt) + [True] * len(answer)


@torch.no_grad()
def label_scores(logits_fn: Callable[[torch.Tensor], torch.Tensor], tokenizer, texts: Sequence[str],
                 labels: Sequence[str], seq_len: int, batch_rows: int = BATCH_ROWS,
                 on_batch: Callable[[int], None] | None = None, deadline: Deadline = NO_DEADLINE,
                 rows: LabelRows | None = None) -> torch.Tensor:
    """Total log-probability of each label after each text: (len(texts), len(labels)). `logits_fn`: ids (B, T)
    -> logits (B, T, V). Every (text, label) row has the same prompt, cut to leave room for the longest label, so
    the labels compete on equal context. `deadline` is checked before every forward; `rows`: the plan of these
    texts and labels, when the caller made it already."""
    rows = rows if rows is not None else LabelRows(tokenizer, texts, labels, seq_len)
    scores = []
    for batch in batches(rows, batch_rows, max_batch_tokens(tokenizer)):
        deadline.check()
        x, y = batch.batch(list(range(len(batch))))                           # (B, T) each
        logits = logits_fn(x).float()                                          # (B, T, V)
        y = y.to(logits.device)
        # log p(target) = logit[target] - logsumexp(logits), without a second (B, T, V) tensor
        tok = logits.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (B, T)
        scores.append((tok * (y != IGNORE)).sum(-1).cpu())
        if on_batch is not None:
            on_batch(len(x))
    return torch.cat(scores).view(len(texts), len(labels))


def vocab_size(tokenizer) -> int:
    return getattr(tokenizer, "vocab_size", 0) or 0


def max_batch_tokens(tokenizer) -> int:
    """Positions (rows x padded length) one batch may have within LOGITS_BUDGET."""
    return LOGITS_BUDGET // (4 * max(1, vocab_size(tokenizer)))


def batches(rows, most: int, max_tokens: int):
    """Consecutive rows ((ids, mask) pairs) as Sequences batches: at most `most` rows, and (padded to the longest)
    at most max_tokens positions, a row alone always allowed. Made as they are needed."""
    batch, longest = Sequences(), 0
    for ids, mask in rows:
        grown = max(longest, len(ids))
        if len(batch) and (len(batch) >= most or grown * (len(batch) + 1) > max_tokens):
            yield batch
            batch, grown = Sequences(), len(ids)
        batch.add(ids, mask)
        longest = grown
    if len(batch):
        yield batch
