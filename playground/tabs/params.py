"""The parameters panel every generating tab shares: backend, sampling settings, stop strings, seed, samples."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from backend.generation import presets

from .. import prepare
from ..state import current
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


# Sampler presets live in the backend (the first-answers benchmark measures them); the panel opens on the one that
# suits the loaded model (backend.generation.presets.opening_preset: a small model's, or the model's own generation config).
PRESET_FIELDS = presets.FIELDS
PRESETS = presets.PRESETS
MAX_SAVED_PRESETS = 32


def preset_choices(saved: dict | None, info: dict | None = None) -> list[str]:
    own = [presets.MODEL_PRESET] if presets.from_generation_config((info or {}).get("generation_config")) else []
    return own + list(PRESETS) + [name for name in (saved or {}) if name not in PRESETS and name not in own]


def apply_preset(name: str | None, saved: dict | None):
    """The sliders' values for the preset `name` (built-in, else one this browser saved); unknown: unchanged."""
    values = PRESETS.get(name) or (saved or {}).get(name)
    if name == presets.MODEL_PRESET:
        values = presets.from_generation_config((current.info() or {}).get("generation_config"))
    if not isinstance(values, dict):
        return [gr.skip()] * len(PRESET_FIELDS)
    return [values.get(f, gr.skip()) for f in PRESET_FIELDS]


def save_preset(name: str, saved: dict | None, *values):
    """Keep the sliders as preset `name` in this browser's local storage (gr.BrowserState)."""
    name = (name or "").strip()[:40]
    if not name or name in PRESETS or name == presets.MODEL_PRESET:
        raise gr.Error(f"name the preset (not {', '.join(PRESETS)} or {presets.MODEL_PRESET})", print_exception=False)
    saved = dict(saved or {})
    if name not in saved and len(saved) >= MAX_SAVED_PRESETS:
        raise gr.Error(f"at most {MAX_SAVED_PRESETS} saved presets", print_exception=False)
    saved[name] = dict(zip(PRESET_FIELDS, values))
    return saved, gr.update(choices=preset_choices(saved), value=name), ""


def poll_preparation(chosen: bool):
    """Timer tick while the start-up preparation runs (playground/prepare.py): its status line, and once its path
    is ready the Backend selector opens on it, unless this visitor has picked a backend already. Stops itself."""
    st = prepare.status
    if st.active:
        return st.message, gr.skip(), gr.Timer(active=True)
    info = current.info()
    name = prepare.preferred(info)
    if name is None:
        selector = gr.skip()
    elif chosen:  # the visitor's choice stands; the prepared path just shows as ready in the list
        selector = gr.update(choices=backend_dropdown(info).choices)
    else:
        selector = backend_dropdown(info, name)
    return st.message, selector, gr.Timer(active=False)


@dataclass
class Panel:
    runner_name: gr.Dropdown
    inputs: list  # in the order of the handlers' parameters: runner_name, max_new_tokens, ..., num_samples
    on_load: tuple = ()  # (fn, inputs, outputs) to run on page load: this browser's saved presets into the dropdown


def build(info: dict | None) -> Panel:
    """The panel's components, inside the caller's column."""
    gr.Markdown("### Parameters")
    runner_name = backend_dropdown(info, label="Backend", allow_custom_value=True, elem_id="fx-backend",
                                    info="execution path of the loaded model")
    # what the start-up preparation of the fastest faithful path is doing (empty when it is off)
    prepare_status = gr.Markdown(prepare.status.message, elem_id="fx-prepare-status", elem_classes="fx-stats")
    chosen = gr.State(False)  # this session picked a backend itself: never switch it for them
    runner_name.input(lambda: True, None, chosen, api_visibility="private", queue=False)
    timer = gr.Timer(1.0)  # turns itself off on its first tick once no preparation is running
    timer.tick(poll_preparation, chosen, [prepare_status, runner_name, timer], api_visibility="private",
               queue=False, show_progress="hidden")
    # Callable values are computed again at each page load: the panel opens on the preset of the model loaded now.
    def opening(field: str | None = None):
        name, values = presets.opening_preset(current.info())
        return name if field is None else values[field]

    v = {f: (lambda f=f: opening(f)) for f in PRESET_FIELDS}
    preset = gr.Dropdown(preset_choices(None, info), value=opening, label="Preset", elem_id="fx-preset",
                         info="moves the sliders below; opens on the one that suits the loaded model")
    max_new_tokens = param_slider(1, 2048, value=256, step=1, label="Max new tokens", elem_id="fx-max-new-tokens")
    temperature = param_slider(0, 2, value=v["temperature"], step=0.05, label="Temperature", info="0 = greedy",
                               elem_id="fx-temperature")
    top_k = param_slider(0, 200, value=v["top_k"], step=1, label="Top-k", elem_id="fx-top-k", info="0 = off")
    top_p = param_slider(0.01, 1, value=v["top_p"], step=0.01, label="Top-p", elem_id="fx-top-p")
    min_p = param_slider(0, 0.99, value=v["min_p"], step=0.01, label="Min-p", elem_id="fx-min-p", info="0 = off")
    with gr.Accordion("Penalties", open=False):
        repetition_penalty = param_slider(0.5, 2, value=v["repetition_penalty"], step=0.01,
                                          label="Repetition penalty", info="1 = off")
        presence_penalty = param_slider(-2, 2, value=v["presence_penalty"], step=0.05, label="Presence penalty")
        frequency_penalty = param_slider(-2, 2, value=v["frequency_penalty"], step=0.05, label="Frequency penalty")
    stop_strings = gr.Dropdown(STOP_SUGGESTIONS, value=[], multiselect=True, allow_custom_value=True,
                               label="Stop strings", info="type and press Enter; \\n is a newline", elem_id="fx-stop")
    seed = gr.Number(value=RANDOM_SEED, precision=0, label="Seed", elem_id="fx-seed",
                     info="-1 = random; the seed used is shown after each run")
    num_samples = param_slider(1, 16, value=1, step=1, label="Samples", elem_id="fx-samples",
                               info="independent samples, decoded as one batch")
    with gr.Row(equal_height=True):
        preset_name = gr.Textbox(show_label=False, placeholder="name these settings", scale=3, min_width=120,
                                 elem_id="fx-preset-name")
        save = gr.Button("Save preset", size="sm", scale=1, min_width=80, elem_id="fx-preset-save")
    saved = gr.BrowserState({}, storage_key="fornax-presets")
    sliders = [temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty]
    preset.input(apply_preset, [preset, saved], sliders, api_visibility="private", queue=False)
    save.click(save_preset, [preset_name, saved, *sliders], [saved, preset, preset_name], api_visibility="private",
               queue=False)
    on_load = (lambda s: gr.update(choices=preset_choices(s, current.info())), [saved], [preset])
    return Panel(runner_name, [runner_name, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                                presence_penalty, frequency_penalty, stop_strings, seed, num_samples], on_load)
