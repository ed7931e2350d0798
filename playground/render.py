"""HTML and Markdown the app shows: the model card, generation stats, tokens coloured by probability, and a
training job (status, loss plot data, samples).

Pure functions of backend results -> strings, so they can be tested without a browser.
"""
from __future__ import annotations

import html
import math
import time

import pandas as pd

import backend
from backend.models import family

# A token's colour runs from red (unlikely, p -> 0) through amber to green (likely, p -> 1). Translucent fills
# read well on both the light and the dark theme.
LOW_HUE, HIGH_HUE = 0, 130


def probability_colour(p: float) -> str:
    hue = LOW_HUE + (HIGH_HUE - LOW_HUE) * max(0.0, min(1.0, p))
    return f"hsla({hue:.0f}, 85%, 50%, {0.42 - 0.22 * p:.2f})"  # unlikely tokens also stand out by opacity


def visible(text: str) -> str:
    """A token's text with whitespace made visible, for the tooltip (where ' the' and 'the' must differ)."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def percent(logprob: float) -> str:
    p = math.exp(logprob) * 100
    return f"{p:.1f}%" if p >= 1 else f"{p:.2f}%" if p >= 0.01 else "<0.01%"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# --- model ---
def capabilities(info: dict) -> dict:
    """What the model `info` describes can do (`ModelHandle.info()["capabilities"]`; a family name alone will do)."""
    return info.get("capabilities") or family(info["family"]).capabilities()


def model_card(info: dict | None) -> str:
    """The Model tab's summary of what is loaded: one tile per fact."""
    if info is None:
        return ("<div class='fx-card fx-empty'><b>No model loaded.</b> Load one above: <code>default</code>, "
                "a model folder, a <code>.gguf</code> file or a Hub id.</div>")
    tiles = [("Family", f"{info['family']} · {info['model_type']}"), ("Parameters", human_count(info["parameters"])),
             ("Layers", info["layers"]), ("Heads / KV heads", f"{info['heads']} / {info['kv_heads']}"),
             ("Hidden size", info["d_model"]), ("Vocabulary", f"{info['vocab_size']:,}"),
             ("Context length", f"{info['context_length']:,}"), ("Dtype", info["dtype"]), ("Device", info["device"]),
             ("Weight memory", human_bytes(info["weight_bytes"])), ("Load time", f"{info['load_seconds']:.2f} s"),
             ("Chat template", "the model's" if info["chat_template"] == "model" else "generic fallback"),
             ("Backends", ", ".join(info["runners"]))]
    can = capabilities(info)
    if not can["chats"]:  # an encoder fills masks, an LSTM completes
        tiles = [(k, "none: does not chat") if k == "Chat template" else (k, v) for k, v in tiles
                 if not (k == "Heads / KV heads" and not can["attends"])]
    grid = "".join(f"<div class='fx-tile'><div class='fx-tile-label'>{k}</div>"
                   f"<div class='fx-tile-value'>{html.escape(str(v))}</div></div>" for k, v in tiles)
    return (f"<div class='fx-card'><div class='fx-card-name'>{html.escape(info['name'])}</div>"
            f"<div class='fx-card-source'>loaded from "
            f"<code>{html.escape(info.get('shown_source') or info['source'])}</code></div>"
            f"<div class='fx-tiles'>{grid}</div></div>")


def model_badge(info: dict | None) -> str:
    """One line at the top of the page: which model every tab talks to."""
    if info is None:
        return "<div class='fx-badge fx-badge-empty'>no model loaded — open the <b>Model</b> tab</div>"
    return (f"<div class='fx-badge'><b>{html.escape(info['name'])}</b> · {info['family']} · "
            f"{human_count(info['parameters'])} params · {info['dtype']} · {info['device']}</div>")


# --- execution paths ---
BACKEND_LABELS = {"eager": "PyTorch eager", "compiled": "PyTorch compiled", "triton": "PyTorch + Triton kernels",
                  "compiled+triton": "PyTorch compiled + Triton kernels", "native": "native CPU (GGUF blocks)",
                  "onnx": "ONNX Runtime", "onnx-fp32": "ONNX Runtime fp32", "onnx-int8": "ONNX Runtime int8",
                  "onnx-int4": "ONNX Runtime int4"}


