"""The Chat tab: the model's chat template, a system prompt, streamed replies, Stop, Clear, and a chat that never
loses a reply: Regenerate and editing a message add siblings (branches.py), arrows move between them, Continue
extends the last reply."""
from __future__ import annotations

import copy
import os

import gradio as gr

import backend
from backend import limits

from .. import deployment
from ..errors import refusal, user_errors
from ..state import MODEL_EVENTS, current
from ..streaming import Generation, signal_stop, start_stream
from . import branches, chat_files
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


def synced(tree: dict | None, history: list) -> dict:
    """This session's tree, or a one-branch tree of `history` when they differ (an API client sends its own)."""
    shown = [{"role": m["role"], "content": message_text(m["content"])} for m in history or []
             if not is_extra_sample(m)]
    if tree is not None and branches.messages(tree) == shown:
        return copy.deepcopy(tree)  # a failed run leaves the session's tree as it was
    return branches.from_messages(shown)


def view(tree: dict) -> list[dict]:
    return [text_message(n["role"], n["content"]) for n in branches.path(tree)]


def check(params: dict, tree: dict, system_prompt: str, extra: str = "") -> None:
    deployment.check_sampling(params, len(system_prompt or "") + len(extra) +
                              sum(len(n["content"]) for n in branches.path(tree)))


@user_errors
def chat(message: str, history: list, system_prompt: str, backend_name: str, max_new_tokens: int,
         temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
         presence_penalty: float, frequency_penalty: float, stop: list, seed: int | None, num_samples: int,
         tree: dict | None = None, request: gr.Request = None):
    """Send `message` after `history`; streams (history with the reply, cleared input box, stats, tree)."""
    if not message or not message.strip():
        raise refusal("the message is empty: type something to send")
    tree = synced(tree, history)
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, num_samples)
    check(params, tree, system_prompt, message)
    branches.append(tree, branches.node("user", message))
    for shown, stats, tree in reply(tree, system_prompt, backend_name, params, request):
        yield shown, "", stats, tree


@user_errors
def regenerate(history: list, system_prompt: str, backend_name: str, max_new_tokens: int, temperature: float,
               top_k: int, top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
               frequency_penalty: float, stop: list, seed: int | None, num_samples: int,
               tree: dict | None = None, request: gr.Request = None):
    """Answer the last user message again; the earlier reply stays as a sibling (the arrows move between them)."""
    tree = synced(tree, history)
    at = len(branches.path(tree)) - 1
    while at >= 0 and branches.path(tree)[at]["role"] != "user":
        at -= 1
    if at < 0:
        raise refusal("nothing to regenerate: send a message first")
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, num_samples)
    check(params, tree, system_prompt)
    replace = at + 1 if at + 1 < len(branches.path(tree)) else None
    yield from reply(tree, system_prompt, backend_name, params, request, sibling_of=replace)


@user_errors
def edit(history: list, system_prompt: str, backend_name: str, max_new_tokens: int, temperature: float,
         top_k: int, top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
         frequency_penalty: float, stop: list, seed: int | None, num_samples: int, tree: dict | None,
         edited: gr.EditData, request: gr.Request = None):
    """A user message edited in place: the edit becomes a sibling of the old message (which keeps its replies)
    and is answered anew."""
    tree = synced(tree, history)
    at = edited.index if isinstance(edited.index, int) else edited.index[0]
    text = message_text(edited.value)
    path = branches.path(tree)
    if not (0 <= at < len(path)) or path[at]["role"] != "user":
        raise refusal("only your own messages can be edited")
    if not text.strip():
        raise refusal("the message is empty: type something to send")
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, num_samples)
    check(params, tree, system_prompt, text)
    branches.branch(tree, at, branches.node("user", text))
    yield from reply(tree, system_prompt, backend_name, params, request)


