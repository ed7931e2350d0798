"""The Gradio app: Chat, Completion and Model tabs over one shared parameters panel.

Handlers are thin: they turn component values into `backend` calls and backend results into component values
(HTML/Markdown comes from render.py). Everything that touches the model runs in one queue group, one at a time.
"""
from __future__ import annotations

import functools
import inspect
import logging
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

import backend
from export.attach import ONNX_BACKENDS, PRECISIONS, attach_onnx, export_for, export_summary
from export.package import zip_export

from . import finetune, render
from .state import current

log = logging.getLogger("playground")

UI_UPDATE_INTERVAL_S = 1 / 15     # stream at most ~15 UI updates a second, however fast tokens come
MODEL_QUEUE = "model"             # concurrency_id of every event that loads or runs the model
TOP_ALTERNATIVES = 5              # alternatives per token in the Completion view
QUEUE_MAX_SIZE = 64               # beyond this, new requests are told the queue is full
DTYPES = ["auto", "float32", "bfloat16", "float16"]
STOP_SUGGESTIONS = ["\\n\\n", "\\n", "User:", "###"]
RANDOM_SEED = -1                  # the seed box's "pick one for me" (a Number box cannot be left blank)
DEFAULT_PROMPT = "The three most surprising facts about octopuses are"


class StopFlag(threading.Event):
    """Set by Stop (keep what was generated) or by Clear (`discard`: the chat was emptied, show nothing more)."""
    discard = False


# Stop: the running generation of each browser session (or gradio_client) checks its own flag between tokens.
_stop_flags: dict[str, StopFlag] = {}


# --- glue helpers -----------------------------------------------------------------------------------------------
def refusal(message: str) -> gr.Error:
    """An error the user caused, in plain words (and not logged with a traceback: nothing is broken)."""
    return gr.Error(message, print_exception=False)


def user_errors(fn):
    """Errors a user can cause reach the page as plain words; anything unexpected is logged, never shown raw."""
    def translate(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, backend.FornaxError):
            return refusal(str(e))
        log.exception("unexpected error in %s", fn.__name__)
        return refusal(f"something went wrong ({type(e).__name__}: {e}); the app is still running, try again")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:
                raise translate(e) from None
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise translate(e) from None
    return function


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


