"""Stored XSS through a model's chat template (issue 18, item 7), in a real headless Chromium: a template whose
raise_exception text is HTML with script in it. Typing a message shows that text in the context gauge, and Send
shows it in the error toast: both times as plain text (the markup visible, no element made, no script run), and the
page keeps working for a message the template accepts."""
import json

import pytest

from playground import build_app, current
from tests.backend.tiny import make_tiny
from tests.playground.serve import serving
from tests.playground.test_browser import browser, set_number, wait_for_text  # noqa: F401 (a fixture)

PAYLOAD = ('<img id="fx-pwned-img" src="x" onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
           '<b id="fx-pwned-bold">bold</b>')
TEMPLATE = ("{% for m in messages %}{% if 'attack' in m['content'] %}{{ raise_exception('" + PAYLOAD + "') }}"
            "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INERT = "() => window.__pwned === undefined && !document.querySelector('#fx-pwned-img, #fx-pwned-bold')"


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("models") / "tiny-xss"
    make_tiny("llama", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    current.load(str(folder))
    with serving(build_app()) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#fx-message textarea")
        set_number(page, "fx-max-new-tokens", 8)
        yield page
        page.close()


def test_template_error_text_is_shown_inert_in_the_gauge_and_the_toast(page):
    page.get_by_role("tab", name="Chat").click()
    page.fill("#fx-message textarea", "an attack")
    wait_for_text(page, "#fx-gauge", 'onerror="window.__pwned = 1"')  # the markup shows as text
    assert page.evaluate(INERT), "the template's text became live HTML in the gauge"

    page.click("#fx-send")
    toast = page.locator(".toast-body", has_text="refused these messages")
    toast.first.wait_for(state="visible", timeout=30_000)
    page.wait_for_timeout(500)  # an <img onerror> fires once its (missing) image fails to load
    assert page.evaluate(INERT), "the template's text became live HTML in the error toast"
    page.locator(".toast-close").first.click()

    # the page still works: a message the template accepts is counted and answered
    page.fill("#fx-message textarea", "hello there")
    wait_for_text(page, "#fx-gauge", "context:")
    page.click("#fx-send")
    wait_for_text(page, "#fx-chat-stats", "tok/s")
    assert page.evaluate(INERT)