@user_errors
def continue_reply(history: list, system_prompt: str, backend_name: str, max_new_tokens: int, temperature: float,
                   top_k: int, top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
                   frequency_penalty: float, stop: list, seed: int | None, num_samples: int,
                   tree: dict | None = None, request: gr.Request = None):
    """Extend the last reply without a new turn: the chat template up to the reply's start, then the reply's text
    with no end-of-turn, so the model carries on writing it."""
    tree = synced(tree, history)
    path = branches.path(tree)
    if not path or path[-1]["role"] != "assistant":
        raise refusal("nothing to continue: the last message is not a reply")
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, 1)
    check(params, tree, system_prompt)
    last = path[-1]
    with current.using() as handle:
        head = handle.encode(model_messages(view(tree)[:-1], system_prompt))  # (refuses a model with no chat)
        ids = head + handle.tokenizer.encode(last["content"], add_special_tokens=False)
        stream, name = start_stream(handle, ids, backend_name, params, request)
        run = Generation(stream, 1, request)
        before = view(tree)[:-1]
        for texts in run.updates():
            if run.flag.discard:
                return
            yield before + [text_message("assistant", last["content"] + texts[0])], "*generating…*", tree
        if not run.flag.discard:
            last["content"] += run.texts[0]
            yield view(tree), run.stats(name), tree


def reply(tree: dict, system_prompt: str, backend_name: str, params: dict, request, sibling_of: int | None = None):
    """Stream a reply to the visible path (as a sibling of the message at `sibling_of`, else after the path);
    yields (shown history, stats, tree). Samples 2..n are kept as siblings of sample 1 and shown as notes."""
    before = view(tree) if sibling_of is None else view(tree)[:sibling_of]
    with current.using() as handle:
        stream, name = start_stream(handle, model_messages(before, system_prompt), backend_name, params, request)
        run = Generation(stream, params["num_samples"], request)
        yield before + reply_messages(run.texts), "*generating…*", tree
        for texts in run.updates():
            if run.flag.discard:  # Clear: any later update would put the emptied chat back on the page
                return
            yield before + reply_messages(texts), "*generating…*", tree
        if run.flag.discard:
            return
        first = branches.node("assistant", run.texts[0])
        if sibling_of is None:
            branches.append(tree, first)
        else:
            branches.branch(tree, sibling_of, first)
        up = branches.parent(tree, len(branches.path(tree)) - 1)
        shown = up["active"]
        up["children"] += [branches.node("assistant", t) for t in run.texts[1:]]
        up["active"] = shown
        yield view(tree) + reply_messages(run.texts)[1:], run.stats(name), tree


def focused(tree: dict | None, focus: int | None) -> int | None:
    """The message the arrows act on: the one clicked last, else the last reply."""
    n = len(branches.path(tree)) if tree else 0
    if focus is not None and 0 <= focus < n:
        return focus
    return n - 1 if n else None


def branch_label(tree: dict | None, focus: int | None = None) -> str:
    at = focused(tree, focus)
    if at is None:
        return ""
    i, m = branches.siblings(tree, at)
    what = "reply" if branches.path(tree)[at]["role"] == "assistant" else "message"
    return f"{what} {i} of {m}" if m > 1 else ""


def step(direction: int):
    def move(tree: dict | None, focus: int | None):
        """Show the previous / next sibling of the focused message (and the branch below it)."""
        at = focused(tree, focus)
        if at is None:
            return gr.skip(), "", tree
        tree = copy.deepcopy(tree)
        branches.move(tree, at, direction)
        return view(tree), branch_label(tree, at), tree
    return move


def select(tree: dict | None, event: gr.SelectData):
    at = event.index if isinstance(event.index, int) else event.index[0]
    return at, branch_label(tree, at)


