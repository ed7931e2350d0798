"""Public mode (FORNAX_PUBLIC=1) in a real headless Chromium: a server path typed into the Model tab and an upload
over the size cap are both refused with a readable message, and the page keeps working."""
import pytest

from playground import build_app, current
from tests.backend.tiny import make_tiny
from tests.playground.serve import serving
from tests.playground.test_browser import browser, expect_error, set_number, wait_for_text  # noqa: F401 (a fixture)

UPLOAD_CAP = 32 * 1024


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):  # noqa: F811
    mp = pytest.MonkeyPatch()
    mp.setenv("FORNAX_PUBLIC", "1")
    mp.setenv("FORNAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("FORNAX_MAX_UPLOAD_BYTES", str(UPLOAD_CAP))
    tiny = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny("llama", tiny)
    current.load(str(tiny))
    try:
        with serving(build_app()) as url:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#fx-message textarea")
            yield page
            page.close()
    finally:
        mp.undo()


def test_a_server_path_is_refused_in_the_page(page, tmp_path):
    page.get_by_role("tab", name="Model").click()
    badge = page.inner_text("#fx-model-badge .fx-badge")
    for source in ("/etc/passwd", str(tmp_path / "missing")):
        page.fill("#fx-source input, #fx-source textarea", source)
        page.click("#fx-load")
        expect_error(page, "paths on the server are not available")
    assert page.inner_text("#fx-model-badge .fx-badge") == badge  # still the model loaded before


def test_an_over_cap_upload_is_refused_in_the_page(page, tmp_path):
    big = tmp_path / "big.gguf"
    big.write_bytes(b"GGUF" + bytes(2 * UPLOAD_CAP))
    page.get_by_role("tab", name="Model").click()
    page.get_by_text("Upload a .gguf file").click()
    page.locator("#fx-gguf-upload input[type=file]").first.set_input_files(str(big))  # not the chat import
    expect_error(page, "exceed the maximum allowed size of 32.0 Kb")  # Gradio's max_file_size, from our cap
    # the page still answers
    page.get_by_role("tab", name="Completion").click()
    set_number(page, "fx-max-new-tokens", 8)  # the tiny model's context is 128
    page.fill("#fx-prompt textarea", "Hello")
    page.click("#fx-generate")
    wait_for_text(page, "#fx-complete-stats", "tok/s")
