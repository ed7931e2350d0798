"""The same labelled file through a causal LM (label words) and an encoder (classification head), side by side.

    table = classify_comparison(manager.state(causal_job), manager.state(encoder_job))

Each argument is a finished classification run's state: a JobManager job state, the dict `train()` returns, or a
model folder's training.json. The two paths hold out the same rows (training.data.stratified_val_index: same file
content, val_fraction and seed), so their accuracies are comparable; `same_validation` says whether that holds.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import TrainError

KINDS = {"label words": "causal", "classification head": "encoder"}
COLUMNS = ("accuracy", "macro_f1", "majority_baseline", "n")


def _data_digest(path: str | None) -> str | None:
    """The data file's content hash (a job trains on its own kept copy of an upload, so paths differ)."""
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest() if path else None
    except OSError:
        return None


def classify_row(state: dict) -> dict:
    """One run's final classification numbers: kind ("causal" | "encoder"), method, model, mode, accuracy, macro_f1,
    majority_baseline, n (validation rows), the accuracy's margin over the majority label, steps, trainable_params,
    tokens_per_s, status, out_dir, job id."""
    metrics, config = state.get("metrics") or {}, state.get("config") or {}
    if "accuracy" not in metrics or metrics.get("method") not in KINDS:
        raise TrainError(f"run {state.get('id') or state.get('out_dir') or '?'} has no classification metrics: "
                         f"compare finished --task classify runs")
    row = {"kind": KINDS[metrics["method"]], "method": metrics["method"], "model": config.get("model"),
           "mode": config.get("mode"), **{k: metrics.get(k) for k in COLUMNS},
           "margin_over_majority": metrics["accuracy"] - metrics["majority_baseline"],
           "steps": metrics.get("step", state.get("step")), "trainable_params": state.get("trainable_params"),
           "tokens_per_s": state.get("tokens_per_s"), "status": state.get("status"), "out_dir": state.get("out_dir"),
           "job": state.get("id")}
    return row


def classify_comparison(*states: dict) -> dict:
    """{"runs": [classify_row(state) ...] in the order given, "labels": the label set, "same_validation": whether
    every run was scored on the same held-out rows (same data content, val_fraction and seed, same row count),
    "best": the index of the most accurate run}."""
    if not states:
        raise TrainError("no runs to compare")
    rows = [classify_row(s) for s in states]
    keys = set()
    for s, row in zip(states, rows):
        c = s.get("config") or {}
        keys.add((_data_digest(c.get("data")), c.get("val_fraction"), c.get("seed"), row["n"]))
    labels = sorted({label for s in states for label in (_labels(s) or [])})
    best = max(range(len(rows)), key=lambda i: (rows[i]["accuracy"], rows[i]["macro_f1"]))
    return {"runs": rows, "labels": labels, "same_validation": len(keys) == 1 and None not in next(iter(keys)),
            "best": best}


def _labels(state: dict) -> list[str] | None:
    """The label set, from the run's data summary (the file is the reference: both paths read the same rows)."""
    from ..data.records import read_records

    path = (state.get("config") or {}).get("data")
    try:
        return read_records(path, "classify").labels if path else None
    except TrainError:
        return None
