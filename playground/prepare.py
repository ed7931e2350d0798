"""Open on the fastest faithful path: after start-up, a background thread finds (or exports) the loaded model's
fastest path that is at least as faithful as llama.cpp (export/fastest.py: the native CPU path, else an ONNX
export), attaches it, and the Backend
selector's default becomes that path. The page is usable on eager meanwhile; a visitor who picked a backend keeps
it. `python -m playground --prepare none` (or FORNAX_PREPARE=none, what the tests use) turns this off.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import backend
from export.attach import attach_onnx
from export.fastest import FAITHFUL_KL, FAST_QUANTS, fastest_faithful

from .state import current

log = logging.getLogger("playground")

MODES = ("fast", "none")
SPEED_TOKENS = 32                 # greedy tokens timed on the prepared path, for the status line
SPEED_PROMPT = "The capital of France is"


def mode(flag: str | None = None) -> str:
    """--prepare when given, else FORNAX_PREPARE, else fast."""
    chosen = (flag or os.environ.get("FORNAX_PREPARE") or "fast").strip().lower()
    if chosen not in MODES:
        raise ValueError(f"--prepare takes {' or '.join(MODES)}, not {chosen!r}")
    return chosen


@dataclass
class Status:
    active: bool = False          # a preparation was started and has not finished
    message: str = ""             # the status line under the Backend selector ("" when preparation is off)
    backend: str | None = None    # the prepared runner's name, once it is attached
    source: str | None = None     # ...to the model loaded from this source
    lines: list[str] = field(default_factory=list)  # every status line so far, in order


status = Status()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def start(handle: backend.ModelHandle, max_kl: float = FAITHFUL_KL, quants: tuple[str, ...] = FAST_QUANTS
          ) -> threading.Thread:
    """Prepare `handle`'s fastest faithful path in a daemon thread; `status` follows it."""
    global _thread, status
    with _lock:
        status = Status(active=True, message="looking for the fastest path as faithful as llama.cpp …",
                        source=handle.source)
        _thread = threading.Thread(target=_prepare, args=(handle, status, max_kl, quants), daemon=True,
                                   name="fornax-prepare")
        _thread.start()
        return _thread


def wait(timeout: float | None = None) -> bool:
    """Wait for the running preparation; True when none is left running."""
    thread = _thread
    if thread is not None:
        thread.join(timeout)
    return not status.active


def _say(st: Status, message: str) -> None:
    st.message = message
    st.lines.append(message)
    print(f"playground: {message}", flush=True)  # the terminal that started it follows along


def _prepare(handle: backend.ModelHandle, st: Status, max_kl: float, quants: tuple[str, ...]) -> None:
    try:
        if handle.device.type != "cpu":  # ONNX Runtime runs on the CPU here; on a GPU the PyTorch paths are faster
            _say(st, f"staying on eager: the model runs on {handle.device.type}, where the PyTorch paths are fastest")
            return
        found = fastest_faithful(handle, max_kl, quants, progress=lambda m: _say(st, m + " …"))
        if found.quant is None:
            _say(st, f"staying on eager: {found.why_not()}")
            return
        with current.using() as now:
            if now is not handle:
                _say(st, f"{found.name} was prepared, but another model has been loaded since")
                return
            # native was prepared on this handle while it was checked; an export is cached: this opens a session
            name = "native" if found.quant == "native" else attach_onnx(now, found.quant)
            greedy = dict(max_new_tokens=SPEED_TOKENS, temperature=0, ignore_eos=True)
            now.generate(SPEED_PROMPT, backend=name, max_new_tokens=2, temperature=0, ignore_eos=True)  # warm-up
            fast = now.generate(SPEED_PROMPT, backend=name, **greedy).timings.decode_tok_s
            eager = now.generate(SPEED_PROMPT, backend="eager", **greedy).timings.decode_tok_s
        st.backend = name
        _say(st, f"{name} ready (KL {found.kl:.2g} ≤ {max_kl:g}, {fast:.0f} tok/s; eager {eager:.0f} tok/s)")
    except Exception as e:  # a background thread: nobody else would see it
        log.exception("preparing the fastest path failed")
        _say(st, f"staying on eager: preparing the fastest path failed ({type(e).__name__}: {e})")
    finally:
        st.active = False


def preferred(model_info: dict | None) -> str | None:
    """The prepared path, if it belongs to the model described by `model_info` and is attached to it."""
    st = status
    if st.backend and model_info and model_info.get("source") == st.source and st.backend in model_info["prepared"]:
        return st.backend
    return None
