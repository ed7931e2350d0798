"""The Chat tab: the model's chat template, a system prompt, streamed replies, Stop, Clear, and a chat that never
loses a reply: Regenerate and editing a message add siblings (branches.py), arrows move between them, Continue
extends the last reply."""
from __future__ import annotations

import html
import os

import gradio as gr

import backend
from backend import limits
from backend.generation import presets

from .. import deployment
from ..errors import refusal, user_errors
from ..state import MODEL_EVENTS, current
from ..streaming import signal_stop, start_stream
from . import branches, chat_files
from .params import Panel, sampling_kwargs


def refuse_no_chat(handle: backend.ModelHandle) -> None:
    """A plain error before a chat template is rendered for a model that has none (the tab may be left open from
    before a load, or the API called)."""
    can = handle.family
    if not can.chats:
        raise refusal(f"{can.described} has no chat template; use "
                      f"{'Fill-mask' if can.fills_masks else 'Completion'}")


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
    """The characters a chat sends to the model: what the prompt-length cap counts, before any tokenizing; every
    message counts at least a fixed overhead (branches.message_cost), so empty ones are not free."""
    return len(system_prompt or "") + sum(branches.message_cost(message_text(m.get("content") if isinstance(m, dict)
                                                                             else m)) for m in history)


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
    """This session's tree, or a one-branch tree of `history` when they differ (an API client sends its own). A
    history of more messages than a chat may hold is refused before anything is built from it."""
    branches.check_size(len(history or []))
    shown = [{"role": m["role"], "content": message_text(m["content"])} for m in history or []
             if not is_extra_sample(m)]
    if tree is not None and branches.messages(tree) == shown:
        return branches.copy_tree(tree)  # a failed run leaves the session's tree as it was
    return branches.from_messages(shown)


def view(tree: dict) -> list[dict]:
    return [text_message(n["role"], n["content"]) for n in branches.path(tree)]


def check(params: dict, tree: dict, system_prompt: str, extra: str = "") -> None:
    """The panel and the chat against the caps: characters (each message at least its fixed cost), and the
    messages of every branch with those this turn adds (a message, and a reply per sample)."""
    branches.check_size(branches.count(tree) + 1 + int(params.get("num_samples") or 1))
    deployment.check_sampling(params, len(system_prompt or "") + (branches.message_cost(extra) if extra else 0) +
                              sum(branches.message_cost(n["content"]) for n in branches.path(tree)))


TRIM_HINT = "tick “trim oldest turns to fit”"


