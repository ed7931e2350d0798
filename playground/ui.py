"""The Gradio app: the tabs (playground/tabs/, one module each) laid out beside the shared parameters panel.

Handlers are thin: they turn component values into `backend` calls and backend results into component values
(HTML/Markdown comes from render.py). Everything that touches the model runs in one queue group, one at a time.
"""
from __future__ import annotations

import gradio as gr

from backend import limits

from . import deployment, hardening, render
from .state import MODEL_EVENTS, current
from .streaming import stop
from .tabs import chat, completion, evaluate, export, fill_mask, finetune, kernel_lab, model, params, race

QUEUE_MAX_SIZE = 64               # beyond this, new requests are told the queue is full (one visitor's share:
#                                   limits.max_queued_per_session / _per_address, see hardening.cap_queue)
DELETE_CACHE_PRIVATE = (3600, 3600)   # Gradio's delete_cache: (how often to look, age to delete) in seconds
DELETE_CACHE_PUBLIC = (600, 1800)
TABS = [("chat", "Chat"), ("completion", "Completion"), ("race", "Race"), ("fill_mask", "Fill-mask"),
        ("model", "Model"), ("evaluate", "Evaluate"), ("export", "Export"), ("finetune", "Finetune"),
        ("kernel_lab", "Kernel lab")]


def build_app() -> gr.Blocks:
    """The app for the deployment mode in force now (FORNAX_PUBLIC; see backend/limits.py and deployment.py)."""
    if deployment.public():
        deployment.refuse_server_token()
    hardening.patch_gradio()  # its refusals apply to public mode only, checked per request
    info = current.info()
    # Uploaded .gguf files are converted into the backend's own cache on load (training data is copied by its job):
    # Gradio's copies go after an hour, in public mode after half an hour, looked for every ten minutes (uploads
    # per address are capped per hour too: limits.max_upload_bytes_per_hour).
    with gr.Blocks(title="Fornax playground", delete_cache=DELETE_CACHE_PUBLIC if deployment.public() else
                   DELETE_CACHE_PRIVATE) as demo:
        with gr.Row(equal_height=True, elem_id="fx-header"):
            gr.Markdown("## Fornax playground", elem_id="fx-title")
            badge = gr.HTML(render.model_badge(info), elem_id="fx-model-badge")
        with gr.Row():
            with gr.Column(scale=3):
                shown = fill_mask.tabs_for(info)  # Chat / Completion / Fill-mask: what the model can do
                first = next(tab_id for tab_id, _ in TABS if shown.get(tab_id, True))
                with gr.Tabs(selected=first):
                    tabs = {}
                    for tab_id, label in TABS:  # filled below, once the panel they all read exists
                        visible = fill_mask.tab_visible(shown.get(tab_id, True))
                        with gr.Tab(label, id=tab_id, visible=visible) as tabs[tab_id]:
                            pass
            with gr.Column(scale=1, min_width=280, elem_id="fx-params"):
                panel = params.build(info)
        with tabs["chat"]:
            stop_chat = chat.build(panel)
        with tabs["completion"]:
            stop_complete = completion.build(panel)
        with tabs["race"]:
            stop_race = race.build(panel, tabs["race"])
        with tabs["fill_mask"]:
            mask_token, insert_mask = fill_mask.build()
        with tabs["model"]:
            model_tab = model.build(info, badge, panel.runner_name)
        with tabs["evaluate"]:
            evaluate_tab = evaluate.build((info or {}).get("runners"), MODEL_EVENTS)
        with tabs["export"]:
            export.build(panel.runner_name, model_tab.card)
        with tabs["finetune"]:
            poll_fn, poll_outputs = finetune.build(model_tab.source, [model_tab.card, badge, panel.runner_name],
                                                   model.load_model, model_tab.dtype, MODEL_EVENTS,
                                                   [evaluate_tab["history"], evaluate_tab["chart"]])
        with tabs["kernel_lab"]:
            kernel_lab.build()
        gr.on([stop_chat.click, stop_complete.click, stop_race.click], stop, None, None, api_name="stop",
              concurrency_limit=None)
        # Every load (Model tab, upload, a finished job, another visitor's load seen at page load) changes the badge:
        # then the tabs follow the model.
        generation_tabs = [tabs[t] for t in fill_mask.SWITCHED]
        badge.change(fill_mask.switch_tabs, None, [*generation_tabs, mask_token, insert_mask],
                     api_visibility="private", queue=False)
        demo.load(*panel.on_load, api_visibility="private", queue=False)  # this browser's saved presets
        demo.load(model.refresh, None, [model_tab.card, badge, panel.runner_name], api_visibility="private")
        # shows the latest training job, and reattaches to it if it is running
        demo.load(poll_fn, None, poll_outputs, api_visibility="private", show_progress="hidden")
    # Public mode: /gradio_api/run/* may not skip the queue (Gradio opens it off Spaces); queue=False events stay.
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1, api_open=not deployment.public())
    hardening.cap_queue(demo)
    return demo


def launch_options() -> dict:
    """What Gradio 6 takes at launch rather than in Blocks(): look and feel, no outbound calls, and in public
    mode the upload cap (Gradio refuses a bigger file before it is written anywhere); the request guards
    (hardening.BodyCap, the visitor cookie) as middleware of Gradio's app."""
    options = dict(css=render.CSS + render.JOB_CSS + render.MASK_CSS + LAYOUT_CSS + chat.GAUGE_CSS
                   + race.RACE_CSS,
                   theme=gr.themes.Soft(primary_hue="indigo"),
                   share=False, footer_links=["api", "settings"],
                   app_kwargs={"middleware": [*hardening.middleware(), *deployment.middleware()]})
    if deployment.public():
        options["max_file_size"] = limits.current().max_upload_bytes
    return options


LAYOUT_CSS = """
#fx-header { align-items: center; }
#fx-title h2 { margin: 0; }
#fx-model-badge { text-align: right; }
#fx-params { gap: 6px; }
"""
