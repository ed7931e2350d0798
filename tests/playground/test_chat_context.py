"""The Chat and Completion handlers on a tiny model (128-token context): a long prompt's prefill progress shown
before the first token, and a chat that outgrows the context refused plainly or sent without its oldest turns."""
import re

import gradio as gr
import pytest

import backend.generation.generate
from playground import current
from playground.tabs import chat as chat_tab
from playground.tabs import completion
from playground.tabs.chat import message_text
from tests.backend.tiny import make_tiny

GREEDY = dict(runner_name="eager", temperature=0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
              presence_penalty=0.0, frequency_penalty=0.0, stop=[], seed=1, num_samples=1)
INGESTING = re.compile(r"ingesting ([\d,]+) / ([\d,]+) tokens")
CHUNK = 16


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny("llama", folder)
    current.load(str(folder))
    return current.handle


def panel(max_new_tokens: int) -> list:
    values = {**GREEDY, "max_new_tokens": max_new_tokens}
    return [values[name] for name in chat_tab.PANEL_NAMES]


def backend_params(max_new_tokens: int) -> dict:
    return dict(temperature=0, seed=1, max_new_tokens=max_new_tokens)


@pytest.fixture
def slow_prefill(handle, monkeypatch):
    """Chunks of 16 tokens, each taking a moment (a big model's prefill on a tiny one), so the handler's
    updates meet the ingestion midway."""
    import time

    monkeypatch.setattr(backend.generation.generate, "PREFILL_CHUNK", CHUNK)
    runner = handle.runner("eager")
    forward = runner.forward

    def slow(ids, pos):
        if ids.shape[1] > 1:  # a prefill chunk, not a decode step
            time.sleep(0.15)
        return forward(ids, pos)
    monkeypatch.setattr(runner, "forward", slow)


def progress_seen(statuses: list[str]) -> list[tuple[int, int]]:
    return [tuple(int(n.replace(",", "")) for n in m.groups()) for s in statuses if (m := INGESTING.search(s))]


def check_progress(seen: list[tuple[int, int]], prompt_tokens: int):
    assert prompt_tokens > 3 * CHUNK
    assert len(seen) >= 2, seen                                # shown while it ran, not only at the end
    assert {total for _, total in seen} == {prompt_tokens}     # the backend's own count of the prompt
    done = [d for d, _ in seen]
    assert done == sorted(set(done)) and done[-1] == prompt_tokens  # increasing, up to the whole prompt
    assert all(d % CHUNK == 0 or d == prompt_tokens for d in done)


def test_completion_shows_the_prompt_ingestion_before_the_first_token(handle, slow_prefill):
    prompt = "The with statement is used to wrap the execution of a block with methods defined by a context " * 2
    updates = list(completion.complete(prompt, *panel(6)))
    statuses = [stats for _, _, stats in updates]
    check_progress(progress_seen(statuses), len(handle.encode(prompt)))
    last = max(i for i, s in enumerate(statuses) if "ingesting" in s)
    assert all(text == "" for text, _, _ in updates[:last + 1])          # before the first token
    assert all("ingesting" not in s for s in statuses[last + 1:])        # and never again after it
    assert updates[-1][0] == handle.generate(prompt, **backend_params(6)).text  # the thread hop changes nothing
    assert "tok/s" in statuses[-1]


def test_chat_shows_the_prompt_ingestion_before_the_first_token(handle, slow_prefill):
    message = "Tell me what the for statement does when the iterable is empty and when it is not. " * 2
    updates = list(chat_tab.chat(message, [], "Be brief.", *panel(6)))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": message}]
    check_progress(progress_seen([stats for _, _, stats, _ in updates]), len(handle.encode(messages)))
    shown = updates[-1][0]
    assert message_text(shown[-1]["content"]) == handle.generate(messages, **backend_params(6)).text


