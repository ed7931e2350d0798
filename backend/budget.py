"""One memory budget and one time budget, checked before work starts and between its steps.

Memory: every request that allocates (load, chat, the OpenAI API, Race, Evaluate, export, finetune) estimates its
bytes from the config *before* a tensor exists — weights + KV cache for the requested batch × length + activations
— and `check_memory` refuses it past `limits.current().memory_budget_bytes`. Time: a `Deadline` is made where a
request starts and handed down; the engine and the scoring / export loops call `deadline.check()` between steps, so
a non-streaming event stops on time too (Gradio's own `time_limit` only reaches streaming events).

The estimators (pure arithmetic on a ModelConfig; nothing is allocated) and the checks to call:

  weight_bytes(cfg, dtype)                          the weights once built (GGUF: after dequantization)
  kv_cache_bytes(cfg, batch, length, dtype)         2 × n_layer × batch × length × n_kv_head × head_dim × bytes
  forward_parts(cfg, batch, tokens, cache, dtype)   one forward's activations: hidden states, QKV, MLP, the
                                                    attention scores B×H×T×S in fp32, logits B×T×V in fp32
  generation_parts(cfg, batch, prompt, new, dtype)  KV cache + the largest prefill chunk's activations + sampling

  check_load(cfg, dtype, what)                      loading: weights (+ conversion copies) must fit
  check_generation(cfg, batch, prompt_len, max_new, dtype, ...)   before a runner allocates its cache
                                                    (`ModelHandle.stream` calls it: chat, API, Race inherit it)
  check_forward(cfg, batch, tokens, dtype, ...)     a full forward without cache (Evaluate / scoring batches,
                                                    fill-mask, finetune steps pass `training=True`)
  check_export(cfg, quant)                          an ONNX export's peak beside the loaded model

Time in the engine: `ModelHandle.stream` / `generate` / `generate.run_generation` take `deadline=`; it is checked
between prefill chunks and before every decode step, and a run past it ends keeping its text with finish_reason
"time" (a deadline passing while still waiting for the model raises TimeBudgetError instead: nothing started).

A request's estimate is what it *adds*: generation and forwards count the cache and activations, not the weights the
loaded model already holds. Each check raises MemoryBudgetError naming the largest parts (e.g. "KV cache 20 GiB").
"""
from __future__ import annotations

import math
import os
import time

from . import limits
from .errors import FornaxError, GenerationError
from .models import family


class MemoryBudgetError(limits.LimitError):
    """A request would need more memory than this deployment's budget."""


class TimeBudgetError(GenerationError, limits.LimitError):
    """A request ran past this deployment's time budget."""


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3


def memory_budget_bytes() -> int:
    """The bytes one request may add: the cap of `backend.limits` (0 = the machine's physical memory)."""
    cap = limits.current().memory_budget_bytes
    return int(cap) if cap > 0 else physical_memory_bytes()


def gib(n: float) -> str:
    return f"{n / 1024**3:,.2f} GiB"


def check_memory(need_bytes: float, what: str, parts: dict[str, float] | None = None) -> None:
    """Refuse `what` when it would need more than the budget; `parts` (name -> bytes) say where the bytes go."""
    if not math.isfinite(need_bytes) or need_bytes < 0:
        raise MemoryBudgetError(f"{what}: its memory could not be estimated ({need_bytes!r} bytes)")
    budget = memory_budget_bytes()
    if need_bytes > budget:
        detail = ""
        if parts:
            detail = " (" + ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v) + ")"
        raise MemoryBudgetError(f"{what} would need about {gib(need_bytes)} of memory{detail} but this "
                                f"{'public' if limits.public_mode() else 'local'} deployment allows "
                                f"{gib(budget)} per request")


class Deadline:
    """A point in (monotonic) time past which work stops: `check()` raises TimeBudgetError naming `what`.

    `Deadline.after(None)` (or 0 seconds) never expires. Pass the object down; do not read the clock elsewhere."""

    def __init__(self, seconds: float | None, what: str = "this request"):
        self.seconds = seconds if seconds and seconds > 0 else None
        self.what = what
        self.at = None if self.seconds is None else time.monotonic() + self.seconds

    @classmethod
    def after(cls, seconds: float | None, what: str = "this request") -> "Deadline":
        return cls(seconds, what)

    @classmethod
    def for_event(cls, what: str = "this request") -> "Deadline":
        """The deployment's per-event time limit (`event_time_limit_s`; none in private mode by default)."""
        return cls(limits.current().event_time_limit_s, what)

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() > self.at

    def remaining(self) -> float:
        return math.inf if self.at is None else max(0.0, self.at - time.monotonic())

    def check(self) -> None:
        if self.expired:
            raise TimeBudgetError(f"{self.what} ran past this deployment's time limit of {self.seconds:g} s and "
                                  f"was stopped")


