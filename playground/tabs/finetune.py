"""The Finetune tab: start a training job (backend.training.JobManager runs it in its own process), watch it live
(its loss curves overlaid on the last runs', so an LSTM and a Transformer trained alike compare at a glance),
cancel or resume it, and load the result into the playground.

The page holds no training state: while a job is active it reads the job's state.json through the JobManager each
second, so a reload (or a second browser) shows the same job where it is, and a job outlives the page that started
it. What a job may do (upload copies, output names, sample cadence, path rules, which checkpoint to resume, who
controls it) is the JobManager's policy (`start` / `resume`), which any front end shares; this module turns the form
into its arguments and applies the deployment's caps (deployment.py).
"""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

import backend
from backend.models.config import PRESETS
from backend.disk.caches import cache_root
from backend.scoring.history import History
from backend.training import DEFAULT_LR, MODES, TASKS, JobManager, TrainConfig
from backend.training.compare import KINDS as CLASSIFY_KINDS
from backend.training.compare import classify_comparison
from backend.training.jobs import ACTIVE

from .. import deployment, render
from ..errors import refusal, user_errors
from ..state import current

POLL_S = 1.0
# going beyond this server: the same loop sharded with FSDP2 over several machines (README: Beyond one machine)
FSDP_LAUNCH = ("**Beyond one machine:** the same training runs sharded with FSDP2 under torchrun, e.g. on each of 2 "
               "machines with 8 GPUs: `torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d "
               "--rdzv-endpoint=HOST0:29500 -m backend finetune --strategy fsdp --mode full --model MODEL "
               "--data DATA --out OUT`.")
RUNS_SHOWN = len(render.RUN_SLOTS)  # the loss plot overlays this visitor's last runs (LSTM vs Transformer, say)
PRESET_NOTES = {"tiny-llama": "Transformer (Llama)", "tiny-gpt2": "Transformer (GPT-2)",
                "tiny-bert": "encoder, masked-LM", "tiny-lstm": "LSTM baseline"}
_manager: JobManager | None = None


def manager() -> JobManager:
    """One job manager for the app, its jobs under the Fornax cache (made on first use)."""
    global _manager
    root = cache_root() / "jobs"
    if _manager is None or _manager.root != root:
        _manager = JobManager(root)
    return _manager


