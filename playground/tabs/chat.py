"""The Chat tab: the model's chat template, a system prompt, streamed replies, Stop, Regenerate, Clear."""
from __future__ import annotations

import gradio as gr

from .. import deployment
from ..errors import refusal, user_errors
from ..state import MODEL_EVENTS, current
from ..streaming import Generation, signal_stop, start_stream
from .params import Panel, sampling_kwargs


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


def conversation_chars(history: list[dict], system_prompt: str | None) -> int:
    """The characters a chat sends to the model: what the prompt-length cap counts, before any tokenizing."""
    return len(system_prompt or "") + sum(len(message_text(m.get("content") if isinstance(m, dict) else m))
                                            for m in history)


def text_message(role: str, text: str, title: str | None = None) -> dict:
    # Content as a typed text part: a bare string would go through inspect.cleandoc, which eats indentation.
    message = {"role": role, "content": [{"type": "text", "text": text}]}
    if title:
        message["metadata"] = {"title": title}
    return message


def reply_messages(texts: list[str]) -> list[dict]:
    return [text_message("assistant", texts[0])] + [
        text_message("assistant", t, title=f"sample {i} of {len(texts)}") for i, t in enumerate(texts[1:], 2)]


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
    deployment.check_sampling(params, conversation_chars(history, system_prompt))
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
    deployment.check_sampling(params, conversation_chars(history, system_prompt))
    yield from reply(history, system_prompt, backend_name, params, request)


def reply(history: list[dict], system_prompt: str, backend_name: str, params: dict, request):
    with current.using() as handle:
        stream, name = start_stream(handle, model_messages(history, system_prompt), backend_name, params, request)
        run = Generation(stream, params["num_samples"], request)
        yield history + reply_messages(run.texts), "*generating…*"
        for texts in run.updates():
            if run.flag.discard:  # Clear: any later update would put the emptied chat back on the page
                return
            yield history + reply_messages(texts), "*generating…*"
        if not run.flag.discard:
            yield history + reply_messages(run.texts), run.stats(name)


def clear(request: gr.Request = None):
    """Empty the chat (and stop a reply still streaming into it, discarding it)."""
    signal_stop(request, discard=True)
    return [], ""


def build(panel: Panel) -> gr.Button:
    """The tab's components and events, inside the caller's `gr.Tab`. Returns its Stop button (one /stop serves
    every tab: see ui.py)."""
    system_prompt = gr.Textbox(label="System prompt", lines=1, max_lines=6,
                               placeholder="optional, e.g. You are a concise assistant.")
    chatbot = gr.Chatbot(label="Chat", height=460, elem_id="fx-chatbot", feedback_options=None,
                         buttons=["copy", "copy_all"],
                         placeholder="Ask the model something. Replies stream as they are generated; the "
                                     "parameters on the right apply.")
    with gr.Row(equal_height=True):
        message = gr.Textbox(show_label=False, placeholder="Message (Enter to send)", scale=6, lines=1, max_lines=8,
                             autofocus=True, elem_id="fx-message")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="fx-send")
    with gr.Row():
        stop_chat = gr.Button("Stop", size="sm", variant="stop", elem_id="fx-stop-chat")
        regen = gr.Button("Regenerate", size="sm", elem_id="fx-regenerate")
        clear_chat = gr.Button("Clear", size="sm", elem_id="fx-clear")
    chat_stats = gr.Markdown(elem_classes="fx-stats", elem_id="fx-chat-stats")

    chat_event = gr.on([send.click, message.submit], chat, [message, chatbot, system_prompt, *panel.inputs],
                       [chatbot, message, chat_stats], api_name="chat", show_progress="minimal", **MODEL_EVENTS,
                       **deployment.event_options())
    regen_event = regen.click(regenerate, [chatbot, system_prompt, *panel.inputs], [chatbot, chat_stats],
                              api_name="regenerate", show_progress="minimal", **MODEL_EVENTS,
                              **deployment.event_options())
    # Clear also cancels a reply in flight, so no late update can put the old chat back.
    clear_chat.click(clear, None, [chatbot, chat_stats], api_name="clear", concurrency_limit=None,
                     cancels=[chat_event, regen_event])
    return stop_chat
