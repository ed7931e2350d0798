"""The parameters panel every generating tab shares: backend, sampling settings, stop strings, seed, samples."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .model import backend_dropdown

STOP_SUGGESTIONS = ["\\n\\n", "\\n", "User:", "###"]
RANDOM_SEED = -1                  # the seed box's "pick one for me" (a Number box cannot be left blank)


def parse_stop(stop) -> list[str]:
    """Stop strings as typed: one per entry, with \\n and \\t written as escapes (a chip cannot hold a newline)."""
    if stop is None:
        return []
    entries = [stop] if isinstance(stop, str) else list(stop)
    return [str(s).replace("\\n", "\n").replace("\\t", "\t") for s in entries if str(s)]


def sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                    frequency_penalty, stop, seed, num_samples) -> dict:
    """The parameters panel as `h.stream` keyword arguments. The backend validates them and names a bad one."""
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, stop=parse_stop(stop),
                seed=None if seed in (None, "", RANDOM_SEED) else seed, num_samples=num_samples)


def param_slider(*args, **kwargs) -> gr.Slider:
    """A slider whose range guides the UI only. The backend validates the value and names the parameter
    ("top_p must be in (0, 1], got 5") where Gradio would say "Value 5 is greater than maximum value 1", and it
    knows the real limits (max_new_tokens is bounded by the model's context, not by the slider)."""
    slider = gr.Slider(*args, **kwargs)
    # Per instance: subclassing a Gradio component makes Gradio write a .pyi stub next to this file on import.
    slider.preprocess = lambda payload: payload
    return slider


@dataclass
class Panel:
    backend_name: gr.Dropdown
    inputs: list  # in the order of the handlers' parameters: backend_name, max_new_tokens, ..., num_samples


def build(info: dict | None) -> Panel:
    """The panel's components, inside the caller's column."""
    gr.Markdown("### Parameters")
    backend_name = backend_dropdown(info, label="Backend", allow_custom_value=True, elem_id="fx-backend",
                                    info="execution path of the loaded model")
    max_new_tokens = param_slider(1, 2048, value=256, step=1, label="Max new tokens", elem_id="fx-max-new-tokens")
    temperature = param_slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 = greedy",
                               elem_id="fx-temperature")
    top_k = param_slider(0, 200, value=0, step=1, label="Top-k", elem_id="fx-top-k", info="0 = off")
    top_p = param_slider(0.01, 1, value=0.95, step=0.01, label="Top-p", elem_id="fx-top-p")
    min_p = param_slider(0, 0.99, value=0.0, step=0.01, label="Min-p", elem_id="fx-min-p", info="0 = off")
    with gr.Accordion("Penalties", open=False):
        repetition_penalty = param_slider(0.5, 2, value=1.0, step=0.01, label="Repetition penalty", info="1 = off")
        presence_penalty = param_slider(-2, 2, value=0.0, step=0.05, label="Presence penalty")
        frequency_penalty = param_slider(-2, 2, value=0.0, step=0.05, label="Frequency penalty")
    stop_strings = gr.Dropdown(STOP_SUGGESTIONS, value=[], multiselect=True, allow_custom_value=True,
                               label="Stop strings", info="type and press Enter; \\n is a newline", elem_id="fx-stop")
    seed = gr.Number(value=RANDOM_SEED, precision=0, label="Seed", elem_id="fx-seed",
                     info="-1 = random; the seed used is shown after each run")
    num_samples = param_slider(1, 16, value=1, step=1, label="Samples", elem_id="fx-samples",
                               info="independent samples, decoded as one batch")
    return Panel(backend_name, [backend_name, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                                presence_penalty, frequency_penalty, stop_strings, seed, num_samples])