def backend_choices(ready: list[str], on_demand: list[str]) -> list[tuple[str, str]]:
    """(label, runner name) pairs for the Backend dropdown: the paths the model has, then those made on first use."""
    label = lambda name: BACKEND_LABELS.get(name, name)  # noqa: E731
    how = lambda name: "exports" if name.startswith("onnx") else "builds" if name == "native" else "compiles"  # noqa: E731
    return [(label(n), n) for n in ready] + [(f"{label(n)} · {how(n)} on first use", n) for n in on_demand]


def export_report(summary: dict, precision: str, folder: str, backend_label: str) -> str:
    """Export tab: sizes, time and the parity report (see export/verify.py) as Markdown."""
    sizes = summary.get("sizes_bytes", {})
    lines = [f"### {html.escape(summary['config']['name'])} · ONNX {precision}",
             f"Exported in {summary.get('export_seconds', 0):.0f} s (cached: exporting again is instant) · "
             f"now in the Backend selector as **{backend_label}**.", "",
             "| file | size |", "|---|---|"]
    if summary.get("quant_method"):
        lines.insert(2, f"Weights: {html.escape(summary['quant_method'])}.")
    lines += [f"| model.onnx ({kind}) | {human_bytes(n)} |" for kind, n in sizes.items()]
    r = summary.get("report")
    graph = family(summary["config"]["family"]).export_graph
    if r and r.get("kind") in ("encoder", "lstm"):  # no perplexity or KV cache: their own checks
        from export.parity import report_rows

        lines += ["", "**Parity against the eager fp32 model** on fixed text:", "", "| check | value |", "|---|---|"]
        lines += [f"| {check} | {html.escape(value)} |" for check, value in report_rows(r)]
    elif r:
        delta = r["perplexity_onnx"] - r["perplexity_eager"]
        lines += ["", f"**Parity against the eager fp32 model** on {r['positions']} tokens of fixed text:", "",
                  "| check | value |", "|---|---|",
                  f"| max abs logit difference | {r['max_abs_logit_diff']:.2e} |",
                  f"| mean KL(eager ‖ onnx) | {r['mean_kl']:.2e} |",
                  f"| top-1 agreement | {100 * r['top1_agreement']:.1f} % |",
                  f"| greedy tokens identical | {r['greedy_match_length']} / {r['greedy_tokens']} |",
                  f"| perplexity | {r['perplexity_eager']:.3f} eager → {r['perplexity_onnx']:.3f} onnx "
                  f"({delta:+.3f}) |"]
    loader = {"encoder": "optimum's `ORTModelForMaskedLM` / `ORTModelForSequenceClassification` load",
              "lstm": "`backend.load` runs"}.get(graph, "optimum's `ORTModelForCausalLM` loads")
    lines += ["", f"Folder: `{html.escape(folder)}` — ONNX graph, `config.json`, tokenizer and `parity.json`; "
              f"{loader} it as it is."]
    return "\n".join(lines)


# --- generation stats ---
def stats_line(result: backend.GenerationResult, runner_name: str) -> str:
    """TTFT, decode speed and the weight bandwidth it implies, for one finished generation."""
    t = result.timings
    finish = ", ".join(sorted({c.finish_reason for c in result.completions}))
    stopped = "**stopped** · " if any(c.finish_reason == "cancelled" for c in result.completions) else ""
    return (f"{stopped}**{t.new_tokens}** tokens · TTFT **{t.ttft_s * 1000:.0f} ms** · **{t.decode_tok_s:.1f} tok/s** · "
            f"**{t.bandwidth_gb_s:.1f} GB/s** · prefill {t.prefill_tok_s:.0f} tok/s · finish: {finish} · "
            f"seed {result.seed} · {runner_name}")


def stopped_line(ttft_s: float | None, elapsed_s: float) -> str:
    """A run abandoned without a GenerationResult (cleared, or its page closed): what the UI measured itself."""
    ttft = f"TTFT {ttft_s * 1000:.0f} ms · " if ttft_s is not None else ""
    return f"**stopped** after {elapsed_s:.1f} s · {ttft}(speed figures need a run that finishes)"


