"""A training run's live state (state.json, polled by the job runner and the UI) and its log lines."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from . import checkpoint as ckpt
from .config import TrainConfig

STATE_FILE, CANCEL_FILE = "state.json", "cancel"


class Reporter:
    """The run's live state (the dict the job runner's state.json holds), written atomically at most every
    `interval` seconds and at every event that matters."""

    def __init__(self, cfg: TrainConfig, job_dir: Path | None, on_update: Callable[[dict], None] | None,
                 main: bool = True, interval: float = 0.5):
        self.job_dir, self.on_update, self.main, self.interval = job_dir, on_update, main, interval
        prior = {}
        if job_dir is not None and (job_dir / STATE_FILE).exists():
            try:
                prior = json.loads((job_dir / STATE_FILE).read_text())
            except ValueError:
                prior = {}
        now = time.time()
        self.state = dict(id=prior.get("id", job_dir.name if job_dir else ""), status="starting", step=0,
                          total_steps=cfg.steps, tokens_per_s=0.0, train_loss=[], val_loss=[], samples=[], metrics={},
                          error=None, out_dir=str(Path(cfg.out).expanduser()), config=cfg.to_dict(),
                          started=prior.get("started", now), updated=now, pid=os.getpid(), message="starting",
                          lr=0.0, data=None)
        self._last = 0.0
        self.bar = None  # the tqdm bar of the run (rank 0, `progress`), or None: log lines go to stderr
        self.flush()

    def update(self, force: bool = False, **kw):
        self.state.update(kw)
        if force or time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self):
        self._last = time.monotonic()
        self.state["updated"] = time.time()
        if not self.main:
            return
        if self.job_dir is not None:
            ckpt.write_json_atomic(self.job_dir / STATE_FILE, self.state)
        if self.on_update is not None:
            self.on_update(dict(self.state))

    def history(self) -> dict:
        return {k: self.state[k] for k in ("train_loss", "val_loss", "samples", "metrics")}

    def open_bar(self, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.1 if sys.stderr.isatty() else 5.0)  # a log file gets a line every 5 s

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()  # (later log lines still go through it: tqdm.write)

    def log(self, text: str):
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(f"[fornax] {text}", file=sys.stderr)
