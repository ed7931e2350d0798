"""The chat's branches in a real headless Chromium on a tiny model: editing a message regenerates from there (the
old branch stays), Regenerate keeps earlier replies as siblings the arrows move between, Continue extends a reply."""
import pytest

from playground import build_app, current
from tests.backend.tiny import make_tiny
from tests.playground.serve import serving
from tests.playground.test_browser import browser, set_number, wait_for_text  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny("llama", folder)
    current.load(str(folder))
    with serving(build_app()) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#fx-message textarea")
        set_number(page, "fx-max-new-tokens", 8)
        set_number(page, "fx-temperature", 1.5)
        yield page
        page.close()


def bots(page):
    return page.locator("#fx-chatbot [data-testid=bot]")


def users(page):
    return page.locator("#fx-chatbot [data-testid=user]")


SEED = 100
STATS = "(document.querySelector('#fx-chat-stats')?.innerText || '')"


def run(page, action):
    """Do `action` and wait for its run to end: a new stats line with tok/s (each run draws its own seed)."""
    global SEED
    SEED += 1  # a new seed per run: different replies, and a stats line that differs from the last
    set_number(page, "fx-seed", SEED)
    old = page.inner_text("#fx-chat-stats")
    action()
    page.wait_for_function(f"old => {STATS} !== old && {STATS}.includes('tok/s')", arg=old, timeout=60_000)
    # The chat renders a moment after the stats line: wait until the last reply's text holds still.
    shown = None
    for _ in range(50):
        page.wait_for_timeout(300)
        now = bots(page).last.inner_text() if bots(page).count() else ""
        if now and now == shown:
            return
        shown = now
    raise AssertionError("the chat did not settle")


def send(page, text: str):
    page.fill("#fx-message textarea", text)
    run(page, lambda: page.click("#fx-send"))


def click_and_finish(page, selector: str):
    run(page, lambda: page.click(selector))


def label(page) -> str:
    return page.inner_text("#fx-branch").strip()


def test_regenerate_twice_then_arrows_move_among_three_siblings(page):
    page.click("#fx-clear")
    send(page, "Tell me a story.")
    first = bots(page).last.inner_text()
    click_and_finish(page, "#fx-regenerate")
    second = bots(page).last.inner_text()
    click_and_finish(page, "#fx-regenerate")
    third = bots(page).last.inner_text()
    wait_for_text(page, "#fx-branch", "reply 3 of 3")
    assert bots(page).count() == 1 and len({first, second, third}) == 3
    page.click("#fx-prev")
    wait_for_text(page, "#fx-branch", "reply 2 of 3")
    assert bots(page).last.inner_text() == second
    page.click("#fx-prev")
    wait_for_text(page, "#fx-branch", "reply 1 of 3")
    assert bots(page).last.inner_text() == first
    page.click("#fx-prev")  # clamped at the first
    wait_for_text(page, "#fx-branch", "reply 1 of 3")
    page.click("#fx-next")
    page.click("#fx-next")
    wait_for_text(page, "#fx-branch", "reply 3 of 3")
    assert bots(page).last.inner_text() == third


def test_continue_extends_the_last_reply(page):
    page.click("#fx-clear")
    send(page, "Write a long sentence.")
    before = bots(page).last.inner_text()
    click_and_finish(page, "#fx-continue")
    after = bots(page).last.inner_text()
    assert bots(page).count() == 1 and users(page).count() == 1  # no new turn
    assert len(after) > len(before) and after.startswith(before.rstrip()[: max(1, len(before.rstrip()) - 2)])


def test_editing_a_message_regenerates_from_there_and_keeps_the_old_branch(page):
    page.click("#fx-clear")
    send(page, "First question.")
    old_reply = bots(page).last.inner_text()
    send(page, "Second question.")
    assert users(page).count() == 2
    first_user = users(page).first
    first_user.hover()
    page.locator("#fx-chatbot").get_by_label("Edit").first.click()
    page.locator("#fx-chatbot textarea.edit-textarea").fill("An edited question.")
    run(page, lambda: page.locator("#fx-chatbot").get_by_label("Submit").first.click())
    assert users(page).count() == 1 and "An edited question." in users(page).first.inner_text()
    assert bots(page).count() == 1 and bots(page).last.inner_text() != old_reply
    # The old branch is still there: focus the edited message and step back to it.
    users(page).first.click()
    wait_for_text(page, "#fx-branch", "message 2 of 2")
    page.click("#fx-prev")
    wait_for_text(page, "#fx-branch", "message 1 of 2")
    wait_for_text(page, "#fx-chatbot", "Second question.")
    assert users(page).count() == 2 and bots(page).first.inner_text() == old_reply
    # (Gradio 6.31's Chatbot keeps drawing the text typed into an edited message at that index, so the first bubble
    # still reads "An edited question." here although the server sent "First question.": not asserted.)


def choose(page, elem_id: str, option: str):
    page.click(f"#{elem_id} input")
    page.locator(f"[data-testid=dropdown-option][aria-label=\"{option}\"]").first.click()


def number(page, elem_id: str) -> float:
    return float(page.input_value(f"#{elem_id} input[type=number]"))