# --- tokens coloured by probability ---
def token_view(prompt: str, result: backend.GenerationResult) -> str:
    """Every generated token coloured by its probability; hover or click one for its top alternatives."""
    samples = []
    for i, completion in enumerate(result.completions):
        header = f"<div class='fx-sample-head'>sample {i + 1}</div>" if len(result.completions) > 1 else ""
        samples.append(f"<div class='fx-sample'>{header}<div class='fx-text'>"
                       f"<span class='fx-prompt'>{html.escape(prompt)}</span>{_tokens_html(completion)}"
                       f"<span class='fx-finish' title='why generation ended'>{completion.finish_reason}</span>"
                       f"</div>{_summary(completion)}</div>")
    legend = ("<div class='fx-legend'><span>token probability</span><span class='fx-scale'></span>"
              "<span>0% → 100%</span><span class='fx-hint'>hover or tap a token for its alternatives</span></div>")
    return f"<div class='fx-tokens'>{legend}{''.join(samples)}</div>"


def _tokens_html(completion: backend.Completion) -> str:
    spans, offset = [], 0
    for token in completion.tokens:
        p = math.exp(token.logprob)
        # Tokens past the returned text are the ones that spelled a stop string: shown, but struck through.
        cut = " fx-cut" if offset >= len(completion.text) else ""
        offset += len(token.text)
        text = html.escape(token.text).replace("\n", "↵\n")
        spans.append(f"<span class='fx-tok{cut}' tabindex='0' style='background:{probability_colour(p)}'>"
                     f"{text}{_tooltip(token)}</span>")
    return "".join(spans)


def _tooltip(token: backend.TokenInfo) -> str:
    rows = []
    alternatives = token.top or [(token.id, token.text, token.logprob)]
    if token.id not in {i for i, _, _ in alternatives}:  # sampled from outside the top-k: still list it
        alternatives = [*alternatives, (token.id, token.text, token.logprob)]
    for token_id, text, logprob in alternatives:
        chosen = " fx-chosen" if token_id == token.id else ""
        width = max(1.0, math.exp(logprob) * 100)
        rows.append(f"<span class='fx-alt{chosen}'><code>{html.escape(visible(text))}</code>"
                    f"<span class='fx-bar'><span style='width:{width:.1f}%'></span></span>"
                    f"<span class='fx-pct'>{percent(logprob)}</span></span>")
    return f"<span class='fx-tip' role='tooltip'>{''.join(rows)}</span>"


def _summary(completion: backend.Completion) -> str:
    if not completion.tokens:
        return "<div class='fx-summary'>no tokens generated</div>"
    mean = sum(t.logprob for t in completion.tokens) / len(completion.tokens)
    least = min(completion.tokens, key=lambda t: t.logprob)
    return (f"<div class='fx-summary'>{len(completion.tokens)} tokens · mean log-prob {mean:.2f} · "
            f"perplexity {math.exp(-mean):.2f} · least likely <code>{html.escape(visible(least.text))}</code> "
            f"({percent(least.logprob)})</div>")




# --- encoders: fill-mask bars and the pseudo-log-likelihood heat line ---
MASK_HUES = (235, 35, 160, 330, 195, 95)  # one hue per [MASK], so the masks' charts tell apart
PLL_FLOOR = 10.0                           # log-probabilities at or below -10 nats get the coldest colour


def mask_bars_html(text: str, mask: str, masks: list[list[dict]]) -> str:
    """Each [MASK]'s candidates (backend fill_mask's output) as horizontal bars, and the text with the best ones."""
    pieces = text.split(mask)
    best = ""
    if len(pieces) == len(masks) + 1:  # every typed mask became one mask token: show the text filled in
        best = html.escape(pieces[0]) + "".join(
            f"<mark style='background:hsla({MASK_HUES[i % len(MASK_HUES)]}, 80%, 55%, .3)'>"
            f"{html.escape(m[0]['token'])}</mark>{html.escape(piece)}"
            for i, (m, piece) in enumerate(zip(masks, pieces[1:])))
        best = f"<div class='fx-mask-best'>{best}</div>"
    charts = []
    for i, candidates in enumerate(masks):
        hue = MASK_HUES[i % len(MASK_HUES)]
        rows = "".join(
            f"<div class='fx-cand' data-token='{html.escape(c['token'], quote=True)}' data-prob='{c['prob']!r}' "
            f"title='{html.escape(c['token'], quote=True)}: {100 * c['prob']:.2f} %'>"
            f"<code>{html.escape(visible(c['token']))}</code>"
            f"<span class='fx-cand-bar'><span style='width:{max(0.5, 100 * c['prob']):.1f}%;"
            f"background:hsl({hue}, 70%, {50 + 6 * min(rank, 5)}%)'></span></span>"
            f"<span class='fx-pct'>{100 * c['prob']:.1f}%</span></div>" for rank, c in enumerate(candidates))
        charts.append(f"<div class='fx-mask' data-mask='{i}'><div class='fx-mask-head'>{html.escape(mask)} "
                      f"{i + 1}</div>{rows}</div>")
    return f"<div class='fx-masks'>{best}<div class='fx-mask-charts'>{''.join(charts)}</div></div>"


