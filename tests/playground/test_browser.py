"""End to end in a real headless Chromium (Debian's `chromium`; Playwright cannot download browsers here): chat
with streamed replies, probability-coloured completion tokens with hover alternatives, Stop, and bad input shown
as a readable message while the page keeps working. Nothing the page loads may come from outside 127.0.0.1.

Set FORNAX_README_SCREENSHOT=docs/playground.png to also refresh the README's screenshot.
"""
import os
import shutil
import time
from pathlib import Path

import pytest

from backend.generation import presets
from playground import create_app, current
from tests.playground.serve import serving

CHROMIUM = os.environ.get("FORNAX_CHROMIUM", "/usr/bin/chromium")
# Headless, and none of Chromium's own background traffic (updates, sync, safe browsing lists, QUIC probes).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
LOCAL = ("http://127.0.0.1", "data:", "blob:", "about:")


def open_page(browser, url: str, height: int = 1000):
    """A page on the served app once its chat box is there, and the list of every request it made off this machine."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    outside = []
    page.on("request", lambda r: None if r.url.startswith(LOCAL) else outside.append(r.url))
    page.goto(url)
    page.wait_for_selector("#fx-message textarea")
    return page, outside
# The panel opens on the default model's preset (a small model's: backend/generation/presets.py) with what the tests below type.
UI_PARAMS = dict(presets.PRESETS["Small model"], stop=[], num_samples=1)


def unavailable(reason: str):
    if os.environ.get("CI"):  # CI installs chromium: a skip there would hide a broken UI
        pytest.fail(f"{reason} (CI is set, so this test may not be skipped)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM}: install Debian's package with `apt-get install chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Python playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser):
    with serving(create_app("default")) as url:
        page, outside = open_page(browser, url)
        yield page, outside
        page.close()


def set_number(page, elem_id: str, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")  # Gradio commits a typed number on blur


def wait_for_text(page, selector: str, needle: str, timeout_s: float = 60):
    page.wait_for_function("([s, n]) => (document.querySelector(s)?.innerText || '').includes(n)",
                           arg=[selector, needle], timeout=timeout_s * 1000)


def expect_error(page, words: str):
    """Gradio shows a raised gr.Error as a toast; it must carry our words and no traceback."""
    toast = page.locator(".toast-body", has_text=words)
    toast.first.wait_for(state="visible", timeout=30_000)
    text = toast.first.inner_text()
    assert "Traceback" not in text and 'File "' not in text
    page.locator(".toast-close").first.click()  # dismissed, as a user would
    toast.first.wait_for(state="hidden", timeout=10_000)  # gone, so it cannot cover the next thing clicked


def test_chat_reply_streams_into_the_page(page):
    page, _ = page
    page.get_by_role("tab", name="Chat").click()
    set_number(page, "fx-max-new-tokens", 24)
    set_number(page, "fx-seed", 11)
    page.fill("#fx-message textarea", "Tell me about the moon.")
    page.keyboard.press("Enter")
    lengths, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline and "tok/s" not in page.inner_text("#fx-chat-stats"):
        bot = page.locator("#fx-chatbot [data-testid=bot]")
        lengths.append(len(bot.first.inner_text()) if bot.count() else 0)
        time.sleep(0.03)
    growing = sorted({n for n in lengths if n > 0})
    assert len(growing) >= 3, f"the reply did not stream (lengths seen: {lengths})"
    expected = current.handle.generate([{"role": "user", "content": "Tell me about the moon."}], max_new_tokens=24,
                                       seed=11, **UI_PARAMS).text
    shown = page.locator("#fx-chatbot [data-testid=bot]").first.inner_text()
    assert " ".join(shown.split()) == " ".join(expected.split())
    assert page.input_value("#fx-message textarea") == ""  # the box is ready for the next message


def test_the_opening_preset_answers_the_capital_question(page):
    """A newcomer's first question, on the preset the page opens on (a fixed seed), gets the right answer."""
    page, _ = page
    page.get_by_role("tab", name="Chat").click()
    assert page.input_value("#fx-preset input") == "Small model"
    assert "expect short, simple answers" in page.inner_text("#fx-size-hint")
    page.click("#fx-clear")
    set_number(page, "fx-max-new-tokens", 40)
    set_number(page, "fx-seed", 1)
    try:
        old = page.inner_text("#fx-chat-stats")
        page.fill("#fx-message textarea", "What is the capital of France?")
        page.keyboard.press("Enter")
        page.wait_for_function("old => (document.querySelector('#fx-chat-stats')?.innerText || '') !== old && "
                               "document.querySelector('#fx-chat-stats').innerText.includes('tok/s')", arg=old,
                               timeout=60_000)
        wait_for_text(page, "#fx-chatbot [data-testid=bot]", "Paris")
    finally:
        page.click("#fx-clear")
        set_number(page, "fx-max-new-tokens", 24)
        set_number(page, "fx-seed", 11)


