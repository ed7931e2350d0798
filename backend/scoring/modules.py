"""The metric modules shipped in metrics/<name>/<name>.py, loaded by path with `evaluate.load` (never from the Hub:
`evaluate` 0.4 ships no modules of its own, and its Hub copies fail offline)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..errors import ScoringError

METRIC_DIR = Path(__file__).resolve().parent / "metrics"
METRICS = ("perplexity", "bleu", "chrf", "rouge", "exact_match", "accuracy", "f1", "precision", "recall")


def metric_path(name: str) -> Path:
    if name not in METRICS:
        raise ScoringError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return METRIC_DIR / name


@lru_cache(maxsize=None)
def load_metric(name: str):
    """The `evaluate.EvaluationModule` of one of our metrics (kept in memory: no Arrow files under the cache)."""
    import evaluate

    return evaluate.load(str(metric_path(name)), keep_in_memory=True)


def compute_metric(name: str, predictions, references=None, **options) -> dict:
    """Run one shipped metric, with our checks first (evaluate's own errors are plain ValueErrors)."""
    from ..data.counts import check_pairs

    module = load_metric(name)
    if name == "perplexity":
        if not predictions:
            raise ScoringError("no text to score: the data is empty")
        return module.compute(predictions=list(predictions), **options)
    check_pairs(predictions, references)
    return module.compute(predictions=list(predictions), references=list(references), **options)