def logprob_colour(logprob: float) -> str:
    """Red at or below -PLL_FLOOR nats, green at 0 (the probability colours, on a log scale)."""
    return probability_colour(1.0 - min(1.0, -logprob / PLL_FLOOR))


def pll_html(text: str, result: dict, spans: list[tuple[int, int]] | None) -> str:
    """The text as a heat line, each scored token coloured by its log-probability with it masked (title: the value),
    and the total. `spans`: each scored token's characters in `text` (None: show the tokens as pieces)."""
    tokens = result["tokens"]
    parts, at = [], 0
    for k, t in enumerate(tokens):
        piece = t["token"]
        if spans is not None:
            start, end = spans[k]
            parts.append(html.escape(text[at:start]))
            piece, at = text[start:end], end
        elif k:
            parts.append(" ")
        parts.append(f"<span class='fx-pll-tok' data-logprob='{t['logprob']!r}' style='background:"
                     f"{logprob_colour(t['logprob'])}' title='{html.escape(t['token'], quote=True)}: log p = "
                     f"{t['logprob']:.3f} ({percent(t['logprob'])})'>{html.escape(piece)}</span>")
    if spans is not None:
        parts.append(html.escape(text[at:]))
    least = min(tokens, key=lambda t: t["logprob"])
    legend = (f"<div class='fx-legend'><span>log-probability with the token masked</span><span class='fx-scale'>"
              f"</span><span>≤ −{PLL_FLOOR:g} → 0</span>"
              f"<span class='fx-hint'>hover a token for its value</span></div>")
    total = (f"<div class='fx-summary fx-pll-total' data-pll='{result['pll']!r}'>pseudo-log-likelihood "
             f"<b>{result['pll']:.3f}</b> over {len(tokens)} tokens · pseudo-perplexity "
             f"{result['pseudo_perplexity']:.2f} · least likely <code>{html.escape(visible(least['token']))}</code> "
             f"({least['logprob']:.2f})</div>")
    return f"<div class='fx-tokens fx-pll'>{legend}<div class='fx-text'>{''.join(parts)}</div>{total}</div>"


MASK_CSS = """
.fx-mask-best { font-size: 15px; padding: 8px 10px; margin-bottom: 10px; border-radius: 8px;
                border: 1px solid var(--border-color-primary); white-space: pre-wrap; }
.fx-mask-best mark { border-radius: 3px; padding: 0 2px; color: inherit; font-weight: 600; }
.fx-mask-charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
.fx-mask { padding: 6px 8px; border-radius: 8px; border: 1px solid var(--border-color-primary); }
.fx-mask-head { font-size: 12px; font-weight: 600; margin-bottom: 4px; color: var(--body-text-color-subdued); }
.fx-cand { display: grid; grid-template-columns: minmax(70px, 30%) 1fr 52px; gap: 8px; align-items: center;
           font-size: 13px; padding: 1px 0; }
.fx-cand code { white-space: pre; background: none; padding: 0; overflow: hidden; text-overflow: ellipsis; }
.fx-cand-bar { height: 12px; border-radius: 4px; background: var(--border-color-primary); overflow: hidden; }
.fx-cand-bar > span { display: block; height: 100%; }
.fx-pll-tok { border-radius: 3px; padding: 1px 0; cursor: help; }
"""


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


# The loss plot overlays the last runs, one slot each: (slot, validation colour, train colour), newest first. The
# series are named by slot, not by run, and every slot is always in the data: Gradio 6.31's plot fixes its colour
# domain from the data it is first drawn with and then only swaps the data, so a series named later would never be
# drawn. The legend naming each slot's run is HTML (runs_legend_html).
RUN_SLOTS = [("latest", "#6366f1", "#a5b4fc"), ("previous", "#f59e0b", "#fcd34d"), ("earlier", "#10b981", "#6ee7b7")]
RUNS_COLOR_MAP = {f"{slot} · {split}": colour for slot, dark, light in RUN_SLOTS
                  for split, colour in (("validation", dark), ("train", light))}