NO_DEADLINE = Deadline(None)


# --- estimators: bytes from a ModelConfig, before any tensor exists ---

_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "int8": 1}


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype or its name ("float32", torch.bfloat16); unknown -> 4 (fp32)."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_BYTES.get(name, 4)


def param_count(cfg) -> int:
    """Parameters of a model of config `cfg` (every family), from its sizes alone."""
    return family(cfg).param_count(cfg)


def weight_bytes(cfg, dtype="float32") -> int:
    return param_count(cfg) * dtype_bytes(dtype)


def kv_cache_bytes(cfg, batch: int, length: int, dtype="float32") -> int:
    """A static cache of `length` positions for `batch` sequences (an LSTM's cache is its state: no length)."""
    cache = family(cfg).kv_cache
    if cache == "none":
        return 0
    if cache == "state":
        return 2 * cfg.n_layer * batch * cfg.d_model * 4
    return 2 * cfg.n_layer * batch * length * cfg.n_kv_head * cfg.head_dim * dtype_bytes(dtype)


def forward_parts(cfg, batch: int, tokens: int, cache_len: int | None = None, dtype="float32",
                  all_logits: bool = True, training: bool = False) -> dict[str, int]:
    """Activations of one forward over `tokens` positions for `batch` rows, attending to `cache_len` positions
    (None: the tokens themselves, no cache). Inference keeps one layer's intermediates alive at a time; training
    keeps every layer's for the backward pass (and gradients of the logits).

    Attention scores B×H×T×S in fp32 are counted once where attention runs under a mask (a prefill against the
    cache, an encoder's padding mask): an ONNX graph's MatMul -> Softmax and PyTorch's math fallback materialise
    them. A causal forward without cache runs PyTorch's flash kernel, which does not (on CPU too), so none are
    counted there."""
    B, T, S = batch, tokens, cache_len or tokens
    fam = family(cfg)
    scores = cache_len is not None or fam.bidirectional
    b = dtype_bytes(dtype)
    d, f, V = cfg.d_model, cfg.d_ff or 4 * cfg.d_model, cfg.vocab_size
    layers = cfg.n_layer if training else 1
    if fam.kv_cache == "state":  # recurrent: gates and states, no attention
        parts = {"hidden states": 6 * B * T * d * b * layers}
    else:
        nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim or d // cfg.n_head
        gated = fam.mlp_matrices
        repeat = nkv != nh and cache_len is not None  # masked attention repeats K/V per query head
        parts = {"hidden states": 4 * B * T * d * b * layers,
                 "attention (QKV, scores B×H×T×S fp32)": layers * (2 * B * T * (nh + 2 * nkv) * hd * b
                                                              + (B * nh * T * S * 4 + T * S * 4) * scores
                                                              + (2 * B * nh * S * hd * b if repeat else 0)),
                 "MLP": gated * B * T * f * b * layers}
    kept = T if all_logits else 1
    # in the model's dtype, plus the fp32 copy callers take of low-precision logits; training: and their gradients
    parts["logits (fp32)"] = B * kept * V * (b + (4 if b != 4 else 0)) * (3 if training else 1)
    return parts


def generation_parts(cfg, batch: int, prompt_len: int, max_new: int, dtype="float32", chunk: int = 512,
                     cache_len: int | None = None, kv_dtype=None, kv_copies: int = 1,
                     all_prompt_logits: bool = False) -> dict[str, int]:
    """Where one generation's bytes go: its KV cache (`cache_len` positions: the runner's rounded length, default
    prompt + new tokens; `kv_copies` 2 where a runner concatenates a new cache per step), the largest prefill
    chunk's activations against that cache, and the sampler's per-row vocabulary tensors."""
    length = cache_len or prompt_len + max_new
    parts = {"KV cache": kv_copies * kv_cache_bytes(cfg, batch, length, kv_dtype or dtype)}
    T = max(1, min(prompt_len, chunk or prompt_len))
    for name, n in forward_parts(cfg, batch, T, length, dtype, all_logits=all_prompt_logits).items():
        parts[f"prefill {name}"] = n
    parts["sampling"] = 6 * batch * cfg.vocab_size * 4
    return parts