def message_text(content) -> str:
    """A chat message's text, whether Gradio hands it over as a string or as a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return (content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def is_extra_sample(message: dict) -> bool:
    """Samples 2..n of a reply are shown as collapsed notes; only sample 1 continues the conversation."""
    return bool((message.get("metadata") or {}).get("title"))


def model_messages(history: list[dict], system_prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    return messages + [{"role": m["role"], "content": message_text(m["content"])}
                       for m in history if not is_extra_sample(m)]


def text_message(role: str, text: str, title: str | None = None) -> dict:
    # Content as a typed text part: a bare string would go through inspect.cleandoc, which eats indentation.
    message = {"role": role, "content": [{"type": "text", "text": text}]}
    if title:
        message["metadata"] = {"title": title}
    return message


def reply_messages(texts: list[str]) -> list[dict]:
    return [text_message("assistant", texts[0])] + [
        text_message("assistant", t, title=f"sample {i} of {len(texts)}") for i, t in enumerate(texts[1:], 2)]


def joined_samples(texts: list[str]) -> str:
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(f"── sample {i} ──\n{t}" for i, t in enumerate(texts, 1))


def session_key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "no-session"


class Generation:
    """One streamed run: throttles UI updates, honours Stop, and measures TTFT for runs that never finish."""

    def __init__(self, stream: backend.Stream, num_samples: int, request: gr.Request | None):
        self.stream, self.key = stream, session_key(request)
        self.texts = [""] * num_samples
        self.stopped = False
        self.started = time.perf_counter()
        self.ttft_s: float | None = None
        self.flag = _stop_flags[self.key] = StopFlag()

    def updates(self):
        """Yields the sample texts so far, at most every UI_UPDATE_INTERVAL_S, and once more at the end."""
        last = 0.0
        try:
            for delta in self.stream:
                self.texts[delta.index] += delta.text
                if self.ttft_s is None:
                    self.ttft_s = time.perf_counter() - self.started
                if self.flag.is_set():
                    self.stopped = True
                    self.stream.close()  # frees the model for the next request right away
                    break
                now = time.perf_counter()
                if now - last >= UI_UPDATE_INTERVAL_S:
                    last = now
                    yield self.texts
        finally:
            self.stream.close()  # also when Gradio abandons the handler (page closed, event cancelled)
            if _stop_flags.get(self.key) is self.flag:
                del _stop_flags[self.key]
        yield self.texts

    def stats(self, backend_name: str) -> str:
        if self.stopped or self.stream.result is None:
            return render.stopped_line(self.ttft_s, time.perf_counter() - self.started)
        return render.stats_line(self.stream.result, backend_name)


def start_stream(handle: backend.ModelHandle, prompt_or_messages, backend_name: str | None, params: dict,
                 **extra) -> tuple[backend.Stream, str]:
    """Validates everything (raising before the first UI update) and returns the stream and the backend used."""
    name = backend_name or handle.backend  # an unknown name is the backend's to reject, naming the ones it has
    if name in ONNX_BACKENDS and name not in handle.runners:
        attach_onnx(handle, ONNX_BACKENDS[name])  # an API caller picked it without the dropdown: export now
    return handle.stream(prompt_or_messages, backend=name, **params, **extra), name


# --- handlers ---------------------------------------------------------------------------------------------------
@user_errors
def load_model(source: str, dtype: str = "auto", progress=gr.Progress()):
    """Load `default`, an HF folder, a .gguf file or a Hub id; the old model is freed once the new one is ready."""
    source = (source or "").strip()
    if not source:
        raise refusal("type a model to load: default, a model folder, a .gguf path, or a Hub id like org/name")
    handle = current.load(source, dtype=None if dtype in (None, "", "auto") else dtype,
                          progress=lambda fraction, message: progress(fraction, desc=message))
    gr.Info(f"Loaded {handle.info()['name']} in {handle.load_seconds:.1f} s")
    return model_outputs()


@user_errors
def load_upload(file, dtype: str = "auto", progress=gr.Progress()):
    """Load an uploaded .gguf file."""
    if file is None:
        raise refusal("no file was uploaded")
    return load_model(file if isinstance(file, str) else file.name, dtype, progress)


def backend_dropdown(model_info: dict | None, value: str | None = None, **layout) -> gr.Dropdown:
    """The loaded model's execution paths, plus the ONNX Runtime ones an export would add (a model that has
    PyTorch weights can be exported; one loaded from an ONNX folder already runs on ONNX Runtime only)."""
    ready = model_info["backends"] if model_info else []
    on_demand = [n for n in ONNX_BACKENDS if n not in ready] if "eager" in ready else []
    value = value if value in ready else (ready[0] if ready else None)
    return gr.Dropdown(choices=render.backend_choices(ready, on_demand), value=value, **layout)


def model_outputs():
    """Model card, page badge and backend choices for whatever model is current."""
    info = current.info()
    return render.model_card(info), render.model_badge(info), backend_dropdown(info)


@user_errors
def choose_backend(name: str, progress=gr.Progress()):
    """Picking an ONNX Runtime path in the dropdown exports the model for it (once; cached on disk)."""
    if name in ONNX_BACKENDS:
        with current.using() as handle:
            if name not in handle.runners:
                attach_onnx(handle, ONNX_BACKENDS[name], progress=lambda f, m: progress(f, desc=m))
                gr.Info(f"{render.BACKEND_LABELS[name]} is ready (the export is cached for next time)")
    info = current.info()
    return backend_dropdown(info, name), render.model_card(info)


@user_errors
def export_model(precision: str, progress=gr.Progress()):
    """Export the loaded model to ONNX at `precision`; returns the report, a zip to download and the backends."""
    if precision not in PRECISIONS:
        raise refusal(f"pick a precision: {', '.join(PRECISIONS)}")
    quant = PRECISIONS[precision]
    with current.using() as handle:
        folder = export_for(handle, quant, progress=lambda f, m: progress(0.9 * f, desc=m))
        name = attach_onnx(handle, quant)
    progress(0.92, desc="packing the download")
    archive = zip_export(folder, Path(tempfile.gettempdir()) / "fornax-exports" / folder.name,
                         f"{current.info()['name']}-onnx-{precision}")
    report = render.export_report(export_summary(folder), precision, str(folder), render.BACKEND_LABELS[name])
    info = current.info()
    return report, str(archive), backend_dropdown(info, name), render.model_card(info)


@user_errors
def chat(message: str, history: list, system_prompt: str, backend_name: str, max_new_tokens: int,
         temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
         presence_penalty: float, frequency_penalty: float, stop: list, seed: int | None, num_samples: int,
         request: gr.Request = None):
    """Send `message` after `history`; streams (history with the reply, cleared input box, stats)."""
    if not message or not message.strip():
        raise refusal("the message is empty: type something to send")
    history = list(history or []) + [text_message("user", message)]
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, num_samples)
    for view, stats in reply(history, system_prompt, backend_name, params, request):
        yield view, "", stats


@user_errors
def regenerate(history: list, system_prompt: str, backend_name: str, max_new_tokens: int, temperature: float,
               top_k: int, top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
               frequency_penalty: float, stop: list, seed: int | None, num_samples: int,
               request: gr.Request = None):
    """Drop the last reply and answer the last user message again."""
    history = list(history or [])
    while history and history[-1]["role"] != "user":
        history.pop()
    if not history:
        raise refusal("nothing to regenerate: send a message first")
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, num_samples)
    yield from reply(history, system_prompt, backend_name, params, request)


def reply(history: list[dict], system_prompt: str, backend_name: str, params: dict, request):
    with current.using() as handle:
        stream, name = start_stream(handle, model_messages(history, system_prompt), backend_name, params)
        run = Generation(stream, params["num_samples"], request)
        yield history + reply_messages(run.texts), "*generating…*"
        for texts in run.updates():
            if run.flag.discard:  # Clear: any later update would put the emptied chat back on the page
                return
            yield history + reply_messages(texts), "*generating…*"
        if not run.flag.discard:
            yield history + reply_messages(run.texts), run.stats(name)


@user_errors
def complete(prompt: str, backend_name: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             min_p: float, repetition_penalty: float, presence_penalty: float, frequency_penalty: float,
             stop: list, seed: int | None, num_samples: int, request: gr.Request = None):
    """Continue `prompt`; streams (continuation text, probability-coloured tokens HTML, stats)."""
    if not prompt or not prompt.strip():
        raise refusal("the prompt is empty: write something for the model to continue")
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, num_samples)
    pending = "<div class='fx-empty'>token probabilities appear when the run finishes…</div>"
    with current.using() as handle:
        stream, name = start_stream(handle, prompt, backend_name, params, top_logprobs=TOP_ALTERNATIVES)
        run = Generation(stream, params["num_samples"], request)
        yield "", pending, "*generating…*"
        for texts in run.updates():
            yield joined_samples(texts), pending, "*generating…*"
        if stream.result is None:  # stopped: no per-token data to colour
            yield joined_samples(run.texts), "<div class='fx-empty'>stopped before the end</div>", run.stats(name)
        else:
            yield joined_samples(run.texts), render.token_view(prompt, stream.result), run.stats(name)


def stop(request: gr.Request = None):
    """Stop this session's running generation (it keeps what it has generated so far)."""
    flag = _stop_flags.get(session_key(request))
    if flag is not None:
        flag.set()


