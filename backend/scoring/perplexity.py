"""Perplexity with a sliding window, fed by any logits function: a loaded handle's forward or one runner's.

The recipe is the one of Hugging Face's "Perplexity of fixed-length models": windows of at most `max_length` tokens
start every `stride` tokens; the first window scores all its tokens (but the very first, which has no context), each
later window scores only its last `trg_len` tokens (those past the previous window's end), so every token after the
first is scored exactly once, with up to `max_length - stride` tokens of context carried over (with stride ==
max_length the windows lie side by side and, as in the recipe, each window's first token goes unscored). The negative
log-likelihoods are summed per token and divided by the number of scored tokens (token-weighted; the doc's
`num_valid_tokens - 1` weight undercounts an overlapping window by one token, which we do not copy). Several texts are
separate sequences and pool their tokens: one corpus perplexity, plus each text's own.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..budget import NO_DEADLINE, Deadline
from ..errors import FornaxError, ScoringError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids (B, T) int64 -> logits (B, T, V)
DEFAULT_MAX_LENGTH = 1024  # windows of the model's context would make (T, V) fp32 logits of GBs for an 8k context
MAX_WINDOW_LOGITS_BYTES = 1024**3  # one window's fp32 logits (max_length x vocabulary x 4 bytes) at most


def handle_logits_fn(handle, backend: str | None = None) -> LogitsFn:
    """A loaded model's full forward on the chosen execution path (None: the handle's own `logits`). A backend
    prepared on first use (compiled, triton) is prepared here, as generation would."""
    if backend is None:
        return handle.logits
    try:
        runner = handle.runner(backend)
    except FornaxError as e:
        raise ScoringError(str(e)) from e
    if not hasattr(runner, "full_logits"):
        raise ScoringError(f"backend {backend!r} cannot run a whole sequence at once (no full_logits)")
    return lambda ids: runner.full_logits(ids).float()


def default_max_length(context: int | None, vocab: int | None) -> int:
    """1024 tokens, or fewer where the context or the logits budget ask for it."""
    return min(DEFAULT_MAX_LENGTH, context or DEFAULT_MAX_LENGTH, MAX_WINDOW_LOGITS_BYTES // (4 * (vocab or 1)))


def check_window(max_length: int, stride: int | None, context: int | None = None, vocab: int | None = None
                 ) -> tuple[int, int]:
    """(max_length, stride) checked; stride None = max_length // 2, as the recipe's 1024 / 512. With the
    vocabulary size, a window whose logits would pass MAX_WINDOW_LOGITS_BYTES is refused before it is allocated."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ScoringError(f"max_length must be an integer >= 2 (a window needs a token of context), not {max_length}")
    if context is not None and max_length > context:
        raise ScoringError(f"max_length {max_length} exceeds the model's context of {context} tokens")
    if vocab and max_length * vocab * 4 > MAX_WINDOW_LOGITS_BYTES:
        raise ScoringError(f"a window of {max_length} tokens makes {max_length * vocab * 4 / 1024**3:.1f} GiB of "
                           f"logits ({vocab} per token); use a max_length of at most "
                           f"{MAX_WINDOW_LOGITS_BYTES // (4 * vocab)}")
    stride = max(1, max_length // 2) if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise ScoringError(f"stride must be a positive integer, not {stride}")
    if stride > max_length:
        raise ScoringError(f"stride {stride} > max_length {max_length}: tokens between windows would never be scored")
    return max_length, stride


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a sequence of n_tokens, positions absolute."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        trg_len = end - prev_end                      # tokens past the previous window's end
        out.append((begin, end, max(begin + 1, end - trg_len)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def check_sequences(token_ids: Sequence[Sequence[int]], names: Sequence[str] | None = None) -> None:
    if len(token_ids) == 0:
        raise ScoringError("no text to score: the data is empty")
    for i, ids in enumerate(token_ids):
        if len(ids) < 2:
            name = names[i] if names else f"text {i + 1}"
            raise ScoringError(f"{name} is {len(ids)} token(s) long: perplexity needs at least two tokens "
                               f"(one to predict from, one to predict)")


@torch.inference_mode()
def token_nll(logits_fn: LogitsFn, ids: Sequence[int], max_length: int, stride: int,
              on_window: Callable[[], None] | None = None, deadline: Deadline = NO_DEADLINE) -> torch.Tensor:
    """Negative log-likelihood of tokens 1..n-1 of one sequence (n-1,) fp32, each scored once by its window;
    `deadline` is checked before every window's forward."""
    seq = torch.as_tensor(list(ids), dtype=torch.long)
    parts = []
    for begin, end, first in windows(len(seq), max_length, stride):
        deadline.check()
        logits = logits_fn(seq[begin:end][None])[0].float()          # (W, V); row t predicts position begin+t+1
        rows = logits[first - 1 - begin:end - 1 - begin]              # (end - first, V)
        parts.append(F.cross_entropy(rows, seq[first:end].to(rows.device), reduction="none").cpu())
        if on_window is not None:
            on_window()
    return torch.cat(parts)                                           # (n - 1,)


def perplexity(logits_fn: LogitsFn, token_ids: Sequence[Sequence[int]], max_length: int = DEFAULT_MAX_LENGTH,
               stride: int | None = None, context: int | None = None, names: Sequence[str] | None = None,
               on_window: Callable[[], None] | None = None, vocab: int | None = None,
               deadline: Deadline = NO_DEADLINE) -> dict:
    """Corpus perplexity over the sequences (their tokens pooled), each sequence's own, and the token count."""
    max_length, stride = check_window(max_length, stride, context, vocab)
    check_sequences(token_ids, names)
    nll = [token_nll(logits_fn, ids, max_length, stride, on_window, deadline) for ids in token_ids]
    total = sum(float(x.double().sum()) for x in nll)
    tokens = sum(len(x) for x in nll)
    return {"perplexity": math.exp(total / tokens), "mean_nll": total / tokens, "tokens": tokens,
            "perplexities": [math.exp(float(x.double().mean())) for x in nll], "max_length": max_length,
            "stride": stride}


def count_windows(token_ids: Sequence[Sequence[int]], max_length: int, stride: int) -> int:
    return sum(n_windows(len(ids), max_length, stride) for ids in token_ids)


def n_windows(n_tokens: int, max_length: int, stride: int) -> int:
    """len(windows(n_tokens, max_length, stride)), by arithmetic: the windows start every stride tokens until
    one reaches the end."""
    if n_tokens <= max_length:
        return 1
    return -(-(n_tokens - max_length) // stride) + 1


def window_positions(n_tokens: int, max_length: int, stride: int) -> int:
    """Token positions the windows over a sequence of n_tokens run through the model, all together."""
    k = n_windows(n_tokens, max_length, stride)
    return (k - 1) * max_length + min(max_length, n_tokens - (k - 1) * stride)
