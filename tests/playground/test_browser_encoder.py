"""Encoders and the LSTM in a real headless Chromium (Debian's `chromium`): loading a tiny BERT swaps Chat and
Completion for the Fill-mask tab; two masks fill into bars carrying the model's own probabilities; the
pseudo-log-likelihood heat line; a causal model brings Chat back. Then a tiny Transformer and an LSTM pretrained on
the same text, one after the other: the loss plot shows both runs' curves."""
import pytest
import torch

from backend.generation.fill_mask import MASK_TOKEN
from playground import create_app, current
from playground.render import RUN_SLOTS
from tests.backend.test_encoder import _config, _perturb, _tokenizer
from tests.backend.tiny import make_tiny
from tests.playground.serve import serving
from tests.playground.test_browser import browser, open_page, set_number, wait_for_text  # noqa: F401 (fixture)
from tests.playground.test_browser_chat import choose


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):  # noqa: F811
    from transformers import BertForMaskedLM

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("encoder")
    mp.setenv("FORNAX_CACHE", str(root / "cache"))  # this test's own training jobs
    tok = _tokenizer(root / "bert")
    torch.manual_seed(0)
    _perturb(BertForMaskedLM(_config(len(tok)))).save_pretrained(root / "bert")
    make_tiny("llama", root / "llama")
    with serving(create_app(str(root / "llama"))) as url:
        page, outside = open_page(browser, url, height=1400)
        yield page, outside, root
        page.close()
    mp.undo()


def tab(page, name: str):
    return page.get_by_role("tab", name=name, exact=True)


def load(page, source: str):
    page.get_by_role("tab", name="Model").click()
    page.fill("#fx-source input, #fx-source textarea", source)
    page.click("#fx-load")
    wait_for_text(page, "#fx-model-card", source)


def test_an_encoder_fills_two_masks_into_bars_and_scores_a_sentence(page):
    page, outside, root = page
    assert tab(page, "Chat").is_visible() and not tab(page, "Fill-mask").is_visible()
    load(page, str(root / "bert"))
    tab(page, "Fill-mask").wait_for(state="visible", timeout=30_000)
    assert not any(tab(page, name).is_visible() for name in ("Chat", "Completion", "Race"))
    tab(page, "Fill-mask").click()

    # one mask typed, the second put in by the Insert button at the cursor
    box = page.locator("#fx-mask-text textarea")
    box.fill("The capital of France is . It is a  city.")
    box.evaluate("(b) => { b.focus(); b.setSelectionRange(25, 25); }")
    page.click("#fx-mask-insert")
    page.wait_for_function("() => document.querySelector('#fx-mask-text textarea').value.includes('[MASK]')")
    box.evaluate("(b) => { b.focus(); const at = b.value.indexOf('a  city') + 2; b.setSelectionRange(at, at); }")
    page.click("#fx-mask-insert")
    text = f"The capital of France is {MASK_TOKEN}. It is a {MASK_TOKEN} city."
    page.wait_for_function("t => document.querySelector('#fx-mask-text textarea').value === t", arg=text)
    set_number(page, "fx-mask-top-k", 4)
    page.click("#fx-mask-fill")
    page.wait_for_selector("#fx-mask-bars .fx-mask[data-mask='1']", timeout=60_000)

    expected = current.handle.fill_mask(text, top_k=4)
    masks = page.locator("#fx-mask-bars .fx-mask")
    assert masks.count() == 2
    for i, want in enumerate(expected):
        rows = masks.nth(i).locator(".fx-cand")
        got = [(rows.nth(r).get_attribute("data-token"), float(rows.nth(r).get_attribute("data-prob")))
               for r in range(rows.count())]
        assert got == [(c["token"], c["prob"]) for c in want]
        # drawn: each bar as wide as its probability (of the track), coloured
        widths = [rows.nth(r).locator(".fx-cand-bar > span").evaluate(
            "e => e.getBoundingClientRect().width / e.parentElement.getBoundingClientRect().width")
            for r in range(rows.count())]
        for w, c in zip(widths, want):
            assert w == pytest.approx(max(0.005, c["prob"]), abs=0.01)
        colour = rows.first.locator(".fx-cand-bar > span").evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour not in ("", "rgba(0, 0, 0, 0)")

    # the pseudo-log-likelihood of a plain sentence: a heat line of its tokens, each titled with its value
    sentence = "A list comprehension builds a new list."
    box.fill(sentence)
    page.click("#fx-pll-run")
    page.wait_for_selector("#fx-pll-view .fx-pll-tok", timeout=60_000)
    scored = current.handle.pseudo_log_likelihood(sentence)
    spans = page.locator("#fx-pll-view .fx-pll-tok")
    assert spans.count() == len(scored["tokens"])
    assert [float(spans.nth(i).get_attribute("data-logprob")) for i in range(spans.count())] == \
        [t["logprob"] for t in scored["tokens"]]
    assert "log p = " in spans.first.get_attribute("title")
    assert page.inner_text("#fx-pll-view .fx-text") == sentence
    wait_for_text(page, "#fx-pll-view", f"{scored['pll']:.3f}")

    # a page opened (or reloaded) after the load shows the tabs of the model loaded now, not of the one at start-up
    page.reload()
    tab(page, "Fill-mask").wait_for(state="visible", timeout=30_000)
    assert not tab(page, "Chat").is_visible()

    # a causal model: Chat and Completion come back, Fill-mask goes
    load(page, str(root / "llama"))
    tab(page, "Chat").wait_for(state="visible", timeout=30_000)
    assert tab(page, "Completion").is_visible() and tab(page, "Race").is_visible()
    assert not tab(page, "Fill-mask").is_visible()
    assert outside == []


