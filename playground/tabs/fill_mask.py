"""The Fill-mask tab, shown instead of Chat, Completion and Race while an encoder (BERT-style masked LM) is loaded:
each [MASK]'s top-k candidates as bars, and a sentence's pseudo-log-likelihood as a per-token heat line.

`switch_tabs` decides which generation tabs the loaded model can use: a causal Transformer gets Chat, Completion and
Race, an LSTM Completion and Race (it has no chat template), an encoder Fill-mask only.
"""
from __future__ import annotations

import gradio as gr

import backend
from backend import limits
from backend.budget import Deadline
from backend.generation.fill_mask import MASK_TOKEN

from .. import deployment, render
from ..errors import refusal, user_errors
from ..state import MODEL_EVENTS, current

DEFAULT_TEXT = f"The capital of France is {MASK_TOKEN}. It is a {MASK_TOKEN} city."
DEFAULT_TOP_K = 5
SWITCHED = ("chat", "completion", "race", "fill_mask")  # the tabs shown or hidden by what the model can do


def tabs_for(info: dict | None) -> dict[str, bool]:
    """Which of the SWITCHED tabs the model described by `info` can use."""
    if info is None:  # nothing loaded: the tabs of a causal model, which say so when used
        return dict(chat=True, completion=True, race=True, fill_mask=False)
    can = render.capabilities(info)
    return dict(chat=can["chats"], completion=can["generates"], race=can["generates"], fill_mask=can["fills_masks"])


def tab_visible(shown: bool) -> bool | str:
    """A tab's `visible`: "hidden" rather than False keeps it mounted, because Gradio 6.31 unmounts a tab made
    invisible and then shows it again with the props it was built with."""
    return True if shown else "hidden"


def mask_token(handle: backend.ModelHandle | None) -> str:
    """The mask token the loaded tokenizer has (what the Insert button types)."""
    if handle is not None and handle.tokenizer.token_to_id(MASK_TOKEN) is None:
        return ""
    return MASK_TOKEN


def switch_tabs():
    """After any load: show the tabs the current model can use, and the Insert button its mask token."""
    handle = current.handle
    shown = tabs_for(current.info())
    token = mask_token(handle)
    tabs = [gr.Tab(visible=tab_visible(shown[t])) for t in SWITCHED]
    return (*tabs, token, gr.Button(value=f"Insert {token}" if token else "Insert mask", interactive=bool(token)))


def top_k_value(top_k) -> int:
    """The top-k an API client sent, as a count (the slider sends 5.0; 2.5 or "five" is refused)."""
    try:
        value = int(top_k)
        if value == float(top_k):
            return value
    except (TypeError, ValueError):
        pass
    raise refusal(f"top-k must be a whole number, got {top_k!r}")


def text_value(text) -> str:
    if text is not None and not isinstance(text, str):
        raise refusal(f"the text must be a string, got {type(text).__name__}")
    return text or ""


@user_errors
def fill(text: str, top_k: int):
    """Each [MASK]'s top-k candidates with their probabilities, as bars (HTML)."""
    deadline = Deadline.for_event("this fill-mask")  # from the click: the wait for the model counts
    text = text_value(text)
    top_k = top_k_value(top_k)
    deployment.check_fill_mask(len(text), top_k)
    if not text.strip():
        raise refusal(f"the text is empty: write a sentence with {MASK_TOKEN} where a word should go")
    with current.using() as handle:
        masks = handle.fill_mask(text, top_k=top_k, deadline=deadline)
    return render.mask_bars_html(text, MASK_TOKEN, masks)


@user_errors
def pseudo_log_likelihood(text: str):
    """Each token's log-probability with it masked, as a heat line over the text, and the total (HTML)."""
    deadline = Deadline.for_event("this pseudo-log-likelihood")  # from the click: the wait for the model counts
    text = text_value(text)
    deployment.check_fill_mask(len(text))
    if not text.strip():
        raise refusal("the text is empty: write a sentence to score")
    with current.using() as handle:
        result = handle.pseudo_log_likelihood(text, deadline=deadline)
        spans = scored_spans(handle, text, result)
    return render.pll_html(text, result, spans)


def scored_spans(handle: backend.ModelHandle, text: str, result: dict) -> list[tuple[int, int]] | None:
    """Where each scored token lies in `text` (the tokenizer's offsets), so the heat line is the user's own text;
    None if the tokens do not line up with the result's (then the tokens are shown as pieces)."""
    encoding = handle.tokenizer.tk.encode(text)
    special = set(handle.tokenizer.special_ids)
    scored = [(i, span) for i, span in zip(encoding.ids, encoding.offsets) if i not in special]
    if [i for i, _ in scored] != [t["id"] for t in result["tokens"]]:
        return None
    spans = [span for _, span in scored]
    if any(b < a or a < prev for (a, b), (_, prev) in zip(spans, [(0, 0)] + spans)):  # not left to right
        return None
    return spans


def build() -> tuple[gr.Textbox, gr.Button]:
    """The tab's components and events, inside the caller's `gr.Tab`. Returns (mask token box, Insert button), which
    `switch_tabs` updates after a load."""
    gr.Markdown(f"An encoder reads the whole text at once and predicts what is hidden under each **{MASK_TOKEN}** "
                "from both sides. **Pseudo-log-likelihood** masks every token in turn and scores it the same way: "
                "how well the sentence fits what the model learned.")
    text = gr.Textbox(label="Text", lines=3, max_lines=12, value=DEFAULT_TEXT, elem_id="fx-mask-text",
                      info=f"several {MASK_TOKEN}s are allowed; each is predicted from the same text")
    token = gr.Textbox(value=mask_token(current.handle), visible=False, elem_id="fx-mask-token")
    with gr.Row(equal_height=True):
        insert = gr.Button(f"Insert {MASK_TOKEN}", size="sm", scale=1, elem_id="fx-mask-insert")
        top_k = gr.Slider(1, limits.current().max_fill_mask_top_k, value=DEFAULT_TOP_K, step=1, label="Top-k",
                          scale=3, elem_id="fx-mask-top-k")
    with gr.Row():
        run_fill = gr.Button("Fill", variant="primary", elem_id="fx-mask-fill")
        run_pll = gr.Button("Pseudo-log-likelihood", elem_id="fx-pll-run")
    bars = gr.HTML("<div class='fx-empty'>Each mask's candidates appear here as bars.</div>", elem_id="fx-mask-bars")
    heat = gr.HTML("<div class='fx-empty'>The sentence's tokens appear here coloured by their log-probability."
                   "</div>", elem_id="fx-pll-view")

    # Insert at the cursor, in the browser: nothing to ask the server.
    insert.click(None, [text, token], [text], api_visibility="private", js="""(text, token) => {
        const box = document.querySelector('#fx-mask-text textarea');
        const at = box && box.selectionStart != null ? box.selectionStart : text.length;
        const end = box && box.selectionEnd != null ? box.selectionEnd : at;
        return text.slice(0, at) + token + text.slice(end);
    }""")
    options = dict(show_progress="minimal", **MODEL_EVENTS, **deployment.event_options())
    run_fill.click(fill, [text, top_k], [bars], api_name="fill_mask", **options)
    run_pll.click(pseudo_log_likelihood, [text], [heat], api_name="pseudo_log_likelihood", **options)
    return token, insert
