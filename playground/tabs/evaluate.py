"""The Evaluate tab: score the loaded model on uploaded data or a built-in sample set (perplexity, BLEU / chrF /
ROUGE / exact match, accuracy / F1, backend agreement), see the per-example rows worst first, and the history of
every evaluation as a table and a chart across runs. `build(...)` inside the caller's `gr.Tab` (not yet laid out
in ui.py).

All the work is backend.scoring.run.evaluate_model; uploads are checked against the upload cap; no server paths."""
from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

import backend
from backend.scoring.history import History
from backend.scoring.run import KINDS

from .. import deployment
from ..errors import user_errors
from ..state import current

SAMPLES_DIR = Path(backend.__file__).resolve().parent / "scoring" / "samples"
SAMPLES = {"prose (perplexity, agreement)": "prose.txt", "questions (BLEU, chrF, ROUGE, exact match)": "qa.jsonl",
           "film reviews (accuracy, F1)": "sentiment.csv"}
SAMPLE_METRICS = {"prose.txt": ["perplexity"], "qa.jsonl": ["chrf", "exact_match"], "sentiment.csv": ["accuracy", "f1"]}
HISTORY_ROWS = 500


def history_frames(metric: str | None, request: gr.Request | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table of recent rows, chart rows of one metric) from the history file: in public mode the visitor's own
    rows, models by their shown names."""
    rows = History().rows(limit=HISTORY_ROWS, visitor=deployment.history_filter(request))
    for r in rows:
        r.model = deployment.shown_source(r.model)
    table = pd.DataFrame([{"time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time)), "model": r.model,
                           "backend": r.backend, "data": r.data, "metric": r.metric, "value": round(r.value, 6),
                           "fingerprint": r.model_fingerprint[:8]} for r in rows],
                         columns=["time", "model", "backend", "data", "metric", "value", "fingerprint"])
    chosen = [r for r in reversed(rows) if metric is None or r.metric == metric]
    chart = pd.DataFrame([{"time": pd.Timestamp(r.time, unit="s"), "value": r.value,
                           "series": f"{Path(r.model).name or r.model} [{r.model_fingerprint[:6]}] on {r.data}"}
                          for r in chosen], columns=["time", "value", "series"])
    return table, chart


def run_evaluation(upload, sample: str, metrics: list[str], runner_name: str, against: str, max_length: int,
                   stride: int, max_new_tokens: int, temperature: float, progress=gr.Progress(track_tqdm=True),
                   request: gr.Request = None):
    """Evaluate the loaded model; returns (summary, per-example rows, history table, history chart)."""
    from backend.scoring.generation import worst_first
    from backend.budget import Deadline
    from backend.scoring.run import evaluate_model, read_data

    deadline = Deadline.for_event("this evaluation")  # from the click: the wait for the model counts
    if upload:
        deployment.check_upload(upload, "the data file", request)
    sampling = {"max_new_tokens": int(max_new_tokens or 0), "temperature": float(temperature or 0.0)}
    deployment.check_sampling(sampling, 0)
    path = upload if upload else SAMPLES_DIR / SAMPLES.get(sample, "prose.txt")
    data = read_data(metrics or [], path)                  # bad data is refused before the model is touched
    with current.using() as handle:
        result = evaluate_model(handle, metrics, data, backend=runner_name or None, against=against or None,
                                max_length=int(max_length or 0) or None, stride=int(stride or 0) or None,
                                sampling=sampling, progress=True, deadline=deadline,
                                history=History(visitor=deployment.visitor_key(request)))
    values = " · ".join(f"**{k}** {v:.4g}" for k, v in result["values"].items())
    summary = f"{values}  \n{Path(result['data']).name}, backend {result['backend']}"
    if "tokens" in result:
        summary += f", {result['tokens']} tokens scored"
    if "report" in result:
        report = result["report"]
        summary += (f"  \nmacro-F1 {report['macro_f1']:.3f} · majority baseline {report['majority_baseline']:.3f} · "
                    f"confusion (rows true {report['labels']}, columns predicted): {report['confusion']}")
    examples = result.get("examples", [])
    key = next((k for k in ("chrf", "exact_match", "bleu", "rougeL", "correct") if examples and k in examples[0]),
               None)
    shown = pd.DataFrame(worst_first(examples, key) if key else examples)
    table, chart = history_frames(next(iter(result["values"])), request)
    return summary, shown, table, chart


MAX_VALIDATION_CHARS = 20_000  # scoring a finetune result stays a few seconds on a CPU


def validation_text(config: dict, tokenizer) -> str | None:
    """The validation text of a finetune job on plain text (`lm`): the trainer's own validation blocks, rebuilt
    from the job's data with its tokenizer, split and seed, and decoded. None for chat and classification data."""
    from backend.training import build_data, read_records

    records = read_records(config["data"], config.get("task") or "auto")
    if records.task != "lm" or not config.get("val_fraction"):
        return None
    seq_len = config.get("seq_len") or min(256, config.get("context") or 256)
    val = build_data(records, tokenizer, seq_len, config["val_fraction"], config.get("seed", 0)).val
    if not len(val):
        return None
    ids = val.ids[0].tolist() + [t for block in val.ids[1:] for t in block[1:].tolist()]  # blocks overlap by one
    return tokenizer.decode(ids, skip_special_tokens=True)[:MAX_VALIDATION_CHARS]


