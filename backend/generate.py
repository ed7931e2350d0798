"""The generation engine: prefill, decode step by step, sample, and stream text deltas.

It runs on any `Runner` (eager PyTorch today; ONNX Runtime and Triton paths plug in the same way), so every
execution path shares one sampling and streaming implementation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer


class Runner(Protocol):
    """An execution path: a KV-cached forward pass that returns the last position's logits."""
    weight_bytes: int

    def start(self, batch: int, max_len: int) -> None:
        """Prepare caches for `batch` sequences of up to `max_len` tokens; forgets earlier sequences."""

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids (B, T) at positions pos..pos+T-1 -> fp32 logits of the last position (B, V)."""


@dataclass
class Delta:
    index: int  # which sample (0..num_samples-1)
    text: str


@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float                                        # under the model's raw distribution (temperature 1)
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob) alternatives


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    tokens: list[TokenInfo]
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class Timings:
    prompt_tokens: int = 0
    new_tokens: int = 0       # summed over samples
    ttft_s: float = 0.0       # call -> first token chosen (tokenize + prefill + sample)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    batch: int = 1
    weight_bytes: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens * self.batch / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps * self.batch / self.decode_s if self.decode_s else 0.0

    @property
    def bandwidth_gb_s(self) -> float:
        """Weight bytes read per second while decoding (each step reads every weight once)."""
        return self.weight_bytes * self.decode_steps / self.decode_s / 1e9 if self.decode_s else 0.0

    def summary(self) -> str:
        return (f"TTFT {self.ttft_s * 1000:.0f} ms · prefill {self.prefill_tok_s:.0f} tok/s · "
                f"decode {self.decode_tok_s:.1f} tok/s · {self.bandwidth_gb_s:.1f} GB/s")

    def to_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens, ttft_s=self.ttft_s,
                    prefill_s=self.prefill_s, decode_s=self.decode_s, prefill_tok_s=self.prefill_tok_s,
                    decode_tok_s=self.decode_tok_s, bandwidth_gb_s=self.bandwidth_gb_s)


@dataclass
class GenerationResult:
    completions: list[Completion]
    prompt_ids: list[int]
    timings: Timings
    seed: int

    @property
    def text(self) -> str:
        return self.completions[0].text

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


class TextAssembler:
    """Turns one sample's tokens into text deltas: whole characters only, and never part of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode ids[prefix:] against ids[prefix:read] to get the new text
        self.text = ""
        self.emitted = 0
        self.max_stop = max((len(s) for s in stop), default=0)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; returns (text safe to show now, whether a stop string ended the text)."""
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # U+FFFD: a character still incomplete
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        if not self.stop:
            return self._emit(len(self.text)), False
        start = max(0, self.emitted - self.max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._emit(len(self.text)), True
        held = 0  # longest tail of the text that could still grow into a stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return self._emit(len(self.text) - held), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta


class Stream:
    """Iterate for text deltas; afterwards `.result` holds the full GenerationResult."""

    def __init__(self, gen: Iterator[Delta]):
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[Delta]:
        self.result = yield from self._gen

    def close(self):
        self._gen.close()

    def text(self) -> str:
        """Run to the end and return the first sample's text."""
        for _ in self:
            pass
        return self.result.text


@torch.inference_mode()
def run_generation(runner: Runner, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                   eos_ids: set[int], vocab_size: int, t_start: float | None = None):
    """Generator of Delta; returns the GenerationResult. Stops at EOS, a stop string, or max_new_tokens."""
    t0 = t_start if t_start is not None else time.perf_counter()
    B, P = params.num_samples, len(prompt_ids)
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    generator = torch.Generator().manual_seed(seed)
    seen = counts = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab_size, dtype=torch.bool)
        seen[:, torch.tensor(prompt_ids)] = True
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.zeros(B, vocab_size)

    runner.start(B, P + params.max_new_tokens)
    ids = torch.tensor([prompt_ids] * B)
    logits = runner.forward(ids, 0)                                  # (B, V)
    t_prefill = time.perf_counter()
    timings = Timings(prompt_tokens=P, batch=B, prefill_s=t_prefill - t0, weight_bytes=runner.weight_bytes)

    texts = [TextAssembler(tokenizer, params.stop) for _ in range(B)]
    tokens: list[list[TokenInfo]] = [[] for _ in range(B)]
    finish: list[str | None] = [None] * B
    steps = 0
    for step in range(params.max_new_tokens):
        logits = logits[:, :vocab_size]
        chosen = sample(logits, params, seen, counts, generator)     # (B,)
        logprobs = logits.float().log_softmax(dim=-1)                # raw model distribution
        if step == 0:
            t_first = time.perf_counter()
            timings.ttft_s = t_first - t0
        chosen_lp = logprobs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
        top = torch.topk(logprobs, params.top_logprobs, dim=-1) if params.top_logprobs else None
        chosen_list = chosen.tolist()
        for b, tok in enumerate(chosen_list):
            if finish[b]:
                continue
            if tok in eos_ids and not params.ignore_eos:
                finish[b] = "eos"
                continue
            alts = [] if top is None else [(i, tokenizer.id_to_text(i), lp) for i, lp in
                                           zip(top.indices[b].tolist(), top.values[b].tolist())]
            tokens[b].append(TokenInfo(tok, tokenizer.id_to_text(tok), chosen_lp[b], alts))
            delta, stopped = texts[b].add(tok)
            if delta:
                yield Delta(b, delta)
            if stopped:
                finish[b] = "stop"
        if all(finish) or step == params.max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(B), chosen] = True
        if counts is not None:
            counts[torch.arange(B), chosen] += 1
        logits = runner.forward(chosen[:, None], P + step)
        steps += 1
    timings.decode_s = time.perf_counter() - t_first
    timings.decode_steps = steps
    completions = []
    for b in range(B):
        rest = texts[b].flush()
        if rest:
            yield Delta(b, rest)
        completions.append(Completion(texts[b].text, [t.id for t in tokens[b]], tokens[b], finish[b] or "length"))
    timings.new_tokens = sum(len(c.token_ids) for c in completions)
    return GenerationResult(completions, list(prompt_ids), timings, seed)
