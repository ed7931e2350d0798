"""The Completion tab: a raw prompt, streamed; after the run every token coloured by its probability."""
from __future__ import annotations

import gradio as gr

from .. import deployment, render
from ..errors import refusal, user_errors
from ..state import MODEL_EVENTS, current
from ..streaming import start_stream
from .params import Panel, sampling_kwargs

TOP_ALTERNATIVES = 5              # alternatives per token in the Completion view
DEFAULT_PROMPT = "The three most surprising facts about octopuses are"


def joined_samples(texts: list[str]) -> str:
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(f"── sample {i} ──\n{t}" for i, t in enumerate(texts, 1))


@user_errors
def complete(prompt: str, runner_name: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             min_p: float, repetition_penalty: float, presence_penalty: float, frequency_penalty: float,
             stop: list, seed: int | None, num_samples: int, request: gr.Request = None):
    """Continue `prompt`; streams (continuation text, probability-coloured tokens HTML, stats)."""
    if not prompt or not prompt.strip():
        raise refusal("the prompt is empty: write something for the model to continue")
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, num_samples)
    deployment.check_sampling(params, len(prompt))
    pending = "<div class='fx-empty'>token probabilities appear when the run finishes…</div>"
    with current.using() as handle:
        run, name = start_stream(handle, prompt, runner_name, params, request, top_logprobs=TOP_ALTERNATIVES)
        yield "", pending, run.status()
        for texts in run.updates():  # a long prompt's ingestion first ("ingesting 1,536 / 4,096 tokens"), then text
            yield joined_samples(texts), pending, run.status()
        if run.stream.result is None:  # abandoned: no per-token data to colour (Stop keeps the result and its timings)
            yield joined_samples(run.texts), "<div class='fx-empty'>stopped before the end</div>", run.stats(name)
        else:
            yield joined_samples(run.texts), render.token_view(prompt, run.stream.result), run.stats(name)


def build(panel: Panel) -> gr.Button:
    """The tab's components and events, inside the caller's `gr.Tab`. Returns its Stop button."""
    prompt = gr.Textbox(label="Prompt", lines=4, max_lines=20, value=DEFAULT_PROMPT, elem_id="fx-prompt")
    with gr.Row():
        run_complete = gr.Button("Generate", variant="primary", elem_id="fx-generate")
        stop_complete = gr.Button("Stop", variant="stop", elem_id="fx-stop-complete")
    continuation = gr.Textbox(label="Continuation", lines=4, max_lines=20, interactive=False, buttons=["copy"],
                              elem_id="fx-continuation")
    token_html = gr.HTML("<div class='fx-empty'>After a run, every generated token appears here coloured by its "
                         "probability.</div>", elem_id="fx-token-view")
    complete_stats = gr.Markdown(elem_classes="fx-stats", elem_id="fx-complete-stats")
    # The prompt box takes Enter as a newline (prompts are often multi-line): only the button runs it.
    run_complete.click(complete, [prompt, *panel.inputs], [continuation, token_html, complete_stats],
                       api_name="complete", show_progress="minimal", **MODEL_EVENTS,
                       **deployment.event_options())
    return stop_complete