def score_finetune(state: dict, job_dir: Path, max_length: int = 256, stride: int = 128,
                   history: History | None = None) -> list[dict]:
    """Perplexity of a finished job's result, and of the model it started from (lora / full), on the job's own
    validation text (or the built-in prose sample), each a history row. The result is loaded by itself (the loaded
    model stays); the base is the loaded model when it is the same source, else loaded for the occasion."""
    from backend.scoring.run import evaluate_model, read_data

    result_handle = backend.load(state["out_dir"])
    try:
        text = validation_text({**state["config"], "context": result_handle.config.max_seq_len},
                               result_handle.tokenizer)
        if text:
            path = job_dir / "validation.txt"
            path.write_text(text, encoding="utf-8")
        else:
            path = SAMPLES_DIR / "prose.txt"
        data = read_data(["perplexity"], path)
        window = dict(max_length=min(max_length, result_handle.config.max_seq_len), stride=stride)
        window["stride"] = min(window["stride"], window["max_length"] // 2)
        window["history"] = history  # (the visitor's rows)
        results = []
        config = state["config"]
        if config.get("mode") != "pretrain":  # the base first, so the chart reads before -> after
            results.append(_score_source(config.get("model") or "default", data, window))
        results.append(evaluate_model(result_handle, ["perplexity"], data, **window))
    finally:
        result_handle.free()
    return results


def _score_source(source: str, data, window: dict) -> dict:
    """Perplexity of a model by source: the loaded model when it is that source, else loaded for the occasion."""
    from backend.scoring.run import evaluate_model

    info = current.info()
    if info is not None and info.get("source") == source:
        with current.using() as handle:
            return evaluate_model(handle, ["perplexity"], data, **window)
    handle = backend.load(source)
    try:
        return evaluate_model(handle, ["perplexity"], data, **window)
    finally:
        handle.free()


def refresh_history(metric: str, request: gr.Request = None):
    table, chart = history_frames(metric or None, request)
    return table, chart


def pick_sample(sample: str):
    return gr.update(value=SAMPLE_METRICS.get(SAMPLES.get(sample, ""), ["perplexity"]))


def build(backends: list[str] | None = None, model_events: dict | None = None) -> dict:
    """The tab's components and events, inside the caller's `gr.Tab`; returns the components by name. Its run is a
    model event (`model_events`: the queue the other tabs' model events share)."""
    gr.Markdown("Score the loaded model. Perplexity uses a sliding window over the text; generation metrics "
                "compare the model's answers with references; classification ranks the labels by likelihood. "
                "Every result is added to the history below.")
    with gr.Row(equal_height=True):
        upload = gr.File(label="Data (.txt / .jsonl / .csv)", file_types=[".txt", ".jsonl", ".csv"], type="filepath",
                         elem_id="fx-eval-upload")
        sample = gr.Dropdown(list(SAMPLES), value=next(iter(SAMPLES)), label="…or a built-in sample set",
                             elem_id="fx-eval-sample")
    with gr.Row(equal_height=True):
        metrics = gr.Dropdown(list(KINDS), value=["perplexity"], multiselect=True, label="Metrics",
                              elem_id="fx-eval-metrics")
        runner_name = gr.Dropdown(backends or [], value=None, allow_custom_value=True, label="Backend",
                                   info="empty = the model's own", elem_id="fx-eval-backend")
        against = gr.Dropdown(backends or [], value=None, allow_custom_value=True, label="Agreement against",
                              elem_id="fx-eval-against")
    with gr.Row(equal_height=True):
        max_length = gr.Number(value=256, precision=0, label="Window (max length, tokens)",
                               elem_id="fx-eval-max-length")
        stride = gr.Number(value=128, precision=0, label="Stride", elem_id="fx-eval-stride")
        max_new_tokens = gr.Number(value=32, precision=0, label="Max new tokens", elem_id="fx-eval-max-new-tokens")
        temperature = gr.Number(value=0.0, label="Temperature (0 = greedy)", elem_id="fx-eval-temperature")
    run = gr.Button("Evaluate", variant="primary", elem_id="fx-eval-run")
    summary = gr.Markdown("", elem_id="fx-eval-summary")
    examples = gr.Dataframe(label="Per example (worst first)", interactive=False, wrap=True, elem_id="fx-eval-examples")
    gr.Markdown("#### History")
    with gr.Row(equal_height=True):
        chart_metric = gr.Dropdown(list(KINDS) + ["rouge1", "rougeL", "mean_kl", "top1_agreement"],
                                   value="perplexity", label="Chart metric", elem_id="fx-eval-chart-metric")
        refresh = gr.Button("Refresh", elem_id="fx-eval-refresh")
    chart = gr.LinePlot(x="time", y="value", color="series", label="Across runs", elem_id="fx-eval-chart")
    history = gr.Dataframe(label="All evaluations (newest first)", interactive=False, elem_id="fx-eval-history")

    sample.change(pick_sample, sample, metrics)
    run.click(user_errors(run_evaluation), [upload, sample, metrics, runner_name, against, max_length, stride,
                                            max_new_tokens, temperature], [summary, examples, history, chart],
              api_name="evaluate", **(model_events or dict(concurrency_id="model", concurrency_limit=1)),
              **deployment.event_options())
    refresh.click(user_errors(refresh_history), chart_metric, [history, chart], api_name="evaluation_history",
                  concurrency_limit=None)
    return {"upload": upload, "sample": sample, "metrics": metrics, "backend": runner_name, "against": against,
            "run": run, "summary": summary, "examples": examples, "chart": chart, "history": history,
            "chart_metric": chart_metric, "refresh": refresh}