def turn(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": f"It is {i}."}]


TURNS = 6
HISTORY = [m for i in range(1, TURNS + 1) for m in turn(i)]  # six turns: with a reply they overflow 128 tokens
SYSTEM = "Be brief."
MESSAGE = "And the last one?"
BUDGET = 16


def sent_without(k: int) -> list[dict]:
    """What the model sees with the k oldest turns left out."""
    return [{"role": "system", "content": SYSTEM}] + HISTORY[2 * k:] + [{"role": "user", "content": MESSAGE}]


def test_a_chat_over_the_context_with_trim_drops_the_fewest_oldest_turns(handle):
    context = handle.config.max_seq_len
    need = [len(handle.encode(sent_without(k))) + BUDGET for k in range(TURNS)]
    assert need[0] > context and need[-1] <= context  # the case under test: too long, but trimming can fit it
    dropped = next(k for k in range(TURNS) if need[k] <= context)  # the fewest turns that make it fit
    assert 1 < dropped < TURNS - 1

    gauge = chat_tab.gauge(MESSAGE, HISTORY, SYSTEM, BUDGET, trim=True)
    assert f"the {dropped} oldest turn" in gauge and "fx-over" not in gauge
    assert f"data-dropped='{dropped}'" in gauge and f"data-used='{need[0] - BUDGET}'" in gauge

    updates = list(chat_tab.chat(MESSAGE, HISTORY, SYSTEM, *panel(BUDGET), tree=None, trim=True))
    shown, box, stats, tree = updates[-1]
    assert f"the {dropped} oldest turn" in stats and "left out" in stats and "tok/s" in stats
    # The model saw the system prompt, the newer turns and the message; the chat on the page keeps every turn.
    want = handle.generate(sent_without(dropped), **backend_params(BUDGET)).text
    assert message_text(shown[-1]["content"]) == want
    assert [message_text(m["content"]) for m in shown[:-2]] == [m["content"] for m in HISTORY]
    assert [m["content"] for m in chat_tab.branches.messages(tree)][-2:] == [MESSAGE, want]


def test_a_chat_over_the_context_without_trim_is_refused_and_nothing_is_sent(handle, monkeypatch):
    started = []
    monkeypatch.setattr(chat_tab, "start_stream", lambda *a, **k: started.append(1))
    gauge = chat_tab.gauge(MESSAGE, HISTORY, SYSTEM, BUDGET, trim=False)
    assert "fx-over" in gauge and "would not fit" in gauge and "trim oldest turns to fit" in gauge
    with pytest.raises(gr.Error, match="nothing was sent") as e:
        next(chat_tab.chat(MESSAGE, HISTORY, SYSTEM, *panel(BUDGET), tree=None, trim=False))
    need = len(handle.encode(sent_without(0)))
    assert f"needs {need:,} tokens + {BUDGET:,}" in str(e.value) and "trim oldest turns to fit" in str(e.value)
    assert started == []


def test_trimming_never_drops_the_system_prompt_or_the_last_message(handle, monkeypatch):
    started = []
    monkeypatch.setattr(chat_tab, "start_stream", lambda *a, **k: started.append(1))
    long_message = "Tell me everything about the statement. " * 12  # alone (with the system prompt) over the context
    assert len(handle.encode([{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": long_message}])) + BUDGET > handle.config.max_seq_len
    with pytest.raises(gr.Error, match="even without the older turns"):
        next(chat_tab.chat(long_message, HISTORY, SYSTEM, *panel(BUDGET), tree=None, trim=True))
    assert "would not fit" in chat_tab.gauge(long_message, HISTORY, SYSTEM, BUDGET, trim=True)
    assert started == []
    # The rule itself, with a counter of messages: the system prompt and the last turn always stay.
    msgs = sent_without(0)
    kept, dropped = chat_tab.fit(msgs, 0, 2, len, trim=True)
    assert dropped == TURNS and kept == [msgs[0], msgs[-1]]


def test_continue_over_the_context_with_trim_keeps_the_reply_it_extends(handle):
    started = "It is"
    history = HISTORY + [{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": started}]
    reply_ids = handle.tokenizer.encode(started, add_special_tokens=False)

    def prompt_ids(k: int) -> list[int]:  # the template up to the reply's start, then the reply so far
        return handle.tokenizer.encode_chat(sent_without(k), add_generation_prompt=True) + reply_ids
    context = handle.config.max_seq_len
    dropped = next(k for k in range(TURNS) if len(prompt_ids(k)) + BUDGET <= context)
    assert dropped > 0
    with pytest.raises(gr.Error, match="nothing was sent"):
        next(chat_tab.continue_reply(history, SYSTEM, *panel(BUDGET), tree=None, trim=False))
    shown, stats, _ = list(chat_tab.continue_reply(history, SYSTEM, *panel(BUDGET), tree=None, trim=True))[-1]
    assert f"the {dropped} oldest turn" in stats
    want = handle.generate(prompt_ids(dropped), **backend_params(BUDGET)).text
    assert message_text(shown[-1]["content"]) == started + want and len(shown) == len(history)