def fit(messages: list[dict], budget: int, context: int, count, trim: bool) -> tuple[list[dict], int]:
    """`messages` (the system prompt first, if any) as they can be sent: `count(messages)` prompt tokens + `budget`
    must fit `context`. When they would not, with `trim` the fewest oldest turns (a user message and what answers
    it) are left out — never the system prompt, never the turn of the last user message — else a plain refusal.
    Returns (messages to send, turns left out)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"]

    def without(k: int) -> list[dict]:  # the k oldest turns left out (and anything before the first user message)
        return system + (rest if k == 0 else rest[starts[k]:])

    def fits(k: int) -> bool:
        return count(without(k)) + budget <= context

    if fits(0):
        return messages, 0
    used = count(messages)
    if not trim:
        raise refusal(f"the chat needs {used:,} tokens + {budget:,} for the reply, but the model's context is "
                      f"{context:,}: shorten the message, lower Max new tokens, Clear, or {TRIM_HINT}; "
                      f"nothing was sent")
    most = max(0, len(starts) - 1)
    if not fits(most):
        raise refusal(f"even without the older turns the chat needs {count(without(most)):,} tokens + {budget:,} "
                      f"for the reply, but the model's context is {context:,}: shorten the message or lower Max "
                      f"new tokens; nothing was sent")
    lo, hi = 1, most  # fewer turns left out -> more tokens: the least k that fits, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return without(lo), lo


def trimmed_note(dropped: int) -> str:
    return f" · the {dropped} oldest turn{'s' if dropped > 1 else ''} left out to fit the context" if dropped else ""


@user_errors
def chat(message: str, history: list, system_prompt: str, runner_name: str, max_new_tokens: int,
         temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
         presence_penalty: float, frequency_penalty: float, stop: list, seed: int | None, num_samples: int,
         tree: dict | None = None, trim: bool = False, request: gr.Request = None):
    """Send `message` after `history`; streams (history with the reply, cleared input box, stats, tree). `trim`:
    leave the oldest turns out of what is sent when the chat would not fit the context (the chat keeps them)."""
    if not message or not message.strip():
        raise refusal("the message is empty: type something to send")
    tree = synced(tree, history)
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, num_samples)
    check(params, tree, system_prompt, message)
    branches.append(tree, branches.node("user", message))
    for shown, stats, tree in reply(tree, system_prompt, runner_name, params, request, trim=trim):
        yield shown, "", stats, tree


@user_errors
def regenerate(history: list, system_prompt: str, runner_name: str, max_new_tokens: int, temperature: float,
               top_k: int, top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
               frequency_penalty: float, stop: list, seed: int | None, num_samples: int,
               tree: dict | None = None, trim: bool = False, request: gr.Request = None):
    """Answer the last user message again; the earlier reply stays as a sibling (the arrows move between them)."""
    tree = synced(tree, history)
    shown = branches.path(tree)
    at = len(shown) - 1
    while at >= 0 and shown[at]["role"] != "user":
        at -= 1
    if at < 0:
        raise refusal("nothing to regenerate: send a message first")
    params = sampling_kwargs(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, stop, seed, num_samples)
    check(params, tree, system_prompt)
    replace = at + 1 if at + 1 < len(branches.path(tree)) else None
    yield from reply(tree, system_prompt, runner_name, params, request, sibling_of=replace, trim=trim)


@user_errors
def edit(history: list, system_prompt: str, runner_name: str, max_new_tokens: int, temperature: float,
         top_k: int, top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
         frequency_penalty: float, stop: list, seed: int | None, num_samples: int, tree: dict | None,
         trim: bool, edited: gr.EditData, request: gr.Request = None):
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
    yield from reply(tree, system_prompt, runner_name, params, request, trim=trim)


@user_errors
def continue_reply(history: list, system_prompt: str, runner_name: str, max_new_tokens: int, temperature: float,
                   top_k: int, top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
                   frequency_penalty: float, stop: list, seed: int | None, num_samples: int,
                   tree: dict | None = None, trim: bool = False, request: gr.Request = None):
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
        refuse_no_chat(handle)
        started = handle.tokenizer.encode(last["content"], add_special_tokens=False)

        def count(messages: list[dict]) -> int:
            return len(handle.tokenizer.encode_chat(messages, add_generation_prompt=True)) + len(started)
        head, dropped = fit(model_messages(view(tree)[:-1], system_prompt), params["max_new_tokens"],
                            handle.config.max_seq_len, count, trim)
        ids = handle.tokenizer.encode_chat(head, add_generation_prompt=True) + started
        run, name = start_stream(handle, ids, runner_name, params, request)
        before = view(tree)[:-1]
        for texts in run.updates():
            if run.flag.discard:
                break
            shown = before + [text_message("assistant", last["content"] + texts[0])]
            yield shown, run.status() + trimmed_note(dropped), tree
        if run.flag.discard:
            yield cleared()
            return
        last["content"] += run.texts[0]
        yield view(tree), run.stats(name) + trimmed_note(dropped), tree


def reply(tree: dict, system_prompt: str, runner_name: str, params: dict, request, sibling_of: int | None = None,
          trim: bool = False):
    """Stream a reply to the visible path (as a sibling of the message at `sibling_of`, else after the path);
    yields (shown history, stats, tree). Samples 2..n are kept as siblings of sample 1 and shown as notes.
    A chat the context cannot hold is refused before anything is sent, or (`trim`) sent without its oldest turns."""
    before = view(tree) if sibling_of is None else view(tree)[:sibling_of]
    with current.using() as handle:
        refuse_no_chat(handle)
        messages, dropped = fit(model_messages(before, system_prompt), params["max_new_tokens"],
                                handle.config.max_seq_len, lambda m: len(handle.encode(m)), trim)
        run, name = start_stream(handle, messages, runner_name, params, request)
        note = trimmed_note(dropped)
        yield before + reply_messages(run.texts), run.status() + note, tree
        for texts in run.updates():
            if run.flag.discard:
                break
            yield before + reply_messages(texts), run.status() + note, tree
        if run.flag.discard:
            yield cleared()
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
        yield view(tree) + reply_messages(run.texts)[1:], run.stats(name) + note, tree


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
        tree = branches.copy_tree(tree)
        branches.move(tree, at, direction)
        return view(tree), branch_label(tree, at), tree
    return move


def select(tree: dict | None, event: gr.SelectData):
    at = event.index if isinstance(event.index, int) else event.index[0]
    return at, branch_label(tree, at)


def gauge(message: str, history: list, system_prompt: str, max_new_tokens, trim: bool = False) -> str:
    """Tokens the next turn needs (system prompt + history + this message, as the chat template renders them, + the
    reply's budget) against the model's context, and a plain warning when it would not fit (with `trim`: how many
    of the oldest turns will be left out)."""
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
    budget, context = int(max_new_tokens or 0), handle.config.max_seq_len
    if not handle.family.chats:
        return render_gauge(None, 0, 0, f"{handle.family.described} does not chat")

    def count(m: list[dict]) -> int:
        return len(handle.tokenizer.encode_chat(m, add_generation_prompt=True)) if m else 0
    try:
        used = count(msgs)
        dropped = fit(msgs, budget, context, count, trim=True)[1] if trim and used + budget > context else 0
    except backend.FornaxError as e:  # a template that cannot render these messages: Send will say so too
        return render_gauge(None, 0, 0, str(e))
    except gr.Error:  # even without the older turns it would not fit: the plain warning below says so
        dropped = 0
    return render_gauge(used, budget, context, dropped=dropped)


def render_gauge(used: int | None, budget: int, context: int, problem: str | None = None, dropped: int = 0) -> str:
    if used is None:  # the problem may quote the model's template (its raise_exception text): shown as text only
        return f"<div class='fx-gauge fx-over'>⚠ {html.escape(str(problem))}</div>"
    total = used + budget
    pct = min(100.0, 100.0 * total / context) if context else 0.0
    over = total > context and not dropped
    if dropped:
        note = f" — the {dropped} oldest turn{'s' if dropped > 1 else ''} will be left out to fit"
    elif over:
        note = (f" — ⚠ would not fit: shorten the message, clear older turns, {TRIM_HINT}, or lower Max new tokens "
                f"to {max(0, context - used):,}")
    else:
        note = ""
    return (f"<div class='fx-gauge{' fx-over' if over else ''}' data-used='{used}' data-total='{total}' "
            f"data-dropped='{dropped}'>"
            f"<div class='fx-gauge-bar'><span style='width:{pct:.1f}%'></span></div>"
            f"context: {used:,} prompt + {budget:,} reply = {total:,} / {context:,} tokens{note}</div>")


GAUGE_DEBOUNCE_MS = 300
# Runs before the gauge's request: each change restarts the timer, and only the call that is still the latest when
# it fires goes on to the server (with the latest values); the ones it replaced never resolve, so they
# send nothing.
GAUGE_DEBOUNCE_JS = f"""(...values) => new Promise(resolve => {{
    const mine = window.fxGaugeCall = (window.fxGaugeCall || 0) + 1;
    setTimeout(() => {{ if (mine === window.fxGaugeCall) resolve(values); }}, {GAUGE_DEBOUNCE_MS});
}})"""


GAUGE_CSS = """
.fx-gauge { font-size: 12px; opacity: .85; }
.fx-gauge-bar { height: 4px; background: #e5e7eb; border-radius: 2px; margin-bottom: 2px; }
.fx-gauge-bar span { display: block; height: 100%; background: #6366f1; border-radius: 2px; }
.fx-gauge.fx-over { color: #b91c1c; opacity: 1; }
.fx-gauge.fx-over .fx-gauge-bar span { background: #dc2626; }
"""


PANEL_NAMES = ("runner_name", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty", "stop", "seed", "num_samples")


@user_errors
def export_chat(history: list, system_prompt: str, tree: dict | None, *panel):
    """The chat as JSON (every branch, the parameters, the model id) and the visible branch as Markdown."""
    tree = synced(tree, history)
    info = current.info()  # the name the page shows for it (public mode: never a server path)
    if info is None:
        model = None
    elif deployment.public():
        model = info["shown_source"]
    else:
        model = os.path.basename(info["source"].rstrip("/\\")) or info["source"]
    text = chat_files.to_json(tree, system_prompt, dict(zip(PANEL_NAMES, panel)), model)
    return [chat_files.write(text, "chat.json"),
            chat_files.write(chat_files.to_markdown(tree, system_prompt), "chat.md")]


@user_errors
def import_chat(upload):
    """An exported chat (or any JSON with OpenAI `messages`) back into the Chat tab, every branch included."""
    path = upload if isinstance(upload, str) else getattr(upload, "name", None)
    try:
        tree, system_prompt = chat_files.from_json(chat_files.read_upload(path))
    except RecursionError:  # JSON nested past Python's limit: a chain of thousands of messages
        raise refusal("the chat file's tree is nested too deeply to read") from None
    branches.check_size(branches.count(tree))
    return view(tree), tree, system_prompt, branch_label(tree)


def cleared() -> tuple[list, str, dict]:
    """(history, stats, tree) of an emptied chat. A reply that Clear discards ends on this too: Gradio's message
    that the run is over can reach the page after Clear's own answer, and must not put the old chat back."""
    return [], "", branches.new_tree()


def clear(request: gr.Request = None):
    """Empty the chat (and stop a reply still streaming into it, discarding it)."""
    signal_stop(request, discard=True, wait_s=5.0)
    return cleared()


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
    # a callable value is computed again at each page load: the hint follows the model loaded now
    gr.Markdown(lambda: presets.size_hint(current.info()), elem_id="fx-size-hint", elem_classes="fx-stats")
    with gr.Row():
        stop_chat = gr.Button("Stop", size="sm", variant="stop", elem_id="fx-stop-chat")
        regen = gr.Button("Regenerate", size="sm", elem_id="fx-regenerate")
        cont = gr.Button("Continue", size="sm", elem_id="fx-continue")
        clear_chat = gr.Button("Clear", size="sm", elem_id="fx-clear")
        prev = gr.Button("◀", size="sm", elem_id="fx-prev", min_width=40)
        label = gr.Markdown("", elem_id="fx-branch")
        nxt = gr.Button("▶", size="sm", elem_id="fx-next", min_width=40)
    with gr.Row(equal_height=True):
        context = gr.HTML("", elem_id="fx-gauge")
        # Off: a chat over the context is refused; on: sent without its oldest turns (the page keeps them).
        trim = gr.Checkbox(False, label="trim oldest turns to fit", elem_id="fx-trim", scale=0, min_width=200)
    with gr.Row():
        export_button = gr.Button("Export chat", size="sm", elem_id="fx-export-chat")
        import_button = gr.UploadButton("Import chat", size="sm", file_types=[".json"], elem_id="fx-import-chat")
    chat_file = gr.File(label="Chat files (JSON with every branch; Markdown of the visible one)", file_count="multiple",
                        interactive=False, elem_id="fx-chat-files")
    chat_stats = gr.Markdown(elem_classes="fx-stats", elem_id="fx-chat-stats")

    inputs = [chatbot, system_prompt, *panel.inputs, tree, trim]
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
    # The gauge follows typing, debounced in the browser (GAUGE_DEBOUNCE_JS): one count per pause, not one per
    # keystroke or per streamed token; and of a burst that still overlaps a count only the latest runs after it.
    gr.on([message.change, chatbot.change, system_prompt.change, panel.inputs[1].change, trim.change], gauge,
          [message, chatbot, system_prompt, panel.inputs[1], trim], [context], api_visibility="private",
          js=GAUGE_DEBOUNCE_JS, trigger_mode="always_last", show_progress="hidden", concurrency_limit=None)
    # Clear discards a reply in flight (its Stop flag) and answers once that run has ended, so no late update can
    # put the old chat back. Not `cancels=`: in Gradio 6.31 cancelling an event that is not running broke the next
    # Send of the session.
    clear_chat.click(clear, None, [chatbot, chat_stats, tree], api_name="clear", concurrency_limit=None,
                     ).then(
        lambda: (None, ""), None, [focus, label], api_visibility="private", queue=False)
    return stop_chat