def gauge(message: str, history: list, system_prompt: str, max_new_tokens) -> str:
    """Tokens the next turn needs (system prompt + history + this message, as the chat template renders them, + the
    reply's budget) against the model's context, and a plain warning when it would not fit."""
    handle = current.handle
    if handle is None:
        return ""
    shown = [m for m in history or [] if not is_extra_sample(m)]
    chars = conversation_chars(shown, system_prompt) + len(message or "")
    cap = limits.current().max_prompt_chars if deployment.public() else None
    if cap is not None and chars > cap:
        return render_gauge(None, 0, 0, f"the chat is {chars:,} characters; this deployment takes at most {cap:,}")
    msgs = model_messages(shown, system_prompt)
    if message and message.strip():
        msgs.append({"role": "user", "content": message})
    try:
        used = len(handle.encode(msgs)) if msgs else 0
    except backend.FornaxError as e:  # a template that cannot render these messages: Send will say so too
        return render_gauge(None, 0, 0, str(e))
    budget = int(max_new_tokens or 0)
    return render_gauge(used, budget, handle.config.max_seq_len)


def render_gauge(used: int | None, budget: int, context: int, problem: str | None = None) -> str:
    if used is None:
        return f"<div class='fx-gauge fx-over'>⚠ {problem}</div>"
    total = used + budget
    pct = min(100.0, 100.0 * total / context) if context else 0.0
    over = total > context
    note = (f" — ⚠ would not fit: shorten the message, clear older turns, or lower Max new tokens to "
            f"{max(0, context - used):,}" if over else "")
    return (f"<div class='fx-gauge{' fx-over' if over else ''}' data-used='{used}' data-total='{total}'>"
            f"<div class='fx-gauge-bar'><span style='width:{pct:.1f}%'></span></div>"
            f"context: {used:,} prompt + {budget:,} reply = {total:,} / {context:,} tokens{note}</div>")


GAUGE_CSS = """
.fx-gauge { font-size: 12px; opacity: .85; }
.fx-gauge-bar { height: 4px; background: #e5e7eb; border-radius: 2px; margin-bottom: 2px; }
.fx-gauge-bar span { display: block; height: 100%; background: #6366f1; border-radius: 2px; }
.fx-gauge.fx-over { color: #b91c1c; opacity: 1; }
.fx-gauge.fx-over .fx-gauge-bar span { background: #dc2626; }
"""


