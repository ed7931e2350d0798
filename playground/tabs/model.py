"""The Model tab: load `default`, a folder, a .gguf path or upload, or a Hub id; the card of what is loaded; and the
Backend choices that follow the loaded model (shared with the parameters panel and the Export tab)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from backend.runners import PREPARABLE
from export.attach import ONNX_BACKENDS, attach_onnx

from .. import deployment, prepare, render
from ..errors import refusal, user_errors
from ..state import MODEL_EVENTS, current

DTYPES = ["auto", "float32", "bfloat16", "float16"]


@user_errors
def load_model(source: str, dtype: str = "auto", progress=gr.Progress(), request: gr.Request = None):
    """Load `default`, an HF folder, a .gguf file or a Hub id; the old model is freed once the new one is ready."""
    source = (source or "").strip()
    if not source:
        raise refusal("type a model to load: default, a model folder, a .gguf path, or a Hub id like org/name")
    deployment.check_swap()
    folder = deployment.check_source(source, request)
    if folder == source or deployment.hub_allowed(source):  # default, a Hub id (anyone's to use; a pinned one
        return load_source(folder, dtype, progress)         # as `org/name@rev`), or a private user's path
    return load_source(folder, dtype, progress, owner=deployment.visitor_id(request), shown=source)


def load_source(source: str, dtype: str, progress, owner: str | None = None, shown: str | None = None):
    """Load a source the deployment's rules have already allowed; `owner`: the visitor whose upload or result it
    is (only they may export it), `shown`: its name on the page."""
    handle = current.load(source, dtype=None if dtype in (None, "", "auto") else dtype,
                          progress=lambda fraction, message: progress(fraction, desc=message), owner=owner,
                          shown=shown)
    gr.Info(f"Loaded {handle.info()['name']} in {handle.load_seconds:.1f} s")
    return model_outputs()


@user_errors
def load_upload(file, dtype: str = "auto", progress=gr.Progress(), request: gr.Request = None):
    """Load an uploaded .gguf file (checked against the upload cap before it is read)."""
    if file is None:
        raise refusal("no file was uploaded")
    path = file if isinstance(file, str) else file.name
    deployment.check_swap()
    deployment.check_upload(path, request=request)
    return load_source(path, dtype, progress, owner=deployment.visitor_id(request),
                       shown=os.path.basename(path))


def backend_dropdown(model_info: dict | None, value: str | None = None, **layout) -> gr.Dropdown:
    """The loaded model's execution paths, plus the ONNX Runtime ones an export would add (a model that has
    PyTorch weights can be exported; one loaded from an ONNX folder already runs on ONNX Runtime only). Opens on
    `value`, else on the path prepared at start-up (playground/prepare.py) when it is ready, else the first one."""
    ready = model_info["prepared"] if model_info else []
    offered = [n for n in model_info["runners"] if n not in ready] if model_info else []
    exportable = render.capabilities(model_info)["quants"] if model_info else ()  # encoders, LSTMs: no int4
    on_demand = offered + ([n for n, q in ONNX_BACKENDS.items() if n not in ready and q in exportable]
                           if "eager" in ready else [])
    if value not in ready:
        value = prepare.preferred(model_info) or (ready[0] if ready else None)
    return gr.Dropdown(choices=render.backend_choices(ready, on_demand), value=value, **layout)


def model_outputs():
    """Model card, page badge and backend choices for whatever model is current."""
    info = current.info()
    return render.model_card(info), render.model_badge(info), backend_dropdown(info)


@user_errors
def choose_backend(name: str, progress=gr.Progress()):
    """Picking an ONNX Runtime path in the dropdown exports the model for it (once; cached on disk); picking the
    compiled path compiles the model (once per process; inductor's disk cache makes a restart quicker)."""
    if name in PREPARABLE:
        with current.using() as handle:
            if name not in handle.runners:
                say = lambda f, m: progress(f, desc=m)  # noqa: E731
                say(0.05, f"preparing {render.BACKEND_LABELS.get(name, name)} (compiling takes a minute or more)")
                handle.runner(name, progress=say)
                handle.generate("Hello", backend=name, max_new_tokens=2, temperature=0, ignore_eos=True)
                gr.Info(f"{render.BACKEND_LABELS.get(name, name)} is ready")
    elif name in ONNX_BACKENDS:
        with current.using() as handle:
            if name not in handle.runners:
                attach_onnx(handle, ONNX_BACKENDS[name], progress=lambda f, m: progress(f, desc=m))
                gr.Info(f"{render.BACKEND_LABELS[name]} is ready (the export is cached for next time)")
    info = current.info()
    return backend_dropdown(info, name), render.model_card(info)


def refresh():
    """On page load: show the model that is current now (another user may have switched it)."""
    return model_outputs()


@dataclass
class ModelTab:
    source: gr.Textbox
    dtype: gr.Dropdown
    card: gr.HTML


def build(info: dict | None, badge: gr.HTML, runner_name: gr.Dropdown) -> ModelTab:
    """The tab's components and events; loading updates the card, the page `badge` and the panel's `runner_name`."""
    with gr.Row(equal_height=True):
        source = gr.Textbox(label="Model", value="default", scale=5, elem_id="fx-source",
                            info="default · a model folder · a .gguf path · a Hub id (org/name)")
        dtype = gr.Dropdown(DTYPES, value="auto", label="dtype", scale=1, min_width=120, info="auto: float32 on CPU")
        load_button = gr.Button("Load", variant="primary", scale=1, min_width=100, elem_id="fx-load")
    with gr.Accordion("Upload a .gguf file", open=False):
        upload = gr.File(show_label=False, file_types=[".gguf"], type="filepath", height=110, elem_id="fx-gguf-upload")
    card = gr.HTML(render.model_card(info), elem_id="fx-model-card")

    outputs = [card, badge, runner_name]
    gr.on([load_button.click, source.submit], load_model, [source, dtype], outputs, api_name="load",
          show_progress_on=card, **MODEL_EVENTS)
    upload.upload(load_upload, [upload, dtype], outputs, api_name="load_upload", show_progress_on=card,
                  **MODEL_EVENTS)
    runner_name.input(choose_backend, runner_name, [runner_name, card], show_progress_on=runner_name,
                       api_visibility="private", **MODEL_EVENTS)
    return ModelTab(source, dtype, card)
