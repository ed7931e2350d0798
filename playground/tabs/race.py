"""The Race tab: one prompt on several execution paths of the loaded model (eager, compiled, the ONNX exports
attached to it), one after another with the same seed and settings, each streaming into its own column with its
live speed; then a chart of decode and prefill tok/s per path, and each path's text against the first path's with
the first differing token on highlighted (backend/bench/token_diff.py finds it)."""
from __future__ import annotations

import html
import random

import gradio as gr
import pandas as pd

from backend.budget import Deadline
from backend.bench.token_diff import divergence

from .. import deployment, prepare, render
from ..errors import refusal, user_errors
from ..state import MODEL_EVENTS, current
from ..streaming import StopFlag, hold_stop, release_stop, session_key, start_stream
from .params import Panel, sampling_kwargs

MAX_PATHS = 6                     # columns built up front (hidden until used): every path a model can have
DEFAULT_PROMPT = "The history of the printing press"
WARM_UP_TOKENS = 2                # one short run per path first: compiling, sessions and caches are not raced
# Greedy is pure argmax: the panel's penalties and filters would change what "the most likely token" means.
GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
              frequency_penalty=0.0)

_racing: set[str] = set()         # browser sessions (or API clients) with a race running: one at a time each


def label(name: str) -> str:
    return render.BACKEND_LABELS.get(name, name)


def path_choices(info: dict | None) -> list[tuple[str, str]]:
    return [(label(n), n) for n in (info or {}).get("runners", [])]


def default_paths(info: dict | None) -> list[str]:
    """The paths ready now, eager first and the start-up's prepared fast path beside it (compiling or exporting
    another on first use takes minutes: the visitor ticks it on purpose)."""
    ready = list((info or {}).get("prepared", []))
    ready.sort(key=lambda n: (n != "eager", n != prepare.preferred(info)))
    return ready[:MAX_PATHS]


def refresh_paths(selected: list[str] | None, touched: bool = False):
    """The loaded model's paths (another tab may have loaded a model, attached an export, or the start-up
    preparation may have finished since). A selection the visitor made stands; an untouched one follows the
    defaults, so the prepared path shows up ticked once it is ready."""
    info = current.info()
    names = [n for _, n in path_choices(info)]
    kept = [n for n in selected or [] if n in names] if touched else []
    return gr.update(choices=path_choices(info), value=kept or default_paths(info))


def ordered_paths(paths, available: list[str]) -> list[str]:
    """The ticked paths in the model's own order (eager first), checked against what it has."""
    if isinstance(paths, str):
        paths = [paths]
    unknown = [p for p in paths or [] if p not in available]
    if unknown:
        raise refusal(f"this model has no path {', '.join(map(repr, unknown))}; it has {', '.join(available)}")
    chosen = [p for p in available if p in (paths or [])]
    if not chosen:
        raise refusal("tick at least one path to race")
    if len(chosen) > MAX_PATHS:
        raise refusal(f"at most {MAX_PATHS} paths race at once")
    return chosen


def race_params(greedy: bool, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                presence_penalty, frequency_penalty, stop, seed) -> dict:
    """Settings every path runs with: the panel's (or pure greedy), one sample, and one seed for all of them."""
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                             frequency_penalty, stop, seed, 1)
    if greedy:
        params.update(GREEDY)
    if params["seed"] is None:  # "random": drawn once, so that every path samples with the same one
        params["seed"] = random.randrange(2**31 - 1)
    return params


class Board:
    """What the page shows: a column per path (label with its speed, text), the charts, the comparison."""

    def __init__(self, paths: list[str], tokenizer):
        self.paths, self.tokenizer = paths, tokenizer
        self.labels = [f"{label(p)} · waiting" for p in paths]
        self.texts = [""] * len(paths)
        self.results = {}  # path -> GenerationResult

    def columns(self) -> list:
        shown = [gr.Textbox(value=t, label=lab, visible=True) for lab, t in zip(self.labels, self.texts)]
        return shown + [gr.Textbox(value="", visible=False) for _ in range(MAX_PATHS - len(shown))]

    def updates(self, summary: str, final: bool = False, first: bool = False) -> list:
        if first:  # the last race's charts and comparison go
            return [*self.columns(), None, None, "<div class='fx-empty'>racing…</div>", summary]
        if not final:
            return [*self.columns(), gr.skip(), gr.skip(), gr.skip(), summary]
        order = [label(p) for p in self.results]  # bars in race order, not alphabetical
        decode, prefill = (gr.BarPlot(value=frame, sort=order) for frame in speed_frames(self.results))
        return [*self.columns(), decode, prefill, comparison_html(self.results, self.tokenizer), summary]


