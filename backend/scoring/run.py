"""One evaluation of a loaded model on one data file: check everything, compute through the shipped metric modules,
append the values to the history. Used by `python -m backend evaluate` and the playground.

Metrics come in three kinds, each with its data format (see data.py); one evaluation takes metrics of one kind:
- text: perplexity, agreement (two backends of the model on the same windows)
- generation: bleu, chrf, rouge, exact_match
- classify: accuracy, f1, precision, recall (plus macro-/micro-F1 and the confusion matrix in the result)
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from ..budget import NO_DEADLINE, Deadline
from ..errors import ScoringError
from . import caps
from .data import GenerationSet, LabelledSet, TextSet, read_generation_set, read_labelled_set, read_texts

KINDS = {"perplexity": "text", "agreement": "text", "bleu": "generation", "chrf": "generation",
         "rouge": "generation", "exact_match": "generation", "accuracy": "classify", "f1": "classify",
         "precision": "classify", "recall": "classify"}
READERS = {"text": read_texts, "generation": read_generation_set, "classify": read_labelled_set}


def metric_kind(metrics: Sequence[str]) -> str:
    """The one kind of data these metrics need; unknown names and mixed kinds are refused."""
    if not metrics:
        raise ScoringError(f"name at least one metric: {', '.join(KINDS)}")
    unknown = [m for m in metrics if m not in KINDS]
    if unknown:
        raise ScoringError(f"unknown metric {unknown[0]!r}; choose from {', '.join(KINDS)}")
    kinds = {KINDS[m] for m in metrics}
    if len(kinds) > 1:
        raise ScoringError(f"{', '.join(metrics)} need different data ({' and '.join(sorted(kinds))}); run them as "
                           f"separate evaluations")
    return kinds.pop()


def read_data(metrics: Sequence[str], data) -> TextSet | GenerationSet | LabelledSet:
    """The data file read and checked for these metrics (or an already-read set, passed through)."""
    kind = metric_kind(metrics)
    if isinstance(data, (TextSet, GenerationSet, LabelledSet)):
        return data
    return READERS[kind](data)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not progress, leave=False)


def evaluate_model(handle, metrics: Sequence[str], data, *, source: str | None = None, backend: str | None = None,
                   against: str | None = None, max_length: int | None = None, stride: int | None = None,
                   sampling: dict | None = None, average: str = "macro", history=None, progress: bool = False,
                   deadline: Deadline = NO_DEADLINE) -> dict:
    """Score `handle` on `data` (a path or a set from read_data). Returns {"values": {metric: number}, "settings",
    "data", "examples" (per-example rows, where there are), ...}; appends the values to `history` (a History; None =
    the default file, False = none) only once everything has been computed.

    The evaluation's size (rows, labels, characters, forwards, token positions, the largest forward's memory) is
    checked against the deployment's caps before anything is built (scoring/caps.py); `deadline` is checked
    before every forward, so a long evaluation stops with TimeBudgetError and nothing recorded."""
    from .history import History, model_fingerprint

    metrics = list(dict.fromkeys(metrics))
    kind = metric_kind(metrics)
    dataset = read_data(metrics, data)
    runner_name = backend or handle.backend
    settings: dict = {"metrics": metrics}
    out: dict = {}
    if kind == "text":
        values = _score_texts(handle, dataset, metrics, backend, runner_name, against, max_length, stride,
                              settings, out, progress, deadline)
    elif kind == "generation":
        values = _score_generations(handle, dataset, metrics, backend, sampling, settings, out, progress, deadline)
    else:
        values = _score_labels(handle, dataset, metrics, backend, max_length, average, settings, out, progress,
                               deadline)

    settings["backend"] = runner_name
    source = source or handle.source
    if history is not False:
        store = history if history is not None else History()
        out["run_id"] = store.append(model=str(source), model_fingerprint=model_fingerprint(handle),
                                     backend=runner_name, data=dataset.path.name,
                                     data_fingerprint=dataset.fingerprint, values=values, settings=settings)
    return {"values": values, "model": str(source), "backend": runner_name, "data": str(dataset.path),
            "settings": settings, **out}


def _score_texts(handle, dataset: TextSet, metrics, backend, runner_name, against, max_length, stride,
                 settings: dict, out: dict, progress: bool, deadline: Deadline) -> dict:
    """Perplexity and / or backend agreement over sliding windows; fills `settings` and `out`, returns values."""
    from . import perplexity as ppl
    from .modules import compute_metric

    context, vocab = handle.config.max_seq_len, handle.config.vocab_size
    max_length, stride = ppl.check_window(max_length or ppl.default_max_length(context, vocab), stride, context,
                                          vocab)
    settings.update(max_length=max_length, stride=stride)
    token_ids = plan_texts(handle, dataset, metrics, max_length, stride)
    values = {}

    def on_window():
        bar.update(1)
        deadline.check()
    with _bar(ppl.count_windows(token_ids, max_length, stride) * len(metrics), "scoring", progress) as bar:
        if "perplexity" in metrics:
            deadline.check()
            result = compute_metric("perplexity", dataset.texts, model=handle, backend=backend,
                                    max_length=max_length, stride=stride, on_window=on_window)
            values["perplexity"] = result["perplexity"]
            out.update(tokens=result["tokens"], mean_nll=result["mean_nll"], perplexities=result["perplexities"])
        if "agreement" in metrics:
            from .agreement import backend_agreement

            other = against or ("eager" if runner_name != "eager" else None)
            if other is None or other == runner_name:
                raise ScoringError(f"agreement compares two backends: give --against NAME (available: "
                                   f"{', '.join(handle.runner_names())})")
            result = backend_agreement(ppl.handle_logits_fn(handle, runner_name),
                                       ppl.handle_logits_fn(handle, other), token_ids, max_length, stride,
                                       context, on_window=lambda: bar.update(1), deadline=deadline)
            settings["against"] = other
            values.update({k: result[k] for k in ("mean_kl", "top1_agreement", "perplexity_delta")})
            out.update(agreement=result, tokens=result["tokens"])
    return values


def plan_texts(handle, dataset: TextSet, metrics, max_length: int, stride: int) -> list[list[int]]:
    """The texts tokenized (their characters capped first), and their windows' forwards, token positions and
    memory checked against the caps before the first forward."""
    from . import perplexity as ppl

    caps.check_rows(len(dataset.texts))
    caps.check_chars(dataset.texts)
    token_ids = [handle.tokenizer.encode(t) for t in dataset.texts]
    ppl.check_sequences(token_ids, dataset.names)
    passes = len(metrics) + ("agreement" in metrics)   # agreement runs two backends on every window
    caps.check_work(ppl.count_windows(token_ids, max_length, stride) * passes,
                    sum(ppl.window_positions(len(ids), max_length, stride) for ids in token_ids) * passes,
                    "this evaluation")
    caps.check_memory(handle.config, 1, min(max_length, max(map(len, token_ids))), "this evaluation",
                      copies=2 if "agreement" in metrics else 1)
    return token_ids


def _score_generations(handle, dataset: GenerationSet, metrics, backend, sampling, settings: dict, out: dict,
                       progress: bool, deadline: Deadline) -> dict:
    """One answer per prompt, scored against the references; the generations' size capped first."""
    from .generation import generate_predictions, score_generations

    sampling = {"temperature": 0.0, "max_new_tokens": 64, **(sampling or {})}
    settings["sampling"] = sampling
    caps.check_rows(len(dataset.prompts))
    caps.check_chars(dataset.prompts, "the prompts")
    caps.check_chars(dataset.references, "the references")
    new_tokens = max(1, int(sampling.get("max_new_tokens") or 0))   # one forward per new token
    caps.check_work(len(dataset.prompts) * new_tokens,
                    len(dataset.prompts) * min(new_tokens, handle.config.max_seq_len),
                    "this evaluation's generations")
    with _bar(len(dataset.prompts), "generating", progress) as bar:
        predictions = generate_predictions(handle, dataset.prompts, backend, sampling, lambda: bar.update(1),
                                           deadline=deadline)
    values, rows = score_generations(predictions, dataset.references, metrics)
    for row, prompt in zip(rows, dataset.prompts):
        row["prompt"] = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    out["examples"] = rows
    return values