def generation_bytes(cfg, batch: int, prompt_len: int, max_new: int, dtype="float32", chunk: int = 512,
                     **kw) -> int:
    return sum(generation_parts(cfg, batch, prompt_len, max_new, dtype, chunk, **kw).values())


def _check_parts(parts: dict[str, float], what: str) -> None:
    """check_memory on the sum, naming the parts that matter (biggest first, those over 2% of the total)."""
    total = sum(parts.values())
    named = {k: v for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.02 * total}
    check_memory(total, what, named)


def check_generation(cfg, batch: int, prompt_len: int, max_new: int, dtype="float32", chunk: int = 512,
                     what: str = "this generation", **kw) -> None:
    """Refuse a generation whose KV cache + activations pass the budget (before the runner allocates anything)."""
    parts = generation_parts(cfg, batch, prompt_len, max_new, dtype, chunk, **kw)
    samples = f"{batch} sample{'s' * (batch != 1)}"
    _check_parts(parts, f"{what} ({samples} × {prompt_len:,} prompt + {max_new:,} new tokens)")


def check_forward(cfg, batch: int, tokens: int, dtype="float32", what: str = "this forward pass",
                  all_logits: bool = True, training: bool = False, extra: dict[str, float] | None = None) -> None:
    """Refuse a full forward (no cache) of `batch` rows × `tokens` positions past the budget: Evaluate and scoring
    batches, fill-mask / PLL, a finetune step (`training=True`; pass optimizer state etc. in `extra`)."""
    parts = forward_parts(cfg, batch, tokens, None, dtype, all_logits=all_logits, training=training)
    _check_parts({**parts, **(extra or {})}, f"{what} ({batch} × {tokens:,} tokens)")


def load_parts(cfg, dtype="float32", source_dtype=None) -> dict[str, int]:
    """A load's peak: the weights in `dtype`, plus the largest single tensor twice (a fused Q/K/V or gate/up is
    built from its parts, then laid out for decode), plus the source copy when its dtype differs."""
    largest = max(cfg.vocab_size, 2 * (cfg.d_ff or 0), cfg.n_head + 2 * cfg.n_kv_head) * cfg.d_model
    parts = {"weights": weight_bytes(cfg, dtype), "conversion copies": 2 * largest * dtype_bytes(dtype)}
    return parts


def check_load(cfg, dtype="float32", what: str = "loading this model", extra: dict[str, float] | None = None
               ) -> None:
    """Refuse a model whose weights (from its config, before any tensor is read) would not fit the budget."""
    _check_parts({**load_parts(cfg, dtype), **(extra or {})}, what)


# Export's peak beside the loaded model: a multiple of the fp32 weight bytes (the file's pages, the fp32 model, the
# tracer's constants, the ONNX proto and its serialization) over a fixed part for the exporter itself; both
# measured, see docs/playground.md#public-mode-budgets.
EXPORT_PEAK_FACTOR = 4.8
EXPORT_QUANT_FACTOR = 0.25
EXPORT_FIXED_BYTES = 256 * 1024**2


def export_parts(cfg, quant: str = "none") -> dict[str, int]:
    fp32 = weight_bytes(cfg, "float32")
    parts = {"fp32 model, traced graph and ONNX protos": int(EXPORT_PEAK_FACTOR * fp32),
             "the exporter itself": EXPORT_FIXED_BYTES}
    if quant != "none":
        parts["quantizer copies"] = int(EXPORT_QUANT_FACTOR * fp32)
    return parts


def check_export(cfg, quant: str = "none", what: str = "exporting this model") -> None:
    """Refuse an export whose estimated peak (see EXPORT_PEAK_FACTOR) would not fit, before a weight is read."""
    _check_parts(export_parts(cfg, quant), f"{what} ({param_count(cfg):,} parameters, {quant})")

__all__ = ["MemoryBudgetError", "TimeBudgetError", "Deadline", "NO_DEADLINE", "check_memory",
           "memory_budget_bytes", "physical_memory_bytes", "gib", "FornaxError", "dtype_bytes", "param_count",
           "weight_bytes", "kv_cache_bytes", "forward_parts", "generation_parts", "generation_bytes",
           "check_generation", "check_forward", "load_parts", "check_load", "export_parts", "check_export"]