def run_label(state: dict) -> str:
    """What a run was: the preset it pretrained (or the model it finetuned), the mode, and when it started."""
    cfg = state.get("config") or {}
    model = cfg.get("model") or ""
    what = cfg.get("preset") if cfg.get("mode") == "pretrain" else (model.rstrip("/\\").rsplit("/", 1)[-1] or model)
    when = time.strftime("%H:%M:%S", time.localtime(state["started"])) if state.get("started") else state.get("id", "")
    return f"{what} · {cfg.get('mode', '?')} · {when}"


def runs_frame(states: list[dict]) -> pd.DataFrame | None:
    """The last runs' train and validation losses on one plot (`states` newest first, at most len(RUN_SLOTS)):
    series '<slot> · train' / '<slot> · validation'; a slot with no run (or no point yet) is named by a NaN point."""
    frames = [loss_frame(state) for state in states[:len(RUN_SLOTS)]]
    if all(f is None for f in frames):
        return None
    first = min(int(f["step"].min()) for f in frames if f is not None)
    rows = []
    for (slot, _, _), frame in zip(RUN_SLOTS, frames + [None] * len(RUN_SLOTS)):
        if frame is None:
            frame = pd.DataFrame([(first, float("nan"), s) for s in ("train", "validation")],
                                 columns=["step", "loss", "split"])
        rows.append(frame.assign(split=slot + " · " + frame["split"]))
    return pd.concat(rows, ignore_index=True).astype({"step": "int64", "loss": "float64"})


def runs_legend_html(states: list[dict]) -> str:
    """Which run each slot of the loss plot shows (`states` newest first), with its colours and last losses."""
    if not states:
        return ""
    rows = []
    for (slot, dark, light), state in zip(RUN_SLOTS, states):
        last = [f"{split} {points[-1][1]:.3f}" for split, points in (("validation", state.get("val_loss")),
                                                                     ("train", state.get("train_loss"))) if points]
        rows.append(f"<span class='fx-run' data-slot='{slot}' data-job='{html.escape(state.get('id', ''))}'>"
                    f"<span class='fx-swatch' style='background:{dark}' title='validation'></span>"
                    f"<span class='fx-swatch' style='background:{light}' title='train'></span>"
                    f"<b>{html.escape(run_label(state))}</b> <span class='fx-run-slot'>{slot}</span>"
                    f"{' · ' + ' · '.join(last) if last else ''}</span>")
    return (f"<div class='fx-runs'>{''.join(rows)}<span class='fx-run-slot'>dark: validation · light: train"
            f"</span></div>")