def speed_frames(results: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode and prefill tok/s per path, for the two bar charts (paths in race order)."""
    # (not a column called "path": gradio_client takes any {"path": ...} in a result for a file to download)
    rows = [(label(p), r.timings.decode_tok_s, r.timings.prefill_tok_s) for p, r in results.items()]
    return (pd.DataFrame({"backend": [r[0] for r in rows], "tok/s": [r[1] for r in rows]}),
            pd.DataFrame({"backend": [r[0] for r in rows], "tok/s": [r[2] for r in rows]}))


def comparison_html(results: dict, tokenizer) -> str:
    """Each path's text against the first path's: the shared part plain, the rest from the first differing token
    on highlighted. Every row is its tokens decoded the same way (a column's streamed text may hold back a
    half character at the end)."""
    if not results:
        return "<div class='fx-empty'>no path finished</div>"
    (first, ref), *others = results.items()
    ref_ids = ref.completions[0].token_ids
    rows = [f"<tr><th>{html.escape(label(first))}</th><td>the reference · {len(ref_ids)} tokens</td>"
            f"<td class='fx-race-text'>{html.escape(divergence(tokenizer, ref_ids, ref_ids).agreed)}</td></tr>"]
    for name, result in others:
        ids = result.completions[0].token_ids
        d = divergence(tokenizer, ref_ids, ids)
        where = (f"identical ({len(ids)} tokens)" if d.index is None else
                 f"differs from token {d.index + 1} of {len(ids)}")
        rows.append(f"<tr data-diverges-at='{'' if d.index is None else d.index}'><th>{html.escape(label(name))}</th>"
                    f"<td>{where}</td><td class='fx-race-text'>{html.escape(d.agreed)}"
                    f"<mark class='fx-race-diff'>{html.escape(d.rest)}</mark></td></tr>")
    return f"<table class='fx-race-compare'>{''.join(rows)}</table>"


def done_label(name: str, result) -> str:
    t = result.timings
    return f"{label(name)} · decode {t.decode_tok_s:.1f} tok/s · prefill {t.prefill_tok_s:.0f} tok/s · " \
           f"{t.new_tokens} tokens"


@user_errors
def race(prompt: str, paths: list[str], greedy: bool, runner_name: str, max_new_tokens: int, temperature: float,
         top_k: int, top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
         frequency_penalty: float, stop: list, seed: int | None, num_samples: int = 1, request: gr.Request = None):
    """Run `prompt` on each of `paths` in turn with the same settings; streams the columns (one per path), the
    decode and prefill speed charts, the comparison (HTML) and a summary line. `runner_name` and `num_samples`
    are the panel's and not used: every path runs, one sample each."""
    if not prompt or not prompt.strip():
        raise refusal("the prompt is empty: write something for the paths to continue")
    params = race_params(greedy, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                         presence_penalty, frequency_penalty, stop, seed)
    deployment.check_sampling(params, len(prompt))
    key = session_key(request)
    if key in _racing:
        raise refusal("a race is already running for you: wait for it to finish, or Stop it")
    _racing.add(key)
    race_flag = StopFlag()  # Stop between two paths (or during a warm-up) ends the race there
    try:
        with current.using() as handle:
            order = ordered_paths(paths, handle.runner_names())
            unprepared = [p for p in order if p not in handle.runners]
            if deployment.public() and unprepared:  # its warm-up would compile or export under the model lock
                raise refusal(f"not prepared on this server: {', '.join(unprepared)}; race the prepared paths "
                              f"({', '.join(handle.runners)}), or pick one in the Backend selector to prepare it")
            board = Board(order, handle.tokenizer)
            how = "greedy" if greedy else f"temperature {params['temperature']}"
            summary = f"{how} · seed {params['seed']} · up to {params['max_new_tokens']} new tokens per path"
            for i, name in enumerate(order):
                hold_stop(request, race_flag)
                board.labels[i] = f"{label(name)} · warming up…"
                yield board.updates(f"*{name}: warming up…* · {summary}", first=i == 0)
                handle.generate(prompt, backend=name, max_new_tokens=WARM_UP_TOKENS, temperature=0,
                                ignore_eos=True, should_stop=race_flag.is_set,
                                deadline=Deadline.for_event("this race's warm-up"))
                if race_flag.is_set():
                    break
                run, _ = start_stream(handle, prompt, name, params, request)
                for texts in run.updates():
                    rate = run.live_tok_s()
                    board.texts[i] = texts[0]
                    board.labels[i] = f"{label(name)} · " + (f"≈ {rate:.0f} tok/s" if rate else "prefill…")
                    yield board.updates(f"*{name}:* {run.status()} · {summary}")
                board.texts[i] = run.texts[0]
                stream = run.stream
                if stream.result is not None:
                    board.results[name] = stream.result
                    board.labels[i] = done_label(name, stream.result)
                if run.stopped or run.flag.is_set():  # Stop during this path: the rest do not run
                    break
            stopped = len(board.results) < len(order)
            yield board.updates(("**stopped** · " if stopped else "") + summary, final=True)
    finally:
        release_stop(request, race_flag)
        _racing.discard(key)


RACE_CSS = """
.fx-race-compare { width: 100%; border-collapse: collapse; font-size: 14px; }
.fx-race-compare th, .fx-race-compare td { text-align: left; vertical-align: top; padding: 4px 8px;
  border-bottom: 1px solid #e5e7eb; }
.fx-race-compare th { white-space: nowrap; }
.fx-race-text { white-space: pre-wrap; }
mark.fx-race-diff { background: #fde68a; color: inherit; }
"""


def build(panel: Panel, tab: gr.Tab) -> gr.Button:
    """The tab's components and events, inside `tab`. Returns its Stop button."""
    info = current.info()
    gr.Markdown("One prompt on several execution paths of the loaded model, one after another with the same seed "
                "and settings. Each path gets one short warm-up run first, so compiling and first-use costs are not "
                "raced.")
    prompt = gr.Textbox(label="Prompt", lines=2, max_lines=10, value=DEFAULT_PROMPT, elem_id="fx-race-prompt")
    with gr.Row(equal_height=True):
        paths = gr.CheckboxGroup(path_choices(info), value=default_paths(info), label="Paths", scale=4,
                                 elem_id="fx-race-paths")
        greedy = gr.Checkbox(value=True, label="Greedy", scale=1, elem_id="fx-race-greedy",
                             info="off: the panel's sampling settings")
    with gr.Row():
        run_button = gr.Button("Race", variant="primary", elem_id="fx-race-run")
        stop_button = gr.Button("Stop", variant="stop", elem_id="fx-race-stop")
    summary = gr.Markdown(elem_classes="fx-stats", elem_id="fx-race-summary")
    with gr.Row(equal_height=True):
        columns = [gr.Textbox(lines=8, max_lines=16, interactive=False, visible=False, elem_id=f"fx-race-col-{i}",
                              elem_classes="fx-race-col") for i in range(MAX_PATHS)]
    with gr.Row():
        decode, prefill = (gr.BarPlot(x="backend", y="tok/s", title=f"{phase} tok/s", y_lim=[0, None], height=240,
                                      elem_id=f"fx-race-{phase}") for phase in ("decode", "prefill"))
    compare = gr.HTML("<div class='fx-empty'>After a race, each path's text is compared with the first path's "
                      "here.</div>", elem_id="fx-race-compare")
    touched = gr.State(False)  # this session ticked or unticked a path itself: keep its choice
    paths.input(lambda: True, None, touched, api_visibility="private", queue=False)
    tab.select(refresh_paths, [paths, touched], paths, api_visibility="private", queue=False)
    run_button.click(race, [prompt, paths, greedy, *panel.inputs], [*columns, decode, prefill, compare, summary],
                     api_name="race", show_progress="minimal", **MODEL_EVENTS, **deployment.event_options())
    return stop_button