def test_clear_empties_the_chat_even_while_a_reply_streams(page):
    page, _ = page
    page.get_by_role("tab", name="Chat").click()
    set_number(page, "fx-max-new-tokens", 400)
    try:
        page.fill("#fx-message textarea", "Count from 1 to 200, separated by commas.")
        page.keyboard.press("Enter")
        page.wait_for_function(
            "(document.querySelector('#fx-chatbot [data-testid=bot]')?.innerText || '').length > 0", timeout=60_000)
        page.click("#fx-clear")
        time.sleep(1.5)  # long enough for any late streamed update to land
        assert page.locator("#fx-chatbot [data-testid=user]").count() == 0
        assert page.locator("#fx-chatbot [data-testid=bot]").count() == 0
    finally:
        set_number(page, "fx-max-new-tokens", 24)  # the next tests expect short runs


def test_completion_tokens_are_coloured_with_alternatives_on_hover(page, tmp_path):
    page, _ = page
    page.get_by_role("tab", name="Completion").click()
    prompt = "The three most surprising facts about octopuses are"
    page.fill("#fx-prompt textarea", prompt)
    page.click("#fx-generate")
    wait_for_text(page, "#fx-complete-stats", "tok/s")
    tokens = page.locator("#fx-token-view .fx-tok")
    expected = current.handle.generate(prompt, max_new_tokens=24, seed=11, **UI_PARAMS)
    assert tokens.count() == len(expected.completions[0].tokens)
    assert page.input_value("#fx-continuation textarea") == expected.text
    colours = {tokens.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(tokens.count())}
    assert len(colours) >= 3  # a gradient, not one flat highlight

    target = tokens.nth(min(4, tokens.count() - 1))
    tooltip = target.locator(".fx-tip")
    assert not tooltip.is_visible()
    target.hover()
    tooltip.wait_for(state="visible")
    rows = tooltip.locator(".fx-alt")
    assert rows.count() >= 5 and "%" in rows.first.inner_text()
    assert tooltip.locator(".fx-chosen").count() == 1

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("FORNAX_README_SCREENSHOT"):
        shutil.copy(shot, os.environ["FORNAX_README_SCREENSHOT"])


def test_stop_ends_a_generation_in_the_page(page):
    page, _ = page
    page.get_by_role("tab", name="Completion").click()
    set_number(page, "fx-temperature", 0)
    set_number(page, "fx-max-new-tokens", 400)
    page.fill("#fx-prompt textarea", "1, 2, 3, 4, 5, 6,")
    page.click("#fx-generate")
    page.wait_for_function("document.querySelector('#fx-continuation textarea').value.length > 0", timeout=60_000)
    stopped_at = time.monotonic()
    page.click("#fx-stop-complete")
    wait_for_text(page, "#fx-complete-stats", "stopped", timeout_s=10)
    assert time.monotonic() - stopped_at < 5  # the full 400 tokens would take ~15 s
    set_number(page, "fx-max-new-tokens", 24)
    set_number(page, "fx-temperature", UI_PARAMS["temperature"])  # back to the opening preset