def test_a_preset_moves_the_sliders_and_a_saved_one_survives_a_reload(page):
    from playground.tabs.params import PRESETS

    choose(page, "fx-preset", "Creative")
    page.wait_for_function("() => document.querySelector('#fx-temperature input[type=number]').value == '1.1'")
    assert number(page, "fx-top-p") == PRESETS["Creative"]["top_p"]
    assert number(page, "fx-min-p") == PRESETS["Creative"]["min_p"]
    choose(page, "fx-preset", "Precise")
    page.wait_for_function("() => document.querySelector('#fx-temperature input[type=number]').value == '0.2'")
    assert number(page, "fx-top-k") == PRESETS["Precise"]["top_k"]
    set_number(page, "fx-temperature", 0.35)
    page.fill("#fx-preset-name textarea", "Mine")
    page.click("#fx-preset-save")
    page.wait_for_function("() => document.querySelector('#fx-preset input').value == 'Mine'")
    page.reload()
    page.wait_for_selector("#fx-message textarea")
    from backend.generation import presets

    opening, values = presets.opening_preset(current.info())  # a fresh page starts from the model's own preset
    assert page.input_value("#fx-preset input") == opening
    assert number(page, "fx-temperature") == values["temperature"]
    choose(page, "fx-preset", "Mine")               # the saved preset is still offered after the reload
    page.wait_for_function("() => document.querySelector('#fx-temperature input[type=number]').value == '0.35'")
    assert number(page, "fx-top-k") == PRESETS["Precise"]["top_k"]


def gauge_total(page) -> int:
    return int(page.get_attribute("#fx-gauge .fx-gauge", "data-total"))


def test_the_gauge_moves_as_text_is_typed_and_warns_at_the_limit(page, monkeypatch):
    page.click("#fx-clear")
    set_number(page, "fx-max-new-tokens", 8)
    page.locator("#fx-message textarea").press_sequentially("Hello", delay=20)
    page.wait_for_selector("#fx-gauge .fx-gauge")
    page.wait_for_timeout(500)
    short = gauge_total(page)
    messages = [{"role": "user", "content": "Hello"}]
    assert short == len(current.handle.tokenizer.encode_chat(messages, add_generation_prompt=True)) + 8
    tokenizer = current.handle.tokenizer
    counts, encode_chat = [], tokenizer.encode_chat
    monkeypatch.setattr(tokenizer, "encode_chat", lambda *a, **k: (counts.append(1), encode_chat(*a, **k))[1])
    more = " there, a much longer message now"
    page.locator("#fx-message textarea").press_sequentially(more, delay=60)  # keys faster than the debounce
    page.wait_for_function("n => +document.querySelector('#fx-gauge .fx-gauge').dataset.total > n", arg=short)
    page.wait_for_timeout(800)
    assert 1 <= len(counts) <= 3  # debounced: a count per pause in typing, not one per keystroke
    monkeypatch.undo()
    assert "fx-over" not in page.get_attribute("#fx-gauge .fx-gauge", "class")
    set_number(page, "fx-max-new-tokens", 120)  # the tiny model's context is 128 tokens
    wait_for_text(page, "#fx-gauge", "would not fit")
    assert "fx-over" in page.get_attribute("#fx-gauge .fx-gauge", "class")
    set_number(page, "fx-max-new-tokens", 8)
    page.fill("#fx-message textarea", "")


def test_a_chat_exported_and_imported_shows_the_same_branches(page, tmp_path):
    page.click("#fx-clear")
    send(page, "Export me.")
    click_and_finish(page, "#fx-regenerate")
    wait_for_text(page, "#fx-branch", "reply 2 of 2")
    second = bots(page).last.inner_text()
    page.click("#fx-export-chat")
    link = page.locator("#fx-chat-files a[download='chat.json']").first
    link.wait_for(timeout=30_000)
    exported = page.request.get(link.get_attribute("href")).text()
    (tmp_path / "chat.json").write_text(exported)
    page.click("#fx-clear")
    page.wait_for_function("() => !document.querySelector('#fx-chatbot [data-testid=bot]')")
    page.locator("input[type=file][data-testid='Import chat-upload-button']").set_input_files(
        str(tmp_path / "chat.json"))
    wait_for_text(page, "#fx-branch", "reply 2 of 2")
    wait_for_text(page, "#fx-chatbot", "Export me.")
    assert bots(page).last.inner_text() == second
    page.click("#fx-prev")
    wait_for_text(page, "#fx-branch", "reply 1 of 2")


def test_a_long_prompt_shows_its_ingestion_before_the_first_token(page, monkeypatch):
    import re
    import time

    import backend.generation.generate

    # Chunks of 16 tokens, each taking a moment (a big model's prefill, on the tiny one), so the page can show them.
    monkeypatch.setattr(backend.generation.generate, "PREFILL_CHUNK", 16)
    runner = current.handle.runner("eager")
    forward = runner.forward
    monkeypatch.setattr(runner, "forward", lambda ids, pos: (time.sleep(0.15) if ids.shape[1] > 1 else None,
                                                             forward(ids, pos))[1])
    page.click("#fx-clear")
    page.wait_for_function("() => !document.querySelector('#fx-chatbot [data-testid=bot]')")
    # Every text the stats line shows, recorded as the page draws it.
    page.evaluate("""() => {
        window.fxStatsSeen = [];
        const stats = document.querySelector('#fx-chat-stats');
        new MutationObserver(() => window.fxStatsSeen.push(stats.innerText)).observe(
            stats, {childList: true, subtree: true, characterData: true});
    }""")
    message = "Tell me what the for statement does when the iterable is empty and when it is not. " * 2
    send(page, message)
    prompt_tokens = len(current.handle.encode([{"role": "user", "content": message}]))
    seen = [tuple(int(n.replace(",", "")) for n in m.groups()) for text in page.evaluate("window.fxStatsSeen")
            if (m := re.search(r"ingesting ([\d,]+) / ([\d,]+) tokens", text))]
    assert prompt_tokens > 48 and len(seen) >= 2, seen
    assert {total for _, total in seen} == {prompt_tokens}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == prompt_tokens and done[0] < prompt_tokens
    assert "ingesting" not in page.inner_text("#fx-chat-stats")  # the stats line once the reply is in
