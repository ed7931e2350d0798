"""Sampling parameters and the pure functions that turn next-token logits into chosen tokens.

Order of processing, as in transformers and vLLM: repetition penalty (prompt + output tokens),
presence/frequency penalties (output tokens, OpenAI semantics), temperature, top-k, top-p, min-p.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from .. import limits
from ..errors import GenerationError

MAX_STOP_STRINGS = 16
MAX_SAMPLES = 16
MAX_TOP_LOGPROBS = 20
MIN_TEMPERATURE = 1e-4
MIN_REPETITION_PENALTY = 1e-2


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    min_p: float = 0.0                # 0 = off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0   # 1 = off; HF semantics (divide positive logits, multiply negative ones)
    presence_penalty: float = 0.0     # subtracted once from every token already generated
    frequency_penalty: float = 0.0    # subtracted per occurrence in the generated text
    stop: list[str] = field(default_factory=list)
    seed: int | None = None           # same seed, same model, same prompt -> same text
    num_samples: int = 1              # independent samples of one prompt, decoded as one batch
    top_logprobs: int = 0             # alternatives reported per generated token
    ignore_eos: bool = False          # keep going past end-of-sequence (benchmarks)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise GenerationError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        params = cls(**{k: v for k, v in kwargs.items() if v is not None or k == "seed"})
        params.validate()
        return params

    def validate(self) -> None:
        def number(name, lo, hi, integer=False, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
                raise GenerationError(f"{name} must be {'a whole number' if integer else 'a number'}, got {v!r}")
            if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
                raise GenerationError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
            if integer:
                setattr(self, name, int(v))

        caps = limits.current()
        number("max_new_tokens", 1, caps.max_new_tokens, integer=True)
        number("temperature", 0, 100)
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / 1e-45 overflow to inf and the softmax to NaN
            raise GenerationError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got "
                                  f"{self.temperature!r}")
        number("top_k", 0, 1_000_000, integer=True)
        number("top_p", 0, 1, lo_open=True)
        number("min_p", 0, 1)
        if self.min_p == 1:
            raise GenerationError("min_p must be below 1 (1 keeps only ties with the most likely token)")
        number("repetition_penalty", MIN_REPETITION_PENALTY, 100)  # 1e-300 would multiply logits to inf
        number("presence_penalty", -100, 100)
        number("frequency_penalty", -100, 100)
        number("num_samples", 1, min(MAX_SAMPLES, caps.max_num_samples), integer=True)
        number("top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if self.seed is not None:
            number("seed", 0, 2**63 - 1, integer=True)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise GenerationError("stop must be a list of strings")
        self.stop = [s for s in self.stop if s]
        max_stops = min(MAX_STOP_STRINGS, caps.max_stop_strings)
        if len(self.stop) > max_stops:
            raise GenerationError(f"at most {max_stops} stop strings, got {len(self.stop)}")
        longest = max(map(len, self.stop), default=0)
        if longest > caps.max_stop_chars:
            raise GenerationError(f"a stop string is {longest:,} characters long; at most {caps.max_stop_chars:,} "
                                  f"are allowed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None,
                    counts: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool: token in prompt or output; counts (B, V): occurrences in the output."""
    if p.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and (p.presence_penalty or p.frequency_penalty):
        logits = logits - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on logits (B, V); removed tokens become -inf. Not for greedy."""
    logits = logits / p.temperature
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]                    # (B, 1)
        logits = torch.where(logits < kth, neg_inf, logits)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                                  # mass of strictly better tokens
        drop_sorted = mass_before >= p.top_p                                         # keeps the smallest prefix >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = torch.where(drop, neg_inf, logits)
    if p.min_p > 0:
        probs = logits.softmax(dim=-1)
        logits = torch.where(probs < p.min_p * probs.max(dim=-1, keepdim=True).values, neg_inf, logits)
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None,
           counts: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row of logits (B, V) -> (B,)."""
    logits = apply_penalties(logits.float(), p, seen, counts)
    if p.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