PANEL_NAMES = ("backend_name", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty", "stop", "seed", "num_samples")


@user_errors
def export_chat(history: list, system_prompt: str, tree: dict | None, *panel):
    """The chat as JSON (every branch, the parameters, the model id) and the visible branch as Markdown."""
    tree = synced(tree, history)
    handle = current.handle
    model = None if handle is None else os.path.basename(handle.source.rstrip("/\\")) or handle.source
    text = chat_files.to_json(tree, system_prompt, dict(zip(PANEL_NAMES, panel)), model)
    return [chat_files.write(text, "chat.json"),
            chat_files.write(chat_files.to_markdown(tree, system_prompt), "chat.md")]


@user_errors
def import_chat(upload):
    """An exported chat (or any JSON with OpenAI `messages`) back into the Chat tab, every branch included."""
    path = upload if isinstance(upload, str) else getattr(upload, "name", None)
    tree, system_prompt = chat_files.from_json(chat_files.read_upload(path))
    return view(tree), tree, system_prompt, branch_label(tree)


def clear(request: gr.Request = None):
    """Empty the chat (and stop a reply still streaming into it, discarding it)."""
    signal_stop(request, discard=True, wait_s=5.0)
    return [], "", branches.new_tree()


def build(panel: Panel) -> gr.Button:
    """The tab's components and events, inside the caller's `gr.Tab`. Returns its Stop button (one /stop serves
    every tab: see ui.py)."""
    system_prompt = gr.Textbox(label="System prompt", lines=1, max_lines=6,
                               placeholder="optional, e.g. You are a concise assistant.")
    chatbot = gr.Chatbot(label="Chat", height=460, elem_id="fx-chatbot", feedback_options=None,
                         buttons=["copy", "copy_all"], editable="user",
                         placeholder="Ask the model something. Replies stream as they are generated; the "
                                     "parameters on the right apply. Edit a message of yours to branch from it.")
    tree = gr.State(None)     # every branch of this session's chat (branches.py)
    focus = gr.State(None)    # the message the arrows act on (None: the last reply)
    with gr.Row(equal_height=True):
        message = gr.Textbox(show_label=False, placeholder="Message (Enter to send)", scale=6, lines=1, max_lines=8,
                             autofocus=True, elem_id="fx-message")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="fx-send")
    with gr.Row():
        stop_chat = gr.Button("Stop", size="sm", variant="stop", elem_id="fx-stop-chat")
        regen = gr.Button("Regenerate", size="sm", elem_id="fx-regenerate")
        cont = gr.Button("Continue", size="sm", elem_id="fx-continue")
        clear_chat = gr.Button("Clear", size="sm", elem_id="fx-clear")
        prev = gr.Button("◀", size="sm", elem_id="fx-prev", min_width=40)
        label = gr.Markdown("", elem_id="fx-branch")
        nxt = gr.Button("▶", size="sm", elem_id="fx-next", min_width=40)
    context = gr.HTML("", elem_id="fx-gauge")
    with gr.Row():
        export_button = gr.Button("Export chat", size="sm", elem_id="fx-export-chat")
        import_button = gr.UploadButton("Import chat", size="sm", file_types=[".json"], elem_id="fx-import-chat")
    chat_file = gr.File(label="Chat files (JSON with every branch; Markdown of the visible one)", file_count="multiple",
                        interactive=False, elem_id="fx-chat-files")
    chat_stats = gr.Markdown(elem_classes="fx-stats", elem_id="fx-chat-stats")

    inputs = [chatbot, system_prompt, *panel.inputs, tree]
    options = dict(show_progress="minimal", **MODEL_EVENTS, **deployment.event_options())
    chat_event = gr.on([send.click, message.submit], chat, [message, *inputs], [chatbot, message, chat_stats, tree],
                       api_name="chat", **options)
    regen_event = regen.click(regenerate, inputs, [chatbot, chat_stats, tree], api_name="regenerate", **options)
    edit_event = chatbot.edit(edit, inputs, [chatbot, chat_stats, tree], api_visibility="private", **options)
    cont_event = cont.click(continue_reply, inputs, [chatbot, chat_stats, tree], api_name="continue", **options)
    for event in (chat_event, regen_event, edit_event, cont_event):
        event.then(lambda t: (None, branch_label(t)), [tree], [focus, label], api_visibility="private",
                   queue=False)
    prev.click(step(-1), [tree, focus], [chatbot, label, tree], api_visibility="private", queue=False)
    nxt.click(step(+1), [tree, focus], [chatbot, label, tree], api_visibility="private", queue=False)
    chatbot.select(select, [tree], [focus, label], api_visibility="private", queue=False)
    export_button.click(export_chat, [chatbot, system_prompt, tree, *panel.inputs], [chat_file],
                        api_visibility="private", concurrency_limit=None)
    import_button.upload(import_chat, [import_button], [chatbot, tree, system_prompt, label], api_visibility="private",
                         concurrency_limit=None)
    # The gauge follows typing: only the latest of a burst of changes runs (trigger_mode), it tokenizes only.
    gr.on([message.change, chatbot.change, system_prompt.change, panel.inputs[1].change], gauge,
          [message, chatbot, system_prompt, panel.inputs[1]], [context], api_visibility="private",
          trigger_mode="always_last", show_progress="hidden", concurrency_limit=None)
    # Clear discards a reply in flight (its Stop flag) and answers once that run has ended, so no late update can
    # put the old chat back. Not `cancels=`: in Gradio 6.31 cancelling an event that is not running broke the next
    # Send of the session.
    clear_chat.click(clear, None, [chatbot, chat_stats, tree], api_name="clear", concurrency_limit=None,
                     ).then(
        lambda: (None, ""), None, [focus, label], api_visibility="private", queue=False)
    return stop_chat