# the loss plot's drawn lines (a slot with no run yet has a path with no points)
DRAWN = ("[...document.querySelectorAll('#fx-loss-plot svg .mark-line path')]"
         ".filter(p => p.getAttribute('stroke') && p.getAttribute('d'))")


def strokes(page) -> list:
    return page.evaluate(f"() => ({DRAWN}).map(p => p.getAttribute('stroke'))")


def test_an_lstm_pretrain_is_plotted_beside_the_previous_run(page):
    from pydoc_data.topics import topics

    page, outside, root = page
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(topics.values())[:60_000])
    tab(page, "Finetune").click()
    page.fill("#fx-train-path textarea, #fx-train-path input", str(corpus))
    page.locator("#fx-train-mode label", has_text="pretrain").click()
    for elem_id, value in (("fx-train-steps", 6), ("fx-train-batch", 4), ("fx-train-seq-len", 32),
                           ("fx-train-eval-every", 3)):
        set_number(page, elem_id, value)
    status = "#fx-train-status .fx-job"
    jobs = []
    for preset in ("tiny-llama — Transformer (Llama)", "tiny-lstm — LSTM baseline"):
        choose(page, "fx-train-preset", preset)
        page.click("#fx-train-start")
        page.wait_for_function("([s, old]) => { const e = document.querySelector(s); "
                               "return e && !old.includes(e.dataset.job) && e.dataset.status === 'done'; }",
                               arg=[status, jobs], timeout=240_000)
        jobs.append(page.get_attribute(status, "data-job"))
    # both runs on one plot: train and validation of each, four lines in the colours of their slots
    page.wait_for_function(f"() => ({DRAWN}).length === 4", timeout=30_000)
    assert sorted(strokes(page)) == sorted(c for slot, dark, light in RUN_SLOTS[:2] for c in (dark, light))
    # and the legend says which run is which
    runs = page.locator("#fx-runs-legend .fx-run")
    assert runs.count() == 2
    assert runs.nth(0).get_attribute("data-job") == jobs[1] and "tiny-lstm · pretrain" in runs.nth(0).inner_text()
    assert runs.nth(1).get_attribute("data-job") == jobs[0] and "tiny-llama · pretrain" in runs.nth(1).inner_text()
    assert outside == []