def _score_labels(handle, dataset: LabelledSet, metrics, backend, max_length, average: str, settings: dict,
                  out: dict, progress: bool, deadline: Deadline) -> dict:
    """Each row given the likeliest label; accuracy / F1 / precision / recall and the confusion matrix."""
    from . import perplexity as ppl
    from ..data.counts import AVERAGES, classification_report
    from ..data.labels import label_scores
    from .modules import compute_metric

    if average not in AVERAGES:
        raise ScoringError(f"average must be one of {AVERAGES}, not {average!r}")
    seq_len = min(max_length or ppl.DEFAULT_MAX_LENGTH, handle.config.max_seq_len - 1)
    settings.update(average=average, seq_len=seq_len)
    labels = dataset.label_names
    rows = plan_classification(handle, dataset, labels, seq_len)
    with _bar(len(rows), "classifying", progress) as bar:
        scores = label_scores(ppl.handle_logits_fn(handle, backend), handle.tokenizer, dataset.texts, labels,
                              seq_len, on_batch=bar.update, deadline=deadline, rows=rows)
    predictions = [labels[k] for k in scores.argmax(-1).tolist()]
    values = {}
    for name in metrics:
        options = {} if name == "accuracy" else {"average": average}
        values[name] = compute_metric(name, predictions, dataset.labels, **options)[name]
    out["report"] = classification_report(predictions, dataset.labels, labels)
    out["examples"] = [{"index": i, "text": t, "prediction": p, "reference": g, "correct": float(p == g)}
                       for i, (t, p, g) in enumerate(zip(dataset.texts, predictions, dataset.labels))]
    return values


def plan_classification(handle, dataset: LabelledSet, labels, seq_len: int):
    """The rows × labels of a classification, checked against the caps from their counts (each prompt tokenized
    once, no row built) before the first forward."""
    from ..data.labels import BATCH_ROWS, LabelRows, max_batch_tokens

    caps.check_rows(len(dataset.texts))
    caps.check_labels(labels)
    caps.check_chars(dataset.texts)
    rows = LabelRows(handle.tokenizer, dataset.texts, labels, seq_len)
    caps.check_work(len(rows), rows.tokens, "this classification")
    longest = rows.longest
    batch = max(1, min(BATCH_ROWS, len(rows), max_batch_tokens(handle.tokenizer) // max(1, longest)))
    caps.check_memory(handle.config, batch, longest, "this classification")
    return rows
