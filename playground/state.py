"""The app's one model: loaded, swapped and freed here, shared by every tab and every user.

Gradio's queue already runs model events one at a time (one `concurrency_id`); the lock makes that a guarantee
rather than a configuration detail: a swap waits for the generation in flight, and a generation never sees a
handle that has been freed under it.
"""
from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

import backend
from backend.disk import caches as cache_dir

cache_dir.use_capped_compiler_caches()  # before anything compiles: inductor / Triton caches under the capped cache

# Every Gradio event that loads or runs the model shares this one queue slot (others see their place in the queue).
MODEL_QUEUE = "model"
MODEL_EVENTS = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)

# How long a load waits for a running generation before giving up (a generation is bounded by max_new_tokens).
SWAP_TIMEOUT_S = 600


class ModelSlot:
    def __init__(self):
        self.handle: backend.ModelHandle | None = None
        self.loaded_by: str | None = None   # the visitor who loaded it (None: the operator, `default` or a Hub id)
        self.shown_source: str | None = None  # what the page calls its source (public mode: never a server path)
        # A plain Lock, not an RLock: Gradio resumes a streaming handler on whichever worker thread is free, so the
        # thread that releases may not be the one that acquired.
        self._lock = threading.Lock()

    def info(self) -> dict | None:
        handle = self.handle
        if handle is None:
            return None
        from .deployment import shown_source  # (deployment does not import this module)

        return {**handle.info(), "shown_source": self.shown_source or shown_source(handle.source)}

    def load(self, source: str, dtype: str | None = None,
             progress: Callable[[float, str], None] | None = None, *, owner: str | None = None,
             shown: str | None = None) -> backend.ModelHandle:
        """Load `source`, then swap it in and free the old model. A failed load leaves the old model serving.
        `owner`: the visitor it belongs to (an upload, a finetune result); `shown`: its name on the page."""
        new = backend.load(source, dtype=dtype, progress=progress)  # outside the lock: others keep generating
        if not self._lock.acquire(timeout=SWAP_TIMEOUT_S):
            raise backend.ModelLoadError("the model is busy generating; try loading again when it finishes")
        try:
            old, self.handle = self.handle, new
            self.loaded_by, self.shown_source = owner, shown
        finally:
            self._lock.release()
        if old is not None:
            old.free()
            del old
            gc.collect()  # the old weights are only unreachable once reference cycles are collected
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return new

    def try_hold(self) -> bool:
        """Take the slot if it is free now, without waiting (`release()` gives it back): for a caller that waits
        on an event loop rather than in a worker thread (the OpenAI API)."""
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()

    @contextmanager
    def using(self) -> Iterator[backend.ModelHandle]:
        """The current handle, held for the duration of a generation so a load cannot swap it out mid-stream."""
        self._lock.acquire()
        try:
            if self.handle is None:
                raise backend.GenerationError("no model is loaded: load one in the Model tab first")
            yield self.handle
        finally:
            self._lock.release()


current = ModelSlot()
