"""One streamed generation as the Chat and Completion tabs run it: throttled UI updates, a long prompt's prefill
progress, Stop per user, timings for runs that never finish."""
from __future__ import annotations

import itertools
import threading
import time

import gradio as gr

import backend
from backend.budget import Deadline
from export.attach import ONNX_BACKENDS, attach_onnx

from . import deployment, render
from .errors import refusal

UI_UPDATE_INTERVAL_S = 1 / 15     # stream at most ~15 UI updates a second, however fast tokens come


class StopFlag(threading.Event):
    """Set by Stop (keep what was generated) or by Clear (`discard`: the chat was emptied, show nothing more)."""
    discard = False


# Stop: the running generation of each browser session (or gradio_client) checks its own flag between tokens.
_stop_flags: dict[str, StopFlag] = {}


def session_key(request: gr.Request | None) -> str:
    """A browser session's key (Stop flags); a request without one (an API `/run` call) gets a key of its own, so
    such callers never stop each other's runs. Ownership of anything kept is `deployment.visitor_id`'s."""
    return getattr(request, "session_hash", None) or f"no-session-{id(request)}"


def signal_stop(request: gr.Request | None, discard: bool = False, wait_s: float = 0.0) -> None:
    """Stop this session's running generation; `discard`: and show nothing more of it. `wait_s`: wait (that long
    at most) until the run has ended, so that every update it sent is on its way before the caller's own."""
    key = session_key(request)
    flag = _stop_flags.get(key)
    if flag is not None:
        flag.discard = flag.discard or discard
        flag.set()
        deadline = time.monotonic() + wait_s
        while _stop_flags.get(key) is flag and time.monotonic() < deadline:
            time.sleep(0.02)


class PrefillProgress:
    """How far the engine is into a long prompt: the engine's `prefill_progress(done, total)` writes it (after each
    chunk), the handler reads it to show "ingesting 1,536 / 4,096 tokens" before the first token."""

    def __init__(self):
        self.done = self.total = 0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total


class Generation:
    """One streamed run: throttles UI updates, shows a long prompt's prefill progress, honours Stop, and measures
    TTFT for runs that never finish."""

    def __init__(self, stream: backend.Stream, num_samples: int, request: gr.Request | None,
                 progress: PrefillProgress | None = None, deadline: Deadline | None = None):
        self.stream, self.key = stream, session_key(request)
        self.deadline = deadline or Deadline(None)  # the engine ends the run there (finish reason "time")
        self.progress = progress or PrefillProgress()
        self.texts = [""] * num_samples
        self.stopped = False
        self.started = time.perf_counter()
        self.ttft_s: float | None = None
        self.pieces, self.first_piece_at = 0, None  # text deltas so far (about one per token): a live speed
        self.ingesting = False  # the prompt's prefill is running (in _first_delta's worker)
        self.flag = _stop_flags.setdefault(self.key, StopFlag())  # made by start_stream, which the engine asks

    def status(self) -> str:
        """The stats line while the run goes: the prompt's ingestion until the first token, then "generating"."""
        p = self.progress
        if self.ingesting and p.total:
            return f"*ingesting {p.done:,} / {p.total:,} tokens…*"
        return "*generating…*"

    def updates(self):
        """Yields the sample texts so far: while a long prompt is ingested each time its progress moves, then at
        most every UI_UPDATE_INTERVAL_S, and once more at the end."""
        last = 0.0
        deltas = iter(self.stream)
        try:
            first = yield from self._first_delta(deltas)
            for delta in itertools.chain(first, deltas):
                self.texts[delta.index] += delta.text
                self.pieces += 1
                if self.ttft_s is None:
                    self.first_piece_at = time.perf_counter()
                    self.ttft_s = self.first_piece_at - self.started
                if self.flag.is_set():  # Stop: the engine ends at its next token and flushes; Clear: show nothing
                    self.stopped = True
                    if self.flag.discard:
                        self.stream.close()
                        break
                now = time.perf_counter()
                if now - last >= UI_UPDATE_INTERVAL_S:
                    last = now
                    yield self.texts
        finally:
            self.stream.close()  # also when Gradio abandons the handler (page closed, event cancelled)
            if _stop_flags.get(self.key) is self.flag:
                del _stop_flags[self.key]
        if self.timed_out():
            gr.Warning(f"this generation reached the deployment's time limit of {self.deadline.seconds:g} s and "
                       f"was stopped: the text so far is kept")
        yield self.texts

    def timed_out(self) -> bool:
        """The deployment's event time limit ended the run (finish reason "time")."""
        result = self.stream.result
        return result is not None and any(c.finish_reason == "time" for c in result.completions)

    def live_tok_s(self) -> float | None:
        """Decode speed so far, counting text deltas as tokens (a token that completes no character shows later):
        for the page while the run goes on; the run's own timings replace it at the end."""
        if self.first_piece_at is None or self.pieces < 2:
            return None
        return (self.pieces - 1) / max(time.perf_counter() - self.first_piece_at, 1e-9)

    def _first_delta(self, deltas):
        """The first delta (the prompt's prefill and the first token), taken in a worker thread: the engine reports
        a long prompt's progress from inside that one step, and the page shows it meanwhile (yields the texts each
        time it moves). Returns [first delta], or [] for a run that produced none."""
        got: dict = {}

        def take():
            try:
                got["delta"] = next(deltas)
            except StopIteration:
                pass
            except BaseException as e:  # noqa: BLE001 (re-raised in the handler's thread below)
                got["error"] = e

        worker = threading.Thread(target=take, name="fornax-prefill", daemon=True)
        self.ingesting = True
        worker.start()
        shown = 0
        try:
            while worker.is_alive():
                worker.join(UI_UPDATE_INTERVAL_S)
                if worker.is_alive() and self.progress.done != shown:
                    shown = self.progress.done
                    yield self.texts
        finally:
            worker.join()  # abandoned mid-prefill: the stream can be closed (and its model lock freed) only after
        if "error" in got:
            raise got["error"]
        if self.progress.done != shown:  # the ingestion's end ("4,096 / 4,096") before the first token shows
            yield self.texts
        self.ingesting = False
        return [got["delta"]] if "delta" in got else []

    def stats(self, runner_name: str) -> str:
        if self.stream.result is None:
            return render.stopped_line(self.ttft_s, time.perf_counter() - self.started)
        return render.stats_line(self.stream.result, runner_name)


