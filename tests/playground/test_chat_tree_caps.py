"""The chat tree's caps (issue 18, Medium: "the chat tree is O(N²) in messages, empty ones count 0 characters"):
every tree operation is linear and recursion-free, every message counts a fixed cost against the prompt cap, and a
public chat holds at most max_chat_messages messages (every branch), so a flood of empty messages is refused at
once with a plain error and the tab still answers afterwards."""
from __future__ import annotations

import time

import gradio as gr
import pytest

from backend import limits
from playground import current
from playground.tabs import branches
from playground.tabs import chat as chat_tab
from tests.backend.tiny import make_tiny

GREEDY = dict(runner_name="eager", max_new_tokens=4, temperature=0, top_k=0, top_p=1.0, min_p=0.0,
              repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, stop=[], seed=1, num_samples=1)


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny("llama", folder)
    current.load(str(folder))
    return current.handle


def panel() -> list:
    return [GREEDY[name] for name in chat_tab.PANEL_NAMES]


def empty_history(n: int) -> list[dict]:
    return [chat_tab.text_message("user" if i % 2 == 0 else "assistant", "") for i in range(n)]


def test_tree_operations_are_linear_and_never_recurse():
    """20,000 messages in one branch: built, copied, counted and walked without RecursionError (count and
    copy.deepcopy recursed: ~300 messages broke deepcopy) and without the quadratic walk (from_messages
    re-walked the path for every message: minutes here)."""
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": ""} for i in range(20_000)]
    t0 = time.perf_counter()
    tree = branches.from_messages(msgs)
    copied = branches.copy_tree(tree)
    assert branches.count(copied) == 20_000 and branches.messages(copied) == msgs
    copied["children"][0]["content"] = "changed"          # a real copy: the original is untouched
    assert branches.messages(tree)[0]["content"] == ""
    branches.branch(copied, 19_999, branches.node("assistant", "again"))
    assert branches.siblings(copied, 19_999) == (2, 2) and branches.count(copied) == 20_001
    assert time.perf_counter() - t0 < 30  # a hang guard, not a timing test


def test_ten_thousand_empty_messages_are_refused_at_once_in_public_mode(handle, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    started = []
    monkeypatch.setattr(chat_tab, "start_stream", lambda *a, **k: started.append(1))
    history = empty_history(10_000)
    t0 = time.perf_counter()
    for call in (lambda: next(chat_tab.chat("hi", history, "", *panel(), tree=None)),
                 lambda: next(chat_tab.regenerate(history, "", *panel(), tree=None))):
        with pytest.raises(gr.Error, match="the number of messages in the chat \\(every branch\\) is 10,000 but this "
                                           "public deployment allows at most 400"):
            call()
    gauge = chat_tab.gauge("hi", history, "", 4)
    assert "fx-over" in gauge and "160,002 characters" in gauge
    assert time.perf_counter() - t0 < 10, "refusing should not build or render the 10,000 messages"
    assert started == []


def test_empty_messages_count_against_the_prompt_cap(handle, monkeypatch):
    """300 empty messages are within the message cap but cost 300 x 16 characters: over a 4,000-character cap."""
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setenv("FORNAX_MAX_PROMPT_CHARS", "4000")
    started = []
    monkeypatch.setattr(chat_tab, "start_stream", lambda *a, **k: started.append(1))
    assert limits.current().chat_message_chars == 16
    with pytest.raises(gr.Error, match="the prompt's length in characters is 4,818"):
        next(chat_tab.chat("hi", empty_history(300), "", *panel(), tree=None))
    assert started == []


def test_a_tree_at_the_cap_refuses_one_more_turn_and_the_chat_still_answers(handle, monkeypatch):
    monkeypatch.setenv("FORNAX_PUBLIC", "1")
    monkeypatch.setenv("FORNAX_MAX_CHAT_MESSAGES", "6")
    *_, (shown, _, _, tree) = chat_tab.chat("hello", [], "", *panel(), tree=None)
    assert branches.count(tree) == 2
    *_, (shown, _, tree) = chat_tab.regenerate(shown, "", *panel(), tree=tree)
    assert branches.count(tree) == 3 and branches.siblings(tree, 1) == (2, 2)   # the old reply kept beside
    *_, (shown, _, _, tree) = chat_tab.chat("more", shown, "", *panel(), tree=tree)
    assert branches.count(tree) == 5
    with pytest.raises(gr.Error, match="the number of messages in the chat \\(every branch\\) is 7 but"):
        next(chat_tab.chat("one more", shown, "", *panel(), tree=tree))
    monkeypatch.delenv("FORNAX_MAX_CHAT_MESSAGES")
    *_, (shown, _, _, tree) = chat_tab.chat("one more", shown, "", *panel(), tree=tree)
    assert branches.count(tree) == 7 and chat_tab.message_text(shown[-2]["content"]) == "one more"


def test_an_imported_chat_past_the_caps_is_refused_plainly(tmp_path, monkeypatch):
    """A chain of 3,000 messages nests JSON past Python's recursion limit (a raw RecursionError before); a flat
    chat of more messages than the cap is refused by the cap."""
    deep = tmp_path / "deep.json"
    n = 3000
    deep.write_text('{"tree": {"children": [' + '{"role": "user", "content": "", "children": [' * n + "]}" * n
                    + "]}}")
    with pytest.raises(gr.Error, match="nested too deeply"):
        chat_tab.import_chat(str(deep))
    monkeypatch.setenv("FORNAX_MAX_CHAT_MESSAGES", "10")
    flat = tmp_path / "flat.json"
    import json

    flat.write_text(json.dumps({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"}
                                             for i in range(20)]}))
    with pytest.raises(gr.Error, match="the number of messages in the chat \\(every branch\\) is 20"):
        chat_tab.import_chat(str(flat))
    monkeypatch.delenv("FORNAX_MAX_CHAT_MESSAGES")
    shown, tree, _, _ = chat_tab.import_chat(str(flat))
    assert len(shown) == 20 and branches.count(tree) == 20