def clear(request: gr.Request = None):
    """Empty the chat (and stop a reply still streaming into it, discarding it)."""
    flag = _stop_flags.get(session_key(request))
    if flag is not None:
        flag.discard = True
        flag.set()
    return [], ""


def refresh():
    """On page load: show the model that is current now (another user may have switched it)."""
    return model_outputs()


# --- layout -----------------------------------------------------------------------------------------------------
def param_slider(*args, **kwargs) -> gr.Slider:
    """A slider whose range guides the UI only. The backend validates the value and names the parameter
    ("top_p must be in (0, 1], got 5") where Gradio would say "Value 5 is greater than maximum value 1", and it
    knows the real limits (max_new_tokens is bounded by the model's context, not by the slider)."""
    slider = gr.Slider(*args, **kwargs)
    # Per instance: subclassing a Gradio component makes Gradio write a .pyi stub next to this file on import.
    slider.preprocess = lambda payload: payload
    return slider


def build_app() -> gr.Blocks:
    info = current.info()
    # Uploaded .gguf files are converted into the backend's own cache on load; Gradio's copies go after an hour.
    with gr.Blocks(title="Fornax playground", delete_cache=(3600, 3600)) as demo:
        with gr.Row(equal_height=True, elem_id="fx-header"):
            gr.Markdown("## Fornax playground", elem_id="fx-title")
            badge = gr.HTML(render.model_badge(info), elem_id="fx-model-badge")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Chat", id="chat"):
                        system_prompt = gr.Textbox(label="System prompt", lines=1, max_lines=6,
                                                   placeholder="optional, e.g. You are a concise assistant.")
                        chatbot = gr.Chatbot(label="Chat", height=460, elem_id="fx-chatbot", feedback_options=None,
                                             buttons=["copy", "copy_all"],
                                             placeholder="Ask the model something. Replies stream as they are "
                                                         "generated; the parameters on the right apply.")
                        with gr.Row(equal_height=True):
                            message = gr.Textbox(show_label=False, placeholder="Message (Enter to send)", scale=6,
                                                 lines=1, max_lines=8, autofocus=True, elem_id="fx-message")
                            send = gr.Button("Send", variant="primary", scale=1, elem_id="fx-send")
                        with gr.Row():
                            stop_chat = gr.Button("Stop", size="sm", variant="stop", elem_id="fx-stop-chat")
                            regen = gr.Button("Regenerate", size="sm", elem_id="fx-regenerate")
                            clear_chat = gr.Button("Clear", size="sm", elem_id="fx-clear")
                        chat_stats = gr.Markdown(elem_classes="fx-stats", elem_id="fx-chat-stats")
                    with gr.Tab("Completion", id="completion"):
                        prompt = gr.Textbox(label="Prompt", lines=4, max_lines=20, value=DEFAULT_PROMPT,
                                            elem_id="fx-prompt")
                        with gr.Row():
                            run_complete = gr.Button("Generate", variant="primary", elem_id="fx-generate")
                            stop_complete = gr.Button("Stop", variant="stop", elem_id="fx-stop-complete")
                        continuation = gr.Textbox(label="Continuation", lines=4, max_lines=20, interactive=False,
                                                  buttons=["copy"], elem_id="fx-continuation")
                        token_html = gr.HTML("<div class='fx-empty'>After a run, every generated token appears here "
                                             "coloured by its probability.</div>", elem_id="fx-token-view")
                        complete_stats = gr.Markdown(elem_classes="fx-stats", elem_id="fx-complete-stats")
                    with gr.Tab("Model", id="model"):
                        with gr.Row(equal_height=True):
                            source = gr.Textbox(label="Model", value="default", scale=5, elem_id="fx-source",
                                                info="default · a model folder · a .gguf path · a Hub id (org/name)")
                            dtype = gr.Dropdown(DTYPES, value="auto", label="dtype", scale=1, min_width=120,
                                                info="auto: float32 on CPU")
                            load_button = gr.Button("Load", variant="primary", scale=1, min_width=100,
                                                    elem_id="fx-load")
                        with gr.Accordion("Upload a .gguf file", open=False):
                            upload = gr.File(show_label=False, file_types=[".gguf"], type="filepath", height=110)
                        card = gr.HTML(render.model_card(info), elem_id="fx-model-card")
                    with gr.Tab("Export", id="export"):
                        gr.Markdown("Export the loaded model to **ONNX** for ONNX Runtime: one graph with a KV cache "
                                    "that optimum's `ORTModelForCausalLM` and any ONNX Runtime client can run. "
                                    "int8 and int4 quantise the weights (onnxruntime's MatMulNBits): smaller and "
                                    "faster on a CPU, a little less exact — the parity report says how much. "
                                    "The export is checked against the PyTorch model and added to the Backend "
                                    "selector.")
                        with gr.Row(equal_height=True):
                            precision = gr.Radio(list(PRECISIONS), value="int8", label="Precision", scale=3,
                                                 elem_id="fx-precision")
                            export_button = gr.Button("Export to ONNX", variant="primary", scale=1,
                                                      elem_id="fx-export")
                        export_report = gr.Markdown("", elem_id="fx-export-report")
                        export_file = gr.File(label="Download (.zip)", interactive=False, elem_id="fx-export-file")
                    with gr.Tab("Finetune", id="finetune"):
                        finetune_tab = gr.Column()
            with gr.Column(scale=1, min_width=280, elem_id="fx-params"):
                gr.Markdown("### Parameters")
                backend_name = backend_dropdown(info, label="Backend", allow_custom_value=True, elem_id="fx-backend",
                                                info="execution path of the loaded model")
                max_new_tokens = param_slider(1, 2048, value=256, step=1, label="Max new tokens",
                                              elem_id="fx-max-new-tokens")
                temperature = param_slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 = greedy",
                                           elem_id="fx-temperature")
                top_k = param_slider(0, 200, value=0, step=1, label="Top-k", elem_id="fx-top-k", info="0 = off")
                top_p = param_slider(0.01, 1, value=0.95, step=0.01, label="Top-p", elem_id="fx-top-p")
                min_p = param_slider(0, 0.99, value=0.0, step=0.01, label="Min-p", elem_id="fx-min-p", info="0 = off")
                with gr.Accordion("Penalties", open=False):
                    repetition_penalty = param_slider(0.5, 2, value=1.0, step=0.01, label="Repetition penalty",
                                                      info="1 = off")
                    presence_penalty = param_slider(-2, 2, value=0.0, step=0.05, label="Presence penalty")
                    frequency_penalty = param_slider(-2, 2, value=0.0, step=0.05, label="Frequency penalty")
                stop_strings = gr.Dropdown(STOP_SUGGESTIONS, value=[], multiselect=True, allow_custom_value=True,
                                           label="Stop strings", info="type and press Enter; \\n is a newline",
                                           elem_id="fx-stop")
                seed = gr.Number(value=RANDOM_SEED, precision=0, label="Seed", elem_id="fx-seed",
                                 info="-1 = random; the seed used is shown after each run")
                num_samples = param_slider(1, 16, value=1, step=1, label="Samples", elem_id="fx-samples",
                                           info="independent samples, decoded as one batch")

        with finetune_tab:
            on_page_load = finetune.build_tab(source, [card, badge, backend_name], load_model, dtype,
                                              dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1))

        params = [backend_name, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                  presence_penalty, frequency_penalty, stop_strings, seed, num_samples]
        model_events = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)

        chat_event = gr.on([send.click, message.submit], chat, [message, chatbot, system_prompt, *params],
              [chatbot, message, chat_stats], api_name="chat", show_progress="minimal", **model_events)
        regen_event = regen.click(regenerate, [chatbot, system_prompt, *params], [chatbot, chat_stats], api_name="regenerate",
                    show_progress="minimal", **model_events)
        # The prompt box takes Enter as a newline (prompts are often multi-line): only the button runs it.
        run_complete.click(complete, [prompt, *params], [continuation, token_html, complete_stats],
                           api_name="complete", show_progress="minimal", **model_events)
        gr.on([stop_chat.click, stop_complete.click], stop, None, None, api_name="stop", concurrency_limit=None)
        # Clear also cancels a reply in flight, so no late update can put the old chat back.
        clear_chat.click(clear, None, [chatbot, chat_stats], api_name="clear", concurrency_limit=None,
                         cancels=[chat_event, regen_event])
        gr.on([load_button.click, source.submit], load_model, [source, dtype], [card, badge, backend_name],
              api_name="load", show_progress_on=card, **model_events)
        upload.upload(load_upload, [upload, dtype], [card, badge, backend_name], api_name="load_upload",
                      show_progress_on=card, **model_events)
        backend_name.input(choose_backend, backend_name, [backend_name, card], show_progress_on=backend_name,
                           api_visibility="private", **model_events)
        export_button.click(export_model, precision, [export_report, export_file, backend_name, card],
                            api_name="export", **model_events)
        demo.load(refresh, None, [card, badge, backend_name], api_visibility="private")
        poll_fn, poll_outputs = on_page_load  # shows the latest job, and reattaches to it if it is running
        demo.load(poll_fn, None, poll_outputs, api_visibility="private", show_progress="hidden")
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)
    return demo


def launch_options() -> dict:
    """What Gradio 6 takes at launch rather than in Blocks(): look and feel, and no outbound calls."""
    return dict(css=render.CSS + finetune.CSS + LAYOUT_CSS, theme=gr.themes.Soft(primary_hue="indigo"), share=False,
                footer_links=["api", "settings"])


LAYOUT_CSS = """
#fx-header { align-items: center; }
#fx-title h2 { margin: 0; }
#fx-model-badge { text-align: right; }
#fx-params { gap: 6px; }
"""
