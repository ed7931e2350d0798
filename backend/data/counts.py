"""Classification counts with numpy: the confusion matrix and what is read from it (accuracy, precision, recall,
F1, the report). The shipped `evaluate` modules (backend/scoring/metrics/) and a finetune's validation both call
these, so there is one definition of each. Bad inputs (empty lists, mismatched counts) raise ScoringError."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ScoringError

AVERAGES = ("macro", "micro")


def check_pairs(predictions: Sequence, references: Sequence, what: str = "predictions") -> None:
    if len(predictions) == 0:
        raise ScoringError(f"no {what} to score: the data is empty")
    if len(predictions) != len(references):
        raise ScoringError(f"{len(predictions)} {what} but {len(references)} references: every prediction needs "
                           f"its reference")


def confusion(predictions: Sequence, references: Sequence, labels: Sequence | None = None
              ) -> tuple[list, np.ndarray]:
    """(labels, matrix) with matrix[i, j] = how many examples of true label i were predicted as label j. The
    labels are those given, else every label seen in either list, sorted."""
    check_pairs(predictions, references)
    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions), key=repr)
    index = {label: i for i, label in enumerate(labels)}
    missing = [x for x in (*references, *predictions) if x not in index]
    if missing:
        raise ScoringError(f"label {missing[0]!r} is not one of the labels {labels}")
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(matrix, (np.array([index[r] for r in references]), np.array([index[p] for p in predictions])), 1)
    return labels, matrix


def accuracy(predictions: Sequence, references: Sequence) -> dict:
    _, matrix = confusion(predictions, references)
    return {"accuracy": float(np.trace(matrix) / matrix.sum())}


def precision_recall_f1(predictions: Sequence, references: Sequence, average: str = "macro",
                        labels: Sequence | None = None) -> dict:
    """Precision, recall and F1. macro: the unweighted mean of the per-label values (a label never predicted has
    precision 0, as scikit-learn's zero_division=0); micro: from the counts pooled over labels (for single-label
    data all three equal accuracy)."""
    if average not in AVERAGES:
        raise ScoringError(f"average must be one of {AVERAGES}, not {average!r}")
    _, matrix = confusion(predictions, references, labels)
    tp = np.diag(matrix).astype(np.float64)              # (L,)
    predicted, actual = matrix.sum(0), matrix.sum(1)     # (L,) column and row totals
    if average == "micro":
        tp, predicted, actual = tp.sum(keepdims=True), predicted.sum(keepdims=True), actual.sum(keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0)
    return {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}


def classification_report(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro- and micro-F1 (over the labels seen), the majority label's share as the chance level, and
    the confusion matrix over all labels (rows: true label, columns: predicted)."""
    names, matrix = confusion(predictions, references, labels)
    majority = max(list(references).count(k) for k in set(references)) / len(references)
    return {"accuracy": accuracy(predictions, references)["accuracy"],
            "macro_f1": precision_recall_f1(predictions, references, "macro")["f1"],
            "micro_f1": precision_recall_f1(predictions, references, "micro")["f1"],
            "majority_baseline": majority, "n": len(references), "labels": list(names),
            "confusion": matrix.tolist()}