def classify_comparison_md(table: dict) -> str:
    """backend.training.compare.classify_comparison's table as Markdown: one row per run, the best in bold."""
    lines = ["| run | accuracy | macro-F1 | majority class | margin | validation rows | steps | trainable params | "
             "tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(table["runs"]):
        model = str(r.get("model") or "").rstrip("/\\").rsplit("/", 1)[-1]
        name = f"{r['kind']} ({r['method']}) · {html.escape(model)} · {r.get('mode') or '?'}"
        bold = "**" if i == table["best"] else ""
        params = human_count(r["trainable_params"]) if r.get("trainable_params") else "—"
        lines.append(f"| {bold}{name}{bold} | {bold}{100 * r['accuracy']:.1f} %{bold} | {r['macro_f1']:.3f} | "
                     f"{100 * r['majority_baseline']:.1f} % | {100 * r['margin_over_majority']:+.1f} pt | {r['n']} | "
                     f"{r.get('steps') or '—'} | {params} | {r.get('tokens_per_s') or 0:.0f} |")
    same = ("Both were scored on the same held-out rows." if table["same_validation"] else
            "⚠ The runs were not scored on the same held-out rows (different data, split or seed): "
            "compare with care.")
    labels = f" Labels: {', '.join(html.escape(str(x)) for x in table['labels'])}." if table["labels"] else ""
    return "\n".join(lines) + f"\n\n{same}{labels}"


def job_status_html(state: dict | None, someone_else: bool = False) -> str:
    """A job's progress and facts; with no job of one's own, whether another visitor's job is running."""
    if state is None and someone_else:
        return ("<div class='fx-job' data-status='running'>A training job is running (another visitor's); one job "
                "runs at a time here. Yours can start when it ends.</div>")
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


def job_samples_html(state: dict | None) -> str:
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


JOB_CSS = """
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
.fx-runs { display: flex; flex-wrap: wrap; gap: 4px 18px; font-size: 12.5px; align-items: center; }
.fx-run { display: inline-flex; gap: 4px; align-items: center; }
.fx-swatch { display: inline-block; width: 14px; height: 4px; border-radius: 2px; }
.fx-run-slot { color: var(--body-text-color-subdued); }
"""


CSS = """
.fx-badge { font-size: 0.9em; padding: 6px 12px; border-radius: 8px; background: var(--block-background-fill);
            border: 1px solid var(--border-color-primary); display: inline-block; }
.fx-card { padding: 4px 2px; }
.fx-card-name { font-size: 1.25em; font-weight: 700; }
.fx-card-source { font-size: 0.88em; color: var(--body-text-color-subdued); margin-bottom: 10px; }
.fx-tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 8px; }
.fx-tile { padding: 8px 12px; border-radius: 8px; border: 1px solid var(--border-color-primary);
           background: var(--block-background-fill); }
.fx-tile-label { font-size: 11.5px; text-transform: uppercase; letter-spacing: 0.04em;
                 color: var(--body-text-color-subdued); }
.fx-tile-value { font-size: 1.05em; font-weight: 600; font-variant-numeric: tabular-nums; }
.fx-badge-empty { color: var(--body-text-color-subdued); }
.fx-stats { font-size: 0.88em; color: var(--body-text-color-subdued); min-height: 1.5em; }
.fx-tokens { font-size: 15px; line-height: 1.9; }
.fx-text { white-space: pre-wrap; word-break: break-word; font-family: var(--font-mono); padding: 10px 12px;
           border: 1px solid var(--border-color-primary); border-radius: 8px;
           background: var(--block-background-fill); }
.fx-prompt { color: var(--body-text-color-subdued); }
.fx-tok { position: relative; border-radius: 3px; padding: 1px 0; cursor: help; outline: none; }
.fx-tok:hover, .fx-tok:focus { box-shadow: 0 0 0 1.5px var(--color-accent); }
.fx-cut { text-decoration: line-through; opacity: 0.6; }
.fx-tip { display: none; position: absolute; left: 0; top: 1.9em; z-index: 50; min-width: 240px; padding: 6px 8px;
          border-radius: 8px; background: var(--background-fill-primary); border: 1px solid var(--border-color-primary);
          box-shadow: 0 6px 18px rgba(0, 0, 0, 0.18); font-size: 12.5px; line-height: 1.5; white-space: normal; }
.fx-tok:hover > .fx-tip, .fx-tok:focus > .fx-tip { display: block; }
.fx-alt { display: grid; grid-template-columns: minmax(70px, auto) 90px 52px; gap: 8px; align-items: center;
          padding: 1px 4px; border-radius: 4px; }
.fx-alt code { white-space: pre; background: none; padding: 0; }
.fx-chosen { background: var(--color-accent-soft); font-weight: 600; }
.fx-bar { height: 7px; border-radius: 4px; background: var(--border-color-primary); overflow: hidden; }
.fx-bar > span { display: block; height: 100%; background: var(--color-accent); }
.fx-pct { text-align: right; font-variant-numeric: tabular-nums; }
.fx-finish { font-family: var(--font); font-size: 11px; margin-left: 6px; padding: 1px 6px; border-radius: 8px;
             color: var(--body-text-color-subdued); border: 1px solid var(--border-color-primary); }
.fx-legend { display: flex; gap: 10px; align-items: center; font-size: 12.5px; margin-bottom: 6px;
             color: var(--body-text-color-subdued); flex-wrap: wrap; }
.fx-scale { width: 120px; height: 10px; border-radius: 5px;
            background: linear-gradient(90deg, hsla(0,85%,50%,.42), hsla(65,85%,50%,.31), hsla(130,85%,50%,.2)); }
.fx-hint { margin-left: auto; }
.fx-sample { margin-bottom: 12px; }
.fx-sample-head { font-size: 12.5px; font-weight: 600; margin-bottom: 2px; }
.fx-summary { font-size: 12.5px; color: var(--body-text-color-subdued); margin-top: 4px; }
.fx-empty { color: var(--body-text-color-subdued); font-size: 13px; padding: 8px 2px; }
"""