def test_bad_input_shows_a_readable_error_and_the_page_keeps_working(page, tmp_path):
    page, _ = page
    page.get_by_role("tab", name="Completion").click()
    page.fill("#fx-prompt textarea", "")
    page.click("#fx-generate")
    expect_error(page, "the prompt is empty")

    set_number(page, "fx-seed", -7)  # the sliders clamp what is typed; the seed box does not
    page.fill("#fx-prompt textarea", "Hello")
    page.click("#fx-generate")
    expect_error(page, "seed must be")
    set_number(page, "fx-seed", 11)

    page.get_by_role("tab", name="Model").click()
    badge = page.inner_text("#fx-model-badge .fx-badge")
    page.fill("#fx-source input, #fx-source textarea", "/no/such/model")
    page.click("#fx-load")
    expect_error(page, "no model at")
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    page.fill("#fx-source input, #fx-source textarea", str(corrupt))
    page.click("#fx-load")
    expect_error(page, "broken.gguf")
    assert page.inner_text("#fx-model-badge .fx-badge") == badge  # still the model that was loaded before

    page.get_by_role("tab", name="Completion").click()
    set_number(page, "fx-max-new-tokens", 24)
    page.fill("#fx-prompt textarea", "Hello")
    page.click("#fx-generate")
    wait_for_text(page, "#fx-complete-stats", "seed 11")
    expected = current.handle.generate("Hello", max_new_tokens=24, seed=11, **UI_PARAMS).text
    try:  # the box may repaint a frame after the stats line that arrived in the same update
        page.wait_for_function("([s, t]) => document.querySelector(s)?.value === t",
                               arg=["#fx-continuation textarea", expected], timeout=10_000)
    finally:
        assert page.input_value("#fx-continuation textarea") == expected


def test_finetune_job_plots_its_loss_live_and_is_still_there_after_a_reload(page, tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    page, _ = page
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))  # the job's files, out folder and tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics.values())[:120_000])
    page.get_by_role("tab", name="Finetune").click()
    page.fill("#fx-train-path textarea, #fx-train-path input", str(corpus))
    page.locator("#fx-train-mode label", has_text="pretrain").click()
    set_number(page, "fx-train-steps", 400)
    page.click("#fx-train-start")
    status = "#fx-train-status .fx-job"
    page.wait_for_selector(f"{status}[data-status=running]", timeout=60_000)
    job = page.get_attribute(status, "data-job")
    # the plot is drawn from the job's losses, and redrawn as they come
    page.wait_for_function("() => /step (\\d+)/.exec(document.querySelector('#fx-train-status').innerText)?.[1] >= 3",
                           timeout=60_000)
    page.wait_for_selector("#fx-loss-plot canvas, #fx-loss-plot svg", timeout=30_000)
    first = page.locator("#fx-loss-plot").screenshot()
    page.wait_for_function("() => /step (\\d+)/.exec(document.querySelector('#fx-train-status').innerText)?.[1] >= 20",
                           timeout=120_000)
    time.sleep(2 * 1.0)  # a poll or two later
    assert page.locator("#fx-loss-plot").screenshot() != first
    # both series drawn, each with a colour (a plot first given no data draws its lines without one: blank); the
    # plot's slots for earlier runs have none yet (paths with no points)
    strokes = page.evaluate("() => [...document.querySelectorAll('#fx-loss-plot svg .mark-line path')]"
                            ".filter(p => p.getAttribute('d')).map(p => p.getAttribute('stroke'))")
    assert len(strokes) == 2 and all(strokes), strokes

    page.reload()
    page.get_by_role("tab", name="Finetune").click()
    page.wait_for_selector(f"{status}[data-job='{job}']", timeout=30_000)
    page.wait_for_selector("#fx-loss-plot canvas, #fx-loss-plot svg", timeout=30_000)
    page.click("#fx-train-cancel")
    page.wait_for_selector(f"{status}[data-status=cancelled]", timeout=120_000)
    page.get_by_role("tab", name="Chat").click()


def test_the_page_made_no_requests_outside_the_machine(page):
    _, outside = page
    assert outside == []
