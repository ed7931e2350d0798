"""The Evaluate tab in a real headless Chromium (Debian's `chromium`), on a served app with a tiny model: a
perplexity evaluation of the built-in sample text shows its value (equal to a direct computation), adds a row to
the history table and draws its points in the history chart."""
import pytest

from backend.scoring.perplexity import perplexity
from playground import create_app, current
from playground.tabs.evaluate import SAMPLES_DIR
from tests.backend.tiny import make_tiny
from tests.playground.serve import serving
from tests.playground.test_browser import browser, open_page, set_number, wait_for_text  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):  # noqa: F811
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("evaluate")
    mp.setenv("FORNAX_SCORES_DB", str(root / "scores.sqlite"))  # a history of this test's own
    make_tiny("llama", root / "llama")
    with serving(create_app(str(root / "llama"))) as url:
        page, outside = open_page(browser, url, height=1400)
        yield page, outside
        page.close()
    mp.undo()


def chart_points(page) -> list:
    """The (x, y) vertices of the history chart's drawn lines, from its SVG."""
    return page.evaluate("""() => [...document.querySelectorAll('#fx-eval-chart svg .mark-line path')]
        .filter(p => p.getAttribute('stroke')).flatMap(p => (p.getAttribute('d') || '').match(/[ML][^MLZ]+/g) || [])""")


def test_a_perplexity_evaluation_shows_its_value_a_history_row_and_chart_points(page):
    page, outside = page
    page.get_by_role("tab", name="Evaluate").click()
    text = (SAMPLES_DIR / "prose.txt").read_text()
    handle = current.handle
    for window, stride in [(64, 32), (96, 48)]:
        set_number(page, "fx-eval-max-length", window)
        set_number(page, "fx-eval-stride", stride)
        page.click("#fx-eval-run")
        expected = perplexity(handle.logits, [handle.tokenizer.encode(text)], window, stride)["perplexity"]
        wait_for_text(page, "#fx-eval-summary", f"{expected:.4g}")
        assert "prose.txt" in page.inner_text("#fx-eval-summary")
        # the history table gained this run's row (newest first), with the value the summary shows
        # (the two runs' values differ, so the newest row showing this one means the row is new)
        page.wait_for_function("v => document.querySelector('#fx-eval-history tbody tr')?.textContent.includes(v)",
                               arg=f"{round(expected, 6)}", timeout=30_000)
        first_row = page.evaluate("() => document.querySelector('#fx-eval-history tbody tr').textContent")
        assert "perplexity" in first_row
    # the chart drew one line through both runs: two vertices, coloured
    page.wait_for_function("() => document.querySelectorAll('#fx-eval-chart svg .mark-line path').length > 0",
                           timeout=30_000)
    page.wait_for_timeout(1000)
    assert len(chart_points(page)) == 2, chart_points(page)
    assert outside == []