def whole(value, name: str) -> int:
    """A whole number from a form box (an API client may send None or text)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise refusal(f"{name} must be a whole number, got {value!r}") from None


# --- handlers ---------------------------------------------------------------------------------------------------
def start_job(upload, data_path: str, mode: str, task: str, model: str, preset: str, steps: int, lr: float,
              batch_size: int, seq_len: int, lora_r: int, eval_every: int, sample_prompts: str, out: str,
              request: gr.Request = None):
    """Check everything, start the job, and show it. Returns the same outputs as `poll`."""
    uploaded = upload if isinstance(upload, str) and upload else getattr(upload, "name", None)
    if not uploaded and not (data_path or "").strip():
        raise refusal("choose training data: upload a .txt, .jsonl or .csv file, or type its path")
    steps, batch_size, lora_r = whole(steps, "steps"), whole(batch_size, "batch size"), whole(lora_r, "LoRA rank")
    deployment.check_training(steps, batch_size, lora_r)
    if uploaded:
        deployment.check_upload(uploaded, "the training data", request)
    if not (model or "").strip() and mode != "pretrain":  # empty: the model loaded now, not the one at page build
        info = current.info()
        if info is None:
            raise refusal("no model is loaded to finetune: load one in the Model tab or type its source")
        # A model another visitor uploaded or trained is theirs: a finetune (whose result is the starter's to load
        # and export) would hand it over.
        owner = current.loaded_by
        if deployment.public() and owner is not None and owner != deployment.visitor_id(request):
            raise refusal("the loaded model was uploaded or trained by another visitor: only they can finetune it; "
                          "type default or a Hub model in the Model box")
        model = info["source"]  # (it passed the deployment's rules when it was loaded)
    elif (model or "").strip() and (mode != "pretrain" or deployment.public()):
        # (pretraining ignores the box, but a typed path still gets the one refusal: no oracle of what exists)
        model = deployment.check_source(model.strip(), request)
    prompts = [p.strip() for p in (sample_prompts or "").splitlines() if p.strip()]
    cfg = TrainConfig(data=(data_path or "").strip(), out=(out or "").strip(), mode=mode, task=task,
                      model=(model or "").strip() or "default", preset=preset, steps=steps,
                      lr=float(lr) if lr else None, batch_size=batch_size,
                      seq_len=whole(seq_len, "sequence length") if seq_len else None, lora_r=lora_r,
                      eval_every=whole(eval_every, "validate every"), sample_prompts=prompts)
    job_id = manager().start(cfg, upload=uploaded or None, server_paths=not deployment.public(), paced=True,
                             owner=deployment.job_owner(request))
    gr.Info(f"training job {job_id} started")
    return poll(request)


def latest_job(verb: str, request: gr.Request | None) -> str:
    """The job the tab shows (this visitor's latest), or a plain error that there is none to `verb`."""
    job_id = manager().latest(deployment.job_owner(request))
    if job_id is None:
        raise refusal(f"no training job of yours to {verb}" if deployment.public() else f"no training job to {verb}")
    return job_id


def cancel_job(request: gr.Request = None):
    job_id = latest_job("cancel", request)
    status = manager().state(job_id)["status"]
    if status not in ACTIVE:
        raise refusal(f"job {job_id} has already ended ({status})")
    manager().cancel(job_id, owner=deployment.job_owner(request))
    gr.Info(f"cancelling job {job_id}: it stops and saves a checkpoint at its next step")
    return poll(request)


def resume_job(request: gr.Request = None):
    """Continue the latest job from its newest checkpoint (same settings, same data: the backend checks both)."""
    job_id = latest_job("resume", request)
    new_id = manager().resume(job_id, owner=deployment.job_owner(request))
    gr.Info(f"job {new_id} resumes job {job_id} from its newest checkpoint")
    return poll(request)


def someone_elses_active_job(request: gr.Request | None) -> str | None:
    """A job that is running for another visitor (public mode): shown as running, nothing more."""
    owner = deployment.job_owner(request)
    for job_id in reversed(manager().jobs()):
        if not manager().may_control(job_id, owner):
            try:
                if manager().state(job_id)["status"] in ACTIVE:
                    return job_id
            except backend.FornaxError:
                continue
    return None


def own_states(owner: str | None):
    """The states of the jobs this visitor may see, newest first (a job whose state cannot be read is skipped)."""
    for job_id in reversed(manager().jobs()):
        if manager().may_control(job_id, owner):
            try:
                yield manager().state(job_id)
            except backend.FornaxError:
                continue


def recent_runs(owner: str | None) -> list[dict]:
    """The states of this visitor's last runs, newest first, at most RUNS_SHOWN: the latest job always (a job just
    started keeps its slot while it has no loss yet), earlier ones if they have losses to plot. A job continued by a
    resume is left out: the resumed job (same output folder) carries its losses over."""
    runs: list[dict] = []
    for state in own_states(owner):
        if runs and not (state.get("train_loss") or state.get("val_loss")):
            continue
        if any(r.get("out_dir") == state.get("out_dir") for r in runs):
            continue
        runs.append(state)
        if len(runs) == RUNS_SHOWN:
            break
    return runs


def poll(request: gr.Request = None):
    """This visitor's latest job as (status HTML, loss plot, samples HTML, result folder): what the page shows
    each second; the plot overlays the last runs' losses. Another visitor's running job is only named as running."""
    owner = deployment.job_owner(request)
    job_id = manager().latest(owner)
    if job_id is None:
        other = someone_elses_active_job(request)
        return (render.job_status_html(None, someone_else=other is not None), None,
                render.job_samples_html(None), "")
    try:
        state = manager().state(job_id)
    except backend.FornaxError as e:  # e.g. a state file a crash left unreadable: say so, keep polling
        return (f"<div class='fx-job-error'>{html.escape(str(e))}</div>", render.runs_frame(recent_runs(owner)),
                render.job_samples_html(None), "")
    done = state["status"] == "done" and Path(state["out_dir"]).is_dir()
    result = (deployment.JOB_SOURCE + job_id if deployment.public() else state["out_dir"]) if done else ""
    return (render.job_status_html(shown_state(state)), render.runs_frame(recent_runs(owner)),
            render.job_samples_html(state), result)


def shown_state(state: dict) -> dict:
    """A job's state as the page may show it: in public mode no server folder (the output is named by the job,
    paths in messages by their last part)."""
    if not deployment.public():
        return state
    from ..errors import without_paths

    return {**state, "out_dir": f"your result (job {state.get('id', '')})",
            "message": without_paths(state.get("message") or ""),
            "error": without_paths(state["error"]) if state.get("error") else state.get("error"),
            "config": {k: v for k, v in (state.get("config") or {}).items() if k in ("mode", "task")}}


def watching(request: gr.Request = None) -> gr.Timer:
    """The poll timer, on while this visitor's latest job (or, in public mode, anyone's) is starting or running."""
    job_id = manager().latest(deployment.job_owner(request))
    try:
        active = job_id is not None and manager().state(job_id)["status"] in ACTIVE
    except backend.FornaxError:
        active = False
    return gr.Timer(active=active or someone_elses_active_job(request) is not None)


def runs_legend(request: gr.Request = None) -> str:
    """Which run each colour of the loss plot is."""
    return render.runs_legend_html(recent_runs(deployment.job_owner(request)))


def legend_and_watch(request: gr.Request = None):
    return runs_legend(request), watching(request)


def poll_and_watch(request: gr.Request = None):
    """A poll, the plot's legend, and whether to keep polling (for the timer and for a page that has just been
    (re)loaded)."""
    return (*poll(request), runs_legend(request), watching(request))


def result_folder(folder: str, request: gr.Request = None):
    """'Load into Chat' puts the finished model's folder in the Model tab's box; loading follows."""
    if not folder:
        raise refusal("no finished model yet: wait for the job to end with status 'done'")
    if deployment.public():  # only its own finished result, which it may then load by its job's name
        job_id = manager().latest(deployment.job_owner(request))
        state = manager().state(job_id) if job_id else {}
        if folder != deployment.JOB_SOURCE + str(job_id) or state.get("status") != "done":
            raise refusal("no finished model yet: wait for the job to end with status 'done'")
        return deployment.grant(request, state["out_dir"], shown=folder)
    return folder


def score_result(request: gr.Request = None):
    """'Score the result': perplexity of the finished job's model (and of the model it started from) on the job's
    own validation text, into the Evaluate tab's history. Returns (summary, history table, history chart)."""
    from . import evaluate

    job_id = latest_job("score", request)
    state = manager().state(job_id)
    if state["status"] != "done" or not Path(state["out_dir"]).is_dir():
        raise refusal("no finished model yet: wait for the job to end with status 'done'")
    results = evaluate.score_finetune(state, manager().job_dir(job_id),
                                      history=History(visitor=deployment.visitor_key(request)))
    lines = [f"**perplexity** {r['values']['perplexity']:.4g} · {html.escape(Path(r['model']).name or r['model'])}"
             for r in results]
    where = Path(results[-1]["data"]).name
    summary = "  \n".join(lines) + f"  \non {where} ({results[-1]['tokens']} tokens); added to the Evaluate tab's history"
    table, chart = evaluate.history_frames("perplexity", request)
    return summary, table, chart


def compare_classifiers(request: gr.Request = None) -> str:
    """'Compare: causal LM vs encoder': this visitor's latest finished classification run by label words (a causal
    LM) and by a classification head (an encoder), side by side (backend.training.compare), as Markdown."""
    owner, latest = deployment.job_owner(request), {}
    for state in own_states(owner):
        if len(latest) == 2:
            break
        kind = CLASSIFY_KINDS.get((state.get("metrics") or {}).get("method"))
        if state.get("status") == "done" and kind and kind not in latest:
            latest[kind] = state
    missing = [k for k in ("causal", "encoder") if k not in latest]
    if missing:
        how = {"causal": "a causal LM (label words: LoRA or full on a Llama / GPT-2 model)",
               "encoder": "an encoder (a BERT folder as the model: a classification head)"}
        raise refusal("to compare, first finish a classification run (task classify, or a text,label file) with "
                      + " and with ".join(how[k] for k in missing))
    return render.classify_comparison_md(classify_comparison(latest["causal"], latest["encoder"]))


def mode_changed(mode: str):
    """Pretraining starts from nothing: it needs a preset, not a model; LoRA rank only matters for LoRA."""
    return (gr.update(visible=mode != "pretrain"), gr.update(visible=mode == "pretrain"),
            gr.update(visible=mode == "lora"), gr.update(info=f"0 = {DEFAULT_LR[mode]:g} for {mode}"))


def preset_choices() -> list[tuple[str, str]]:
    """The tiny presets (a Transformer, an encoder, the LSTM baseline), each with what it is."""
    tiny = [p for p in PRESETS if p.startswith("tiny")] or list(PRESETS)
    return [(f"{p} — {PRESET_NOTES[p]}" if p in PRESET_NOTES else p, p) for p in tiny]


# --- layout -----------------------------------------------------------------------------------------------------
def build(source: gr.Textbox, load_outputs: list, load_fn, dtype: gr.Dropdown, model_events: dict,
          history_outputs: list | None = None):
    """The tab's components and events, inside the caller's `gr.Tab`. Loading the result reuses the Model tab's
    load (`load_fn` into `load_outputs`, with the folder put into its `source` box). Returns what the page should
    run when it loads (function, outputs): it shows the latest job and resumes polling if that job is active.
    `history_outputs`: the Evaluate tab's (history table, chart), which 'Score the result' updates."""
    gr.Markdown("Train on your own text. **LoRA** adapts the loaded model cheaply, **full** updates every "
                "weight, **pretrain** trains a new tokenizer and a tiny model from nothing. Data: `.txt` (plain "
                "text), `.jsonl` with `{\"messages\": [...]}` (chat; loss on the assistant's turns only) or "
                "`{\"text\", \"label\"}` / `.csv` with `text,label` columns (classification). The job runs in "
                "the background: reload the page and it is still here.")
    gr.Markdown(FSDP_LAUNCH, elem_id="fx-train-fsdp")
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Training data (.txt, .jsonl, .csv)", file_types=[".txt", ".jsonl", ".csv"],
                             type="filepath", height=110, elem_id="fx-train-upload")
            data_path = gr.Textbox(label="…or a path on the server", elem_id="fx-train-path", visible=not deployment.public())
            with gr.Row():
                mode = gr.Radio(list(MODES), value="lora", label="Mode", elem_id="fx-train-mode")
                task = gr.Dropdown(list(TASKS), value="auto", label="Task", info="auto: from the file")
            model = gr.Textbox(label="Model to finetune", value="", placeholder="empty: the model loaded now",
                               info="default · a model folder · a .gguf path · a Hub id", elem_id="fx-train-model")
            preset = gr.Dropdown(preset_choices(), value="tiny-llama", label="Architecture (pretrain)",
                                 visible=False, elem_id="fx-train-preset",
                                 info="same data, same steps: compare their curves on the plot below")
        with gr.Column(scale=2):
            with gr.Row():
                steps = gr.Number(value=100, precision=0, label="Steps", elem_id="fx-train-steps")
                lr = gr.Number(value=0, label="Learning rate", info=f"0 = {DEFAULT_LR['lora']:g} for lora")
                batch_size = gr.Number(value=8, precision=0, label="Batch size", elem_id="fx-train-batch")
            with gr.Row():
                seq_len = gr.Number(value=128, precision=0, label="Sequence length", info="0 = the model's",
                                    elem_id="fx-train-seq-len")
                lora_r = gr.Number(value=8, precision=0, label="LoRA rank")
                eval_every = gr.Number(value=20, precision=0, label="Validate every", info="steps; 0 = at the end",
                                       elem_id="fx-train-eval-every")
            sample_prompts = gr.Textbox(label="Sample prompts (one per line)", lines=2,
                                        placeholder="empty: taken from the validation data")
            out = gr.Textbox(label="Output folder", placeholder="empty: a new folder under the Fornax cache", visible=not deployment.public())
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="fx-train-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="fx-train-cancel")
        resume = gr.Button("Resume the last job", elem_id="fx-train-resume")
        load_result = gr.Button("Load the result", elem_id="fx-train-load")
        score = gr.Button("Score the result", visible=False, elem_id="fx-train-score")
        compare = gr.Button("Compare: causal LM vs encoder", elem_id="fx-train-compare")
    score_summary = gr.Markdown("", elem_id="fx-train-score-summary")
    comparison = gr.Markdown("", elem_id="fx-train-comparison")
    status = gr.HTML(render.job_status_html(None), elem_id="fx-train-status")
    plot = gr.LinePlot(None, x="step", y="loss", color="split", title=f"Loss: your last {RUNS_SHOWN} runs",
                       height=300, elem_id="fx-loss-plot", x_title="step", y_title="cross-entropy loss",
                       color_title="run", color_map=render.RUNS_COLOR_MAP, colors_in_legend=[])
    legend = gr.HTML("", elem_id="fx-runs-legend")
    samples = gr.HTML(render.job_samples_html(None), elem_id="fx-train-samples")
    result = gr.Textbox(visible=False)

    shown = [status, plot, samples, result]
    # The page polls only while a job is active: the timer is switched on by start/resume/page load and off by
    # the first poll that finds the job ended (every open page would otherwise ask once a second, forever).
    timer = gr.Timer(POLL_S, active=False)
    watch = dict(fn=legend_and_watch, inputs=None, outputs=[legend, timer], api_visibility="private",
                 show_progress="hidden")
    mode.change(mode_changed, mode, [model, preset, lora_r, lr], api_visibility="private")
    start.click(user_errors(start_job), [upload, data_path, mode, task, model, preset, steps, lr, batch_size, seq_len,
                                         lora_r, eval_every, sample_prompts, out], shown, api_name="finetune",
                concurrency_limit=1).then(**watch)  # one start at a time (the job manager also locks)
    cancel.click(user_errors(cancel_job), None, shown, api_name="cancel_finetune", concurrency_limit=None)
    resume.click(user_errors(resume_job), None, shown, api_name="resume_finetune", concurrency_limit=1).then(**watch)
    timer.tick(poll_and_watch, None, [*shown, legend, timer], show_progress="hidden", api_visibility="private",
               concurrency_limit=None)
    load_result.click(user_errors(result_folder), result, source, api_visibility="private").success(
        load_fn, [source, dtype], load_outputs, show_progress_on=status, **model_events)
    result.change(lambda folder: gr.update(visible=bool(folder)), result, score, api_visibility="private",
                  show_progress="hidden")
    compare.click(user_errors(compare_classifiers), None, comparison, api_name="compare_classifiers",
                  show_progress_on=comparison, concurrency_limit=None)
    score.click(user_errors(score_result), None, [score_summary, *(history_outputs or [gr.State(), gr.State()])],
                api_name="score_finetune", show_progress_on=score_summary, **model_events)
    return poll_and_watch, [*shown, legend, timer]

