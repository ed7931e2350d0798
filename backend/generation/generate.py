"""The generation engine: prefill, decode step by step, sample, and stream text deltas.

Free functions over any `Runner` (backend/runners/): every execution path shares this one loop, one sampling
function and one streaming implementation. Logits and the sampling RNG stay on the runner's device; the only host
sync per step is the chosen token ids (and their log-probabilities), which the streamer needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..budget import Deadline
from .runner import Runner
from .sampling import SamplingParams, sample
from ..formats.tokenizer import Tokenizer


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
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" | "cancelled" (should_stop said so)
    #                     | "time" (the deadline passed: the text so far is kept, see run_generation)


@dataclass
class Timings:
    prompt_tokens: int = 0
    new_tokens: int = 0       # summed over samples
    ttft_s: float = 0.0       # engine start (model lock held) -> first token chosen: prefill + first sample
    prefill_s: float = 0.0    # first forward -> first token chosen
    decode_s: float = 0.0     # the decode steps' own time: never the consumer's time between yields
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


PREFILL_CHUNK = 512  # prompts longer than this are ingested in chunks, reporting progress after each


def prefill(runner: Runner, prompt_ids: list[int], batch: int, chunk: int | None = None,
            progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """Fill the cache with the prompt (the same for every sample) -> last position's logits (B, V). A long prompt
    goes in chunks at increasing positions (the cache holds what came before), with progress(done, total) after
    each; a prompt within one chunk keeps the one-shot shape. None when should_stop() turned true between chunks
    (Stop during a long prompt's ingestion need not wait for the whole prompt)."""
    chunk = chunk or PREFILL_CHUNK  # read at call time, so a test can make chunks small
    ids = torch.tensor([prompt_ids] * batch, device=runner.device)  # (B, P)
    P = ids.shape[1]
    for start in range(0, P, chunk):
        logits = runner.forward(ids[:, start:start + chunk], start)  # (B, V) at the chunk's last position
        if progress is not None:
            progress(min(start + chunk, P), P)
        if start + chunk < P and should_stop is not None and should_stop():
            return None
    return logits


def decode_step(runner: Runner, tokens: torch.Tensor, pos: int) -> torch.Tensor:
    """tokens (B,) at position pos -> next logits (B, V)."""
    return runner.forward(tokens[:, None], pos)


class _Clock:
    """Engine time only: the loop stops it before every yield and starts it again after."""

    def __init__(self):
        self.total, self.since = 0.0, None

    def start(self):
        self.since = time.perf_counter()

    def stop(self) -> float:
        if self.since is not None:
            self.total += time.perf_counter() - self.since
            self.since = None
        return self.total


def _stopper(should_stop: Callable[[], bool] | None, deadline: Deadline | None):
    """One predicate for the loop, plus the reason it fired: "time" when the deadline passed, else "cancelled"."""
    reason = ["cancelled"]

    def stop() -> bool:
        if deadline is not None and deadline.expired:
            reason[0] = "time"
            return True
        return should_stop is not None and bool(should_stop())
    return (stop if should_stop is not None or deadline is not None else None), reason


@torch.inference_mode()
def run_generation(runner: Runner, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                   eos_ids: set[int], vocab_size: int, should_stop: Callable[[], bool] | None = None,
                   prefill_progress: Callable[[int, int], None] | None = None, deadline: Deadline | None = None):
    """Generator of Delta; returns the GenerationResult. Stops at EOS, a stop string, max_new_tokens, or when
    should_stop() turns true (checked before every step: Stop ends a run at the next token, timings intact).

    `deadline` (a budget.Deadline) is checked at the same points — between prefill chunks and before every decode
    step. Past it the run ends like a Stop, keeping what was generated (a streaming page keeps its text), with
    finish_reason "time" on every unfinished sample; never an exception. A caller that must fail instead (a
    non-streaming API answer) checks `finish_reason == "time"` or calls `deadline.check()` afterwards."""
    stop_now, stop_reason = _stopper(should_stop, deadline)
    should_stop = stop_now
    B, P, device = params.num_samples, len(prompt_ids), runner.device
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    generator = torch.Generator(device=device).manual_seed(seed)
    seen = counts = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        seen[:, torch.tensor(prompt_ids, device=device)] = True
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.zeros(B, vocab_size, device=device)
    rows = torch.arange(B, device=device)

    t0 = time.perf_counter()
    runner.start(B, P + params.max_new_tokens)
    t_forward = time.perf_counter()
    logits = prefill(runner, prompt_ids, B, progress=prefill_progress, should_stop=should_stop)  # (B, V)
    timings = Timings(prompt_tokens=P, batch=B, weight_bytes=runner.weight_bytes)
    if logits is None:  # stopped while the prompt was being ingested: no token was sampled
        timings.prefill_s = timings.ttft_s = time.perf_counter() - t0
        return GenerationResult([Completion("", [], [], stop_reason[0]) for _ in range(B)], list(prompt_ids),
                                timings, seed)
    clock = _Clock()
    texts = [TextAssembler(tokenizer, params.stop) for _ in range(B)]
    tokens: list[list[TokenInfo]] = [[] for _ in range(B)]
    finish: list[str | None] = [None] * B
    steps = 0
    chosen = None
    for step in range(params.max_new_tokens):
        if step:
            clock.start()
            logits = decode_step(runner, chosen, P + step - 1)
            steps += 1
        logits = logits[:, :vocab_size]
        chosen = sample(logits, params, seen, counts, generator)     # (B,)
        logprobs = logits.float().log_softmax(dim=-1)                # raw model distribution
        picked = torch.stack([chosen.double(), logprobs.gather(-1, chosen[:, None]).squeeze(-1).double()])
        top = torch.topk(logprobs, params.top_logprobs, dim=-1) if params.top_logprobs else None
        chosen_list, chosen_lp = picked.tolist()                     # the step's one host sync
        if step == 0:
            t_first = time.perf_counter()
            timings.prefill_s, timings.ttft_s = t_first - t_forward, t_first - t0
        else:
            clock.stop()
        for b, tok in enumerate(map(int, chosen_list)):
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
        if should_stop is not None and should_stop():
            finish = [f or stop_reason[0] for f in finish]
            break
        if seen is not None:
            seen[rows, chosen] = True
        if counts is not None:
            counts[rows, chosen] += 1
    timings.decode_s, timings.decode_steps = clock.stop(), steps
    completions = []
    for b in range(B):
        rest = texts[b].flush()
        if rest:
            yield Delta(b, rest)
        completions.append(Completion(texts[b].text, [t.id for t in tokens[b]], tokens[b], finish[b] or "length"))
    timings.new_tokens = sum(len(c.token_ids) for c in completions)
    return GenerationResult(completions, list(prompt_ids), timings, seed)
