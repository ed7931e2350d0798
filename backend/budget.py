"""One memory budget and one time budget, checked before work starts and between its steps.

Memory: every request that allocates (load, chat, the OpenAI API, Race, Evaluate, export, finetune) estimates its
bytes from the config *before* a tensor exists — weights + KV cache for the requested batch × length + activations
— and `check_memory` refuses it past `limits.current().memory_budget_bytes`. Time: a `Deadline` is made where a
request starts and handed down; the engine and the scoring / export loops call `deadline.check()` between steps, so
a non-streaming event stops on time too (Gradio's own `time_limit` only reaches streaming events).
"""
from __future__ import annotations

import math
import os
import time

from . import limits
from .errors import FornaxError, GenerationError


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

__all__ = ["MemoryBudgetError", "TimeBudgetError", "Deadline", "NO_DEADLINE", "check_memory",
           "memory_budget_bytes", "physical_memory_bytes", "gib", "FornaxError"]
