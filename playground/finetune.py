"""The Finetune tab: start a training job (backend.training.JobManager runs it in its own process), watch it live,
cancel it, and load the result into Chat/Completion.

The page holds no training state: every second it reads the job's state.json through the JobManager, so a reload
(or a second browser) shows the same job where it is, and a job outlives the page that started it.
"""
from __future__ import annotations

import html
import os
import secrets
import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

import backend
from backend.config import PRESETS
from backend.gguf_file import cache_root
from backend.training import DEFAULT_LR, MODES, TASKS, JobManager, TrainConfig
from backend.training.jobs import ACTIVE

POLL_S = 1.0
_manager: JobManager | None = None


def manager() -> JobManager:
    """One job manager for the app, its jobs under the Fornax cache (made on first use)."""
    global _manager
    root = cache_root() / "jobs"
    if _manager is None or _manager.root != root:
        _manager = JobManager(root)
    return _manager


def default_out(mode: str) -> str:
    return str(cache_root() / "finetuned" / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


def server_paths_allowed() -> bool:
    """Typing a path on the server is for your own machine. On a public deployment (a Hugging Face Space sets
    SPACE_ID) it would let a visitor train on, and read back through the samples, any file the server can read."""
    return not (os.environ.get("SPACE_ID") or os.environ.get("FORNAX_NO_SERVER_PATHS"))


def keep_upload(path: str) -> str:
    """Gradio deletes uploads after an hour; a job (and a later resume) needs its data longer: keep a copy."""
    src = Path(path)
    dest = cache_root() / "train-data" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}-{src.name}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return str(dest)


