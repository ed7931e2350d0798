"""The size of an evaluation, computed before anything is built or run: rows, labels, characters, forwards, token
positions through the model, and the memory of the largest forward. Each is checked against the deployment's caps
(backend/limits.py: strict public values, generous private ones) and refused with a ScoringError naming the cap.

An evaluation holds the model lock, so these caps are what keep one visitor's upload from occupying it for hours
(a 400 KB CSV with many labels once built rows x labels sequences — tens of GB — before its first forward)."""
from __future__ import annotations

from collections.abc import Sequence

from .. import budget, limits
from ..errors import FornaxError, ScoringError


def _check(value: float, cap: float, what: str, hint: str = "") -> None:
    """limits.check as a ScoringError, with a hint saying how to get under the cap."""
    try:
        limits.check(value, cap, what)
    except FornaxError as e:
        raise ScoringError(f"{e}{'; ' + hint if hint else ''}; nothing was run") from e


def check_rows(n_rows: int, name: str = "the data") -> None:
    _check(n_rows, limits.current().max_eval_rows, f"the number of rows in {name}", "use fewer rows")


def check_labels(labels: Sequence[str]) -> None:
    _check(len(labels), limits.current().max_eval_labels, "the number of labels",
           "classification ranks every label on every row")


def check_chars(texts: Sequence, name: str = "the data") -> None:
    """Each text within max_eval_chars and all together within max_eval_total_chars, before any is tokenized.
    A text may be a string, chat messages, or a list of references."""
    caps = limits.current()
    total = 0
    for i, text in enumerate(texts):
        n = _chars(text)
        _check(n, caps.max_eval_chars, f"the length in characters of row {i + 1} of {name}")
        total += n
    _check(total, caps.max_eval_total_chars, f"the characters of {name}, all rows together")


def _chars(text) -> int:
    if isinstance(text, str):
        return len(text)
    if isinstance(text, dict):
        return len(text.get("content") or "")
    return sum(_chars(t) for t in text)


def check_work(forwards: int, tokens: int, what: str) -> None:
    """The forwards of one evaluation and the token positions they run, against the caps."""
    caps = limits.current()
    _check(forwards, caps.max_eval_forwards, f"the forwards {what} would run",
           "use fewer rows, fewer labels, a larger stride or fewer new tokens")
    _check(tokens, caps.max_eval_tokens, f"the token positions {what} would run through the model",
           "use less data, a larger stride or a shorter window")


def check_memory(config, batch: int, tokens: int, what: str, copies: int = 1, dtype="float32") -> None:
    """The largest forward of an evaluation (`copies` of its activations alive at once: two backends compared)
    against the memory budget, through backend.budget's estimator of a full forward."""
    if hasattr(budget, "check_forward") and hasattr(budget, "forward_parts"):
        extra = {}
        if copies > 1:
            second = sum(budget.forward_parts(config, batch, tokens, None, dtype).values())
            extra = {"the other backend's forward": (copies - 1) * second}
        budget.check_forward(config, batch, tokens, dtype, what=what, extra=extra)
        return
    need = copies * forward_bytes(config, batch, tokens)   # an older budget module: our own estimate
    budget.check_memory(need, what, {f"activations of {batch} x {tokens} positions": need})


def forward_bytes(config, batch: int, tokens: int) -> float:
    """Activation bytes of one full forward of `batch` x `tokens` positions, fp32: the residual stream and one
    layer's attention / MLP intermediates, the attention scores, and the logits with their log-softmax."""
    d_model = getattr(config, "d_model", 0) or 0
    d_ff = getattr(config, "d_ff", None) or 4 * d_model
    vocab = getattr(config, "vocab_size", 0) or 0
    heads = getattr(config, "n_head", 1) or 1
    per_position = 6 * d_model + 3 * d_ff + 2 * vocab
    return 4.0 * (batch * tokens * per_position + batch * heads * tokens * tokens)
