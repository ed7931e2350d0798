"""The Race tab in a real headless Chromium (Debian's `chromium`) on a tiny model with a real int4 ONNX export:
eager and ONNX int4 race, the page shows exactly two columns holding what each path generates greedily, both
speed charts draw a bar per path, and the comparison marks where int4 first leaves eager.

Set FORNAX_RACE_SCREENSHOT=some.png to keep a screenshot of the finished race."""
import os

import pytest

from backend.bench.token_diff import first_divergence
from export.attach import attach_onnx
from playground import build_app, current
from playground.tabs.race import label
from tests.backend.tiny import make_tiny
from tests.playground.serve import serving
from tests.playground.test_browser import browser, open_page, set_number  # noqa: F401 (a fixture)

PROMPT = "The quick brown fox"
TOKENS = 24


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):  # noqa: F811
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("race")
    mp.setenv("FORNAX_CACHE", str(root / "cache"))
    make_tiny("llama", root / "llama")
    current.load(str(root / "llama"))
    attach_onnx(current.handle, "int4")  # a real export, made here
    try:
        with serving(build_app()) as url:
            page, outside = open_page(browser, url, height=1400)
            yield page, outside
            page.close()
    finally:
        mp.undo()


def test_two_paths_race_into_two_columns_and_the_charts(page):
    page, outside = page
    set_number(page, "fx-max-new-tokens", TOKENS)  # the tiny model's context is 128 tokens
    page.get_by_role("tab", name="Race").click()
    paths = page.locator("#fx-race-paths")
    for name in ("eager", "onnx-int4"):  # both ready, so ticked already; tick them if not
        box = paths.get_by_label(label(name), exact=True)
        if not box.is_checked():
            box.check()
    page.fill("#fx-race-prompt textarea", PROMPT)
    page.click("#fx-race-run")
    page.wait_for_function("() => document.querySelectorAll('#fx-race-compare tr').length === 2", timeout=120_000)

    assert [page.locator(f"#fx-race-col-{i}").is_visible() for i in range(3)] == [True, True, False]
    expected = {n: current.handle.generate(PROMPT, backend=n, max_new_tokens=TOKENS, temperature=0)
                for n in ("eager", "onnx-int4")}
    for i, name in enumerate(["eager", "onnx-int4"]):
        column = page.locator(f"#fx-race-col-{i}")
        assert column.locator("textarea").input_value() == expected[name].text
        assert label(name) in column.inner_text() and "tok/s" in column.inner_text()
    for chart in ("#fx-race-decode", "#fx-race-prefill"):  # one bar per path
        page.wait_for_function("s => document.querySelectorAll(s + ' svg .mark-rect path').length === 2",
                               arg=chart, timeout=30_000)
    index = first_divergence(*(expected[n].completions[0].token_ids for n in ("eager", "onnx-int4")))
    row = page.locator("#fx-race-compare tr").nth(1)
    assert row.get_attribute("data-diverges-at") == ("" if index is None else str(index))
    if index is not None:
        assert row.locator("mark.fx-race-diff").inner_text() != ""
    assert outside == []
    if os.environ.get("FORNAX_RACE_SCREENSHOT"):
        page.locator("#fx-race-prompt").scroll_into_view_if_needed()
        page.screenshot(path=os.environ["FORNAX_RACE_SCREENSHOT"], full_page=True)
