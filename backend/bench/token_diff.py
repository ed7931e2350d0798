"""Two generations of the same prompt compared token by token: where the second first leaves the first.

The Race tab runs one prompt on several execution paths with the same seed and shows where each path's text first
differs from the first path's (a faithful export at temperature 0 should agree for many tokens; quantization error
shows up as an early divergence)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..formats.tokenizer import Tokenizer


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> int | None:
    """Index of the first token where `other` differs from `reference`, or where one of them ends while the other
    goes on; None when the two are the same tokens."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


@dataclass
class Divergence:
    index: int | None      # first differing token of `other` (None: identical to the reference)
    agreed: str            # the text of the tokens both share
    rest: str              # the rest of `other`'s text, from the first differing token on


def divergence(tokenizer: Tokenizer, reference: Sequence[int], other: Sequence[int]) -> Divergence:
    """`other` split where it leaves `reference`, as text. The split falls on a token boundary; when the shared
    tokens end inside a multi-byte character, the whole character goes to the differing part."""
    index = first_divergence(reference, other)
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    text = decode(other)
    if index is None:
        return Divergence(None, text, "")
    agreed = decode(other[:index]).rstrip("\ufffd")  # a half character decodes to U+FFFD
    if not text.startswith(agreed):  # byte-level BPE can merge across the split: fall back to the shared part
        agreed = agreed[:len(_common_prefix(agreed, text))]
    return Divergence(index, agreed, text[len(agreed):])


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