def start_stream(handle: backend.ModelHandle, prompt_or_messages, runner_name: str | None, params: dict,
                 request: gr.Request | None = None, **extra) -> tuple[Generation, str]:
    """Validates everything (raising before the first UI update) and returns the run and the backend used.
    The engine asks this session's Stop flag before every token, so Stop ends the run with its timings."""
    name = runner_name or handle.backend  # an unknown name is the backend's to reject, naming the ones it has
    preparable = name in handle.runner_names() or name in ONNX_BACKENDS
    if deployment.public() and name not in handle.runners and preparable:
        # An export or a compile holds the model for minutes: on a public server a generation runs on a path that
        # is ready, and a new one is made on purpose (the Backend selector, the Export tab), never as a side effect.
        ready = ", ".join(handle.runners)
        raise refusal(f"the {name} path is not prepared on this server; pick one that is ({ready}), or choose it "
                      f"in the Backend selector to prepare it first")
    if name in ONNX_BACKENDS and name not in handle.runners:
        attach_onnx(handle, ONNX_BACKENDS[name])  # an API caller picked it without the dropdown: export now
    flag, progress = StopFlag(), PrefillProgress()
    # Gradio's time_limit reaches `.stream()` events only: the engine ends the run at the deployment's limit itself.
    deadline = Deadline.for_event("this generation")
    stream = handle.stream(prompt_or_messages, backend=name, should_stop=flag.is_set, prefill_progress=progress,
                           deadline=deadline, **params, **extra)
    _stop_flags[session_key(request)] = flag
    return Generation(stream, params["num_samples"], request, progress, deadline), name


def hold_stop(request: gr.Request | None, flag: StopFlag) -> StopFlag:
    """Make `flag` the one Stop sets for this session while no stream of it runs: between the runs of a job that
    streams several (the Race tab), so a Stop there is not lost."""
    _stop_flags[session_key(request)] = flag
    return flag


def release_stop(request: gr.Request | None, flag: StopFlag) -> None:
    key = session_key(request)
    if _stop_flags.get(key) is flag:
        del _stop_flags[key]


def stop(request: gr.Request = None):
    """Stop this session's running generation (it keeps what it has generated so far)."""
    signal_stop(request)
