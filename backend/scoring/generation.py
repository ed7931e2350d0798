"""Generation-based evaluation: generate an answer to every prompt with given sampling parameters on a chosen
backend, then score the answers against the references (BLEU, chrF, ROUGE, exact match), keeping one row per
example so the worst answers can be read."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..budget import NO_DEADLINE, Deadline
from ..errors import ScoringError
from . import scores

TEXT_METRICS = ("bleu", "chrf", "rouge", "exact_match")


def generate_predictions(handle, prompts: Sequence, backend: str | None = None, sampling: dict | None = None,
                         on_example: Callable[[], None] | None = None, deadline: Deadline = NO_DEADLINE
                         ) -> list[str]:
    """One completion per prompt (a string, or chat messages rendered with the model's template). `deadline`
    ends a generation at its next step and is checked between prompts, raising TimeBudgetError once passed."""
    sampling = dict(sampling or {})
    if sampling.get("num_samples", 1) != 1:
        raise ScoringError("evaluation scores one answer per prompt: num_samples must be 1")
    out = []
    for prompt in prompts:
        deadline.check()
        result = handle.generate(prompt, backend=backend, deadline=deadline, **sampling)
        deadline.check()                       # a run the deadline cut short is no answer to score
        out.append(result.texts[0])
        if on_example is not None:
            on_example()
    return out


def score_generations(predictions: Sequence[str], references: Sequence, metrics: Sequence[str],
                      compute: Callable[..., dict] | None = None) -> tuple[dict, list[dict]]:
    """(corpus values, per-example rows). `compute(name, predictions=, references=)` runs a metric (by default
    the shipped `evaluate` modules); the per-example scores come from the same libraries sentence by sentence."""
    from .modules import compute_metric

    compute = compute or compute_metric
    scores.check_pairs(predictions, references)
    unknown = [m for m in metrics if m not in TEXT_METRICS]
    if unknown or not metrics:
        raise ScoringError(f"generation metrics are {', '.join(TEXT_METRICS)}; not {unknown or 'none'}")
    values: dict[str, float] = {}
    rows = [{"index": i, "prediction": p, "reference": r} for i, (p, r) in enumerate(zip(predictions, references))]
    for name in metrics:
        result = compute(name, predictions=list(predictions), references=list(references))
        if name == "rouge":
            values.update({k: result[k] for k in scores.ROUGE_TYPES if k in result})
            for row, s in zip(rows, scores.rouge_per_example(predictions, references, ("rougeL",))):
                row["rougeL"] = s["rougeL"]
        else:
            values[name] = result[name]
        if name == "chrf":
            for row in rows:
                row["chrf"] = scores.sentence_chrf(row["prediction"], row["reference"])
        elif name == "bleu":
            import sacrebleu

            for row in rows:
                refs = [row["reference"]] if isinstance(row["reference"], str) else row["reference"]
                row["bleu"] = sacrebleu.sentence_bleu(row["prediction"], refs).score
        elif name == "exact_match":
            for row, hit in zip(rows, scores.exact_match_per_example(predictions, references)):
                row["exact_match"] = hit
    return values, rows


def worst_first(rows: list[dict], key: str) -> list[dict]:
    return sorted(rows, key=lambda r: (r.get(key, 0.0), r["index"]))
