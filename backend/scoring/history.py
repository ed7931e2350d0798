"""The results history: every evaluation appends one row per metric value to one SQLite file under the Fornax
cache (`<cache>/scores.sqlite`), so runs can be compared across time (e.g. perplexity before and after a finetune).

stdlib sqlite3 in WAL mode (readers never block the writer); the schema version is SQLite's `user_version`. One
evaluation's rows are written in one transaction, after every value is computed: bad input writes nothing.

Each row records the visitor it belongs to (a hash; "" for the command line and a local user), so a public
deployment shows every visitor only its own rows (`rows(visitor=...)`). A History made with `visitor` writes rows
as that visitor; without, as $FORNAX_HISTORY_VISITOR (set for a training job by the job manager) or "". """
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import ScoringError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,                  -- the rows of one evaluation share it
    time REAL NOT NULL,                    -- unix seconds
    model TEXT NOT NULL,                   -- the source as given (default, a folder, a .gguf file, a hub id)
    model_fingerprint TEXT NOT NULL,
    backend TEXT NOT NULL,
    data TEXT NOT NULL,                    -- file name (or a description)
    data_fingerprint TEXT NOT NULL,        -- sha256 of the data file's bytes
    metric TEXT NOT NULL,                  -- e.g. perplexity, bleu, rouge.rougeL
    value REAL NOT NULL,
    settings TEXT NOT NULL                 -- JSON: window, sampling parameters, metric options
);
CREATE INDEX IF NOT EXISTS scores_model_metric ON scores (model_fingerprint, metric, time);
"""
# Added to version 1 in place (an older Fornax still reads and writes the file: it names its columns, and this one
# defaults): whose row it is (a visitor's hash; "" = the command line / a local user, and every row from before).
ADD_VISITOR = """
ALTER TABLE scores ADD COLUMN visitor TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS scores_visitor ON scores (visitor, time);
"""


def default_path() -> Path:
    """$FORNAX_SCORES_DB, else scores.sqlite under the Fornax cache (the test suite points it at a temporary file)."""
    from ..disk.caches import cache_root

    override = os.environ.get("FORNAX_SCORES_DB", "").strip()
    return Path(override).expanduser() if override else cache_root() / "scores.sqlite"


def model_fingerprint(handle) -> str:
    """sha256 (first 24 hex digits) of every weight's name, shape, dtype and bytes (row-major, so the runtime layout
    of a weight does not matter): the same weights give the same fingerprint wherever they were loaded from; a
    finetune, or another dtype, gives a new one. ~2 s for a 135M-parameter fp32 model."""
    digest = hashlib.sha256()
    model = getattr(handle, "model", None)
    if model is not None:
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    else:  # an exported graph only: its folder stands for its content (exports are cached by model and precision)
        digest.update(f"onnx:{getattr(handle, 'source', '')}".encode())
    return digest.hexdigest()[:24]


@dataclass
class Row:
    run_id: str
    time: float
    model: str
    model_fingerprint: str
    backend: str
    data: str
    data_fingerprint: str
    metric: str
    value: float
    settings: dict


class History:
    def __init__(self, path: str | Path | None = None, visitor: str | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.visitor = visitor if visitor is not None else os.environ.get("FORNAX_HISTORY_VISITOR", "")

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise ScoringError(f"{self.path} has history schema {version}, newer than this Fornax ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            with conn:
                conn.executescript(SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if "visitor" not in {row[1] for row in conn.execute("PRAGMA table_info(scores)")}:
            try:
                with conn:
                    conn.executescript(ADD_VISITOR)
            except sqlite3.OperationalError as e:  # another process added it in between
                if "duplicate column" not in str(e):
                    raise
        return conn

    def append(self, *, model: str, model_fingerprint: str, backend: str, data: str, data_fingerprint: str,
               values: dict[str, float], settings: dict) -> str:
        """Write one evaluation (one row per metric value) in one transaction; returns its run id."""
        bad = {k: v for k, v in values.items() if not isinstance(v, (int, float)) or v != v}
        if not values or bad:
            raise ScoringError(f"nothing to record: metric values must be numbers, got {bad or values}")
        run_id = hashlib.sha256(f"{time.time_ns()}{model_fingerprint}{data_fingerprint}".encode()).hexdigest()[:16]
        now = time.time()
        rows = [(run_id, now, model, model_fingerprint, backend, data, data_fingerprint, metric, float(value),
                 json.dumps(settings, sort_keys=True, default=str), self.visitor) for metric, value in values.items()]
        with closing(self._connect()) as conn, conn:
            conn.executemany("INSERT INTO scores (run_id, time, model, model_fingerprint, backend, data, "
                             "data_fingerprint, metric, value, settings, visitor) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return run_id

    def rows(self, metric: str | None = None, model_fingerprint: str | None = None, limit: int = 1000,
             visitor: str | None = None) -> list[Row]:
        """Newest first; `visitor`: only that visitor's rows (None: everyone's)."""
        if not self.path.exists():
            return []
        where, args = [], []
        if visitor is not None:
            where.append("visitor = ?")
            args.append(visitor)
        if metric is not None:
            where.append("metric = ?")
            args.append(metric)
        if model_fingerprint is not None:
            where.append("model_fingerprint = ?")
            args.append(model_fingerprint)
        sql = ("SELECT run_id, time, model, model_fingerprint, backend, data, data_fingerprint, metric, value, "
               "settings FROM scores" + (" WHERE " + " AND ".join(where) if where else "") +
               " ORDER BY time DESC, id DESC LIMIT ?")
        with closing(self._connect()) as conn:
            found = conn.execute(sql, [*args, int(limit)]).fetchall()
        return [Row(*r[:9], settings=json.loads(r[9])) for r in found]


def record_finetune(out: str | Path, model: torch.nn.Module, data_path: str | Path, state: dict, settings: dict,
                    history: History | None = None) -> str | None:
    """The end of a finetune as one evaluation of the saved model: its last validation perplexity (and, for a
    classifier, accuracy and macro-F1) on the data file's validation split. Named val_* because the split and the
    blocks are the trainer's, not a perplexity window's. Returns the run id (None when there was no validation)."""
    values = {}
    if state.get("val_loss"):
        values["val_perplexity"] = float(state["val_loss"][-1][2])
    metrics = state.get("metrics") or {}
    values.update({f"val_{k}": float(metrics[k]) for k in ("accuracy", "macro_f1") if k in metrics})
    if not values:
        return None
    data_path = Path(data_path).expanduser()
    return (history or History()).append(
        model=str(out), model_fingerprint=model_fingerprint(SimpleNamespace(model=model)),
        backend="training", data=data_path.name, data_fingerprint=hashlib.sha256(data_path.read_bytes()).hexdigest(),
        values=values, settings={"source": "finetune", **settings})