# --- handlers ---------------------------------------------------------------------------------------------------
def start_job(upload, data_path: str, mode: str, task: str, model: str, preset: str, steps: int, lr: float,
              batch_size: int, seq_len: int, lora_r: int, eval_every: int, sample_prompts: str, out: str):
    """Check everything, start the job, and show it. Returns the same outputs as `poll`."""
    uploaded = upload if isinstance(upload, str) and upload else getattr(upload, "name", None)
    data = keep_upload(uploaded) if uploaded else (data_path or "").strip()
    if not data:
        raise gr.Error("choose training data: upload a .txt, .jsonl or .csv file, or type its path",
                       print_exception=False)
    if not uploaded and not server_paths_allowed():
        raise gr.Error("this deployment takes training data as an upload only", print_exception=False)
    if (out or "").strip() and not server_paths_allowed():
        raise gr.Error("this deployment chooses the output folder itself: leave it empty", print_exception=False)
    if not (model or "").strip() and mode != "pretrain":  # empty: the model loaded now, not the one at page build
        from .state import current

        info = current.info()
        if info is None:
            raise gr.Error("no model is loaded to finetune: load one in the Model tab or type its source",
                           print_exception=False)
        model = info["source"]
    prompts = [p.strip() for p in (sample_prompts or "").splitlines() if p.strip()]
    cfg = TrainConfig(data=data, out=(out or "").strip() or default_out(mode), mode=mode, task=task,
                      model=(model or "").strip() or "default", preset=preset, steps=int(steps),
                      lr=float(lr) if lr else None, batch_size=int(batch_size),
                      seq_len=int(seq_len) if seq_len else None, lora_r=int(lora_r), eval_every=int(eval_every),
                      sample_every=max(1, int(steps) // 4), save_every=max(1, int(steps) // 2),
                      sample_prompts=prompts)
    job_id = manager().start(cfg)
    gr.Info(f"training job {job_id} started")
    return poll()


def latest_job(verb: str) -> tuple[str, dict]:
    """The job the tab shows (the latest) and its state, or a plain error that there is none to `verb`."""
    job_id = manager().latest()
    if job_id is None:
        raise gr.Error(f"no training job to {verb}", print_exception=False)
    return job_id, manager().state(job_id)


def cancel_job():
    job_id, state = latest_job("cancel")
    if state["status"] not in ACTIVE:
        raise gr.Error(f"job {job_id} has already ended ({state['status']})", print_exception=False)
    manager().cancel(job_id)
    gr.Info(f"cancelling job {job_id}: it stops and saves a checkpoint at its next step")
    return poll()


def resume_job():
    """Continue the latest job from its newest checkpoint (same settings, same data: the backend checks both)."""
    job_id, state = latest_job("resume")
    if state["status"] in ACTIVE:
        raise gr.Error(f"job {job_id} is still {state['status']}", print_exception=False)
    if state["status"] == "done":
        raise gr.Error(f"job {job_id} has finished: there is nothing to resume", print_exception=False)
    if not any(Path(state["out_dir"]).glob("checkpoint-*")):
        raise gr.Error(f"job {job_id} saved no checkpoint before it ended: start it again instead",
                       print_exception=False)
    new_id = manager().start(TrainConfig.from_dict({**state["config"], "resume": True}))
    gr.Info(f"job {new_id} resumes job {job_id} from its newest checkpoint")
    return poll()


def poll():
    """The latest job as (status HTML, loss plot, samples HTML, result folder): what the page shows each second."""
    job_id = manager().latest()
    if job_id is None:
        return (status_html(None), loss_frame(None), samples_html(None), "")
    try:
        state = manager().state(job_id)
    except backend.FornaxError as e:  # e.g. a state file a crash left unreadable: say so, keep polling
        return (f"<div class='fx-job-error'>{html.escape(str(e))}</div>", None, samples_html(None), "")
    done = state["status"] == "done" and Path(state["out_dir"]).is_dir()
    return status_html(state), loss_frame(state), samples_html(state), state["out_dir"] if done else ""


def watching() -> gr.Timer:
    """The poll timer, on while the latest job is starting or running."""
    job_id = manager().latest()
    try:
        active = job_id is not None and manager().state(job_id)["status"] in ACTIVE
    except backend.FornaxError:
        active = False
    return gr.Timer(active=active)


def poll_and_watch():
    """A poll, and whether to keep polling (for the timer and for a page that has just been (re)loaded)."""
    return (*poll(), watching())


def result_folder(folder: str):
    """'Load into Chat' puts the finished model's folder in the Model tab's box; loading follows."""
    if not folder:
        raise gr.Error("no finished model yet: wait for the job to end with status 'done'", print_exception=False)
    return folder


def mode_changed(mode: str):
    """Pretraining starts from nothing: it needs a preset, not a model; LoRA rank only matters for LoRA."""
    return (gr.update(visible=mode != "pretrain"), gr.update(visible=mode == "pretrain"),
            gr.update(visible=mode == "lora"), gr.update(info=f"0 = {DEFAULT_LR[mode]:g} for {mode}"))


# --- rendering --------------------------------------------------------------------------------------------------
def loss_frame(state: dict | None) -> pd.DataFrame | None:
    """Train and validation loss by step, or None before the first step: Gradio's plot takes its axis kinds and
    series from the first data it sees, so an empty frame (object columns, no series) would leave it blank."""
    rows = []
    if state:
        rows += [(s, loss, "train") for s, loss in state.get("train_loss", [])]
        rows += [(v[0], v[1], "validation") for v in state.get("val_loss", [])]
    if not rows:
        return None
    # ...and its series too: a series missing from that first data (no train step yet, no validation yet) would
    # be drawn without a colour for good. A NaN point names it and draws nothing.
    first = min(r[0] for r in rows)
    rows += [(first, float("nan"), split) for split in ("train", "validation") if split not in {r[2] for r in rows}]
    return pd.DataFrame(rows, columns=["step", "loss", "split"]).astype({"step": "int64", "loss": "float64"})


def status_html(state: dict | None) -> str:
    if state is None:
        return "<div class='fx-empty'>No training job yet. Pick data and a mode, then Start.</div>"
    cfg = state.get("config", {})
    step, total = state.get("step", 0), max(1, state.get("total_steps", 1))
    pct = 100 * step / total
    status = state["status"]
    facts = [f"step <b>{step}</b> / {total}", f"{state.get('tokens_per_s', 0):.0f} tokens/s"]
    if state.get("val_loss"):
        _, loss, ppl = state["val_loss"][-1]
        facts.append(f"validation loss {loss:.3f} · perplexity {ppl:.1f}")
    metrics = state.get("metrics") or {}
    if "accuracy" in metrics:
        facts.append(f"accuracy {100 * metrics['accuracy']:.1f} % · macro-F1 {metrics.get('macro_f1', 0):.3f}"
                     + (f" (majority class {100 * metrics['majority_baseline']:.1f} %)"
                        if "majority_baseline" in metrics else ""))
    elapsed = (state.get("updated") or time.time()) - (state.get("started") or time.time())
    facts.append(f"{elapsed:.0f} s")
    error = (f"<pre class='fx-job-error'>{html.escape(state['error'])}</pre>" if state.get("error") else "")
    message = html.escape(state.get("message") or "")
    return (f"<div class='fx-job' data-job='{html.escape(state['id'])}' data-status='{status}'>"
            f"<div class='fx-job-head'><b>job {html.escape(state['id'])}</b> · {cfg.get('mode', '?')} · "
            f"{cfg.get('task', '?')} · <span class='fx-job-status fx-status-{status}'>{status}</span></div>"
            f"<div class='fx-progress'><span style='width:{pct:.1f}%'></span></div>"
            f"<div class='fx-job-facts'>{' · '.join(facts)}</div>"
            f"<div class='fx-job-message'>{message}</div>"
            f"<div class='fx-job-out'>output: <code>{html.escape(state.get('out_dir', ''))}</code></div>{error}</div>")


def samples_html(state: dict | None) -> str:
    """Each fixed prompt: what the model wrote before training and what it writes now."""
    samples = (state or {}).get("samples") or []
    if not samples:
        return "<div class='fx-empty'>Samples from fixed prompts appear here: before training, then as it learns.</div>"
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s)
    rows = []
    for prompt, runs in by_prompt.items():
        runs.sort(key=lambda s: s["step"])
        before, now = runs[0], runs[-1]
        rows.append(f"<tr><td class='fx-sample-prompt'>{html.escape(prompt)}</td>"
                    f"<td>{html.escape(before['text'])}<div class='fx-step'>step {before['step']}</div></td>"
                    f"<td>{html.escape(now['text'])}<div class='fx-step'>step {now['step']}</div></td></tr>")
    return ("<table class='fx-samples'><thead><tr><th>prompt</th><th>before</th><th>now</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


CSS = """
.fx-job { padding: 6px 2px; }
.fx-job-head { margin-bottom: 6px; }
.fx-job-status { padding: 1px 8px; border-radius: 8px; border: 1px solid var(--border-color-primary); }
.fx-status-running, .fx-status-starting { color: var(--color-accent); }
.fx-status-failed { color: #c0392b; }
.fx-progress { height: 10px; border-radius: 5px; background: var(--border-color-primary); overflow: hidden; }
.fx-progress > span { display: block; height: 100%; background: var(--color-accent); transition: width .4s; }
.fx-job-facts, .fx-job-message, .fx-job-out { font-size: 0.88em; margin-top: 4px;
                                              color: var(--body-text-color-subdued); }
.fx-job-error { white-space: pre-wrap; color: #c0392b; font-size: 12px; max-height: 220px; overflow: auto; }
.fx-samples { width: 100%; font-size: 13px; border-collapse: collapse; }
.fx-samples td, .fx-samples th { border: 1px solid var(--border-color-primary); padding: 6px 8px;
                                 vertical-align: top; white-space: pre-wrap; }
.fx-sample-prompt { font-weight: 600; width: 22%; }
.fx-step { font-size: 11px; color: var(--body-text-color-subdued); margin-top: 4px; }
"""


# --- layout -----------------------------------------------------------------------------------------------------
def build_tab(source: gr.Textbox, load_outputs: list, load_fn, dtype: gr.Dropdown, model_events: dict):
    """The tab's components and events, inside the caller's `gr.Tab`. Loading the result reuses the Model tab's
    load (`load_fn` into `load_outputs`, with the folder put into its `source` box). Returns what the page should
    run when it loads (function, outputs): it shows the latest job and resumes polling if that job is active."""
    gr.Markdown("Train on your own text. **LoRA** adapts the loaded model cheaply, **full** updates every "
                "weight, **pretrain** trains a new tokenizer and a tiny model from nothing. Data: `.txt` (plain "
                "text), `.jsonl` with `{\"messages\": [...]}` (chat; loss on the assistant's turns only) or "
                "`{\"text\", \"label\"}` / `.csv` with `text,label` columns (classification). The job runs in "
                "the background: reload the page and it is still here.")
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Training data (.txt, .jsonl, .csv)", file_types=[".txt", ".jsonl", ".csv"],
                             type="filepath", height=110, elem_id="fx-train-upload")
            data_path = gr.Textbox(label="…or a path on the server", elem_id="fx-train-path")
            with gr.Row():
                mode = gr.Radio(list(MODES), value="lora", label="Mode", elem_id="fx-train-mode")
                task = gr.Dropdown(list(TASKS), value="auto", label="Task", info="auto: from the file")
            model = gr.Textbox(label="Model to finetune", value="", placeholder="empty: the model loaded now",
                               info="default · a model folder · a .gguf path · a Hub id", elem_id="fx-train-model")
            preset = gr.Dropdown([p for p in PRESETS if p.startswith("tiny")] or list(PRESETS), value="tiny-llama",
                                 label="Architecture (pretrain)", visible=False, elem_id="fx-train-preset")
        with gr.Column(scale=2):
            with gr.Row():
                steps = gr.Number(value=100, precision=0, label="Steps", elem_id="fx-train-steps")
                lr = gr.Number(value=0, label="Learning rate", info=f"0 = {DEFAULT_LR['lora']:g} for lora")
                batch_size = gr.Number(value=8, precision=0, label="Batch size")
            with gr.Row():
                seq_len = gr.Number(value=128, precision=0, label="Sequence length", info="0 = the model's")
                lora_r = gr.Number(value=8, precision=0, label="LoRA rank")
                eval_every = gr.Number(value=20, precision=0, label="Validate every", info="steps; 0 = at the end")
            sample_prompts = gr.Textbox(label="Sample prompts (one per line)", lines=2,
                                        placeholder="empty: taken from the validation data")
            out = gr.Textbox(label="Output folder", placeholder="empty: a new folder under the Fornax cache")
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="fx-train-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="fx-train-cancel")
        resume = gr.Button("Resume the last job", elem_id="fx-train-resume")
        load_result = gr.Button("Load the result into Chat / Completion", elem_id="fx-train-load")
    status = gr.HTML(status_html(None), elem_id="fx-train-status")
    plot = gr.LinePlot(loss_frame(None), x="step", y="loss", color="split", title="Loss", height=280,
                       elem_id="fx-loss-plot", x_title="step", y_title="cross-entropy loss",
                       color_map={"train": "#6366f1", "validation": "#f59e0b"})
    samples = gr.HTML(samples_html(None), elem_id="fx-train-samples")
    result = gr.Textbox(visible=False)

    shown = [status, plot, samples, result]
    # The page polls only while a job is active: the timer is switched on by start/resume/page load and off by
    # the first poll that finds the job ended (every open page would otherwise ask once a second, forever).
    timer = gr.Timer(POLL_S, active=False)
    watch = dict(fn=watching, inputs=None, outputs=timer, api_visibility="private", show_progress="hidden")
    mode.change(mode_changed, mode, [model, preset, lora_r, lr], api_visibility="private")
    start.click(user_errors(start_job), [upload, data_path, mode, task, model, preset, steps, lr, batch_size, seq_len,
                                         lora_r, eval_every, sample_prompts, out], shown, api_name="finetune",
                concurrency_limit=1).then(**watch)  # one start at a time (the job manager also locks)
    cancel.click(user_errors(cancel_job), None, shown, api_name="cancel_finetune", concurrency_limit=None)
    resume.click(user_errors(resume_job), None, shown, api_name="resume_finetune", concurrency_limit=1).then(**watch)
    timer.tick(poll_and_watch, None, [*shown, timer], show_progress="hidden", api_visibility="private",
               concurrency_limit=None)
    load_result.click(user_errors(result_folder), result, source, api_visibility="private").success(
        load_fn, [source, dtype], load_outputs, show_progress_on=status, **model_events)
    return poll_and_watch, [*shown, timer]


def user_errors(fn):
    from .ui import user_errors as wrap
    return wrap(fn)


__all__ = ["build_tab", "poll", "start_job", "cancel_job", "manager", "CSS"]
