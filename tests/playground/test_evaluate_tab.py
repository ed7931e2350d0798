"""The Evaluate tab's handler on a tiny model: a built-in sample set is scored, the result lands in the history
table and chart; bad input is a plain gr.Error and records nothing."""
import gradio as gr
import pytest

import backend
from playground.errors import user_errors
from backend.scoring.perplexity import perplexity
from playground import state
from playground.tabs.evaluate import SAMPLES_DIR, build, history_frames, run_evaluation
from tests.backend.tiny import make_tiny


@pytest.fixture()
def tiny_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_SCORES_DB", str(tmp_path / "scores.sqlite"))  # a history of this test's own
    make_tiny("llama", tmp_path / "llama")
    state.current.load(str(tmp_path / "llama"))
    return state.current.handle


def test_tab_builds_and_scores_the_sample_text_into_the_history(tiny_loaded):
    with gr.Blocks():
        parts = build(["eager"])
    assert {"run", "summary", "examples", "chart", "history"} <= set(parts)
    summary, _, table, chart = run_evaluation(None, "prose (perplexity, agreement)", ["perplexity"], "", "", 64, 32,
                                              16, 0.0, progress=lambda *a, **k: None)
    text = (SAMPLES_DIR / "prose.txt").read_text()
    expected = perplexity(tiny_loaded.logits, [tiny_loaded.tokenizer.encode(text)], 64, 32)["perplexity"]
    assert f"**perplexity** {expected:.4g}" in summary
    assert list(table["metric"]) == ["perplexity"] and table["value"][0] == pytest.approx(expected, rel=1e-5)
    assert len(chart) == 1
    summary, examples, table, _ = run_evaluation(None, "film reviews (accuracy, F1)", ["accuracy", "f1"], "", "", 64,
                                                 32, 16, 0.0, progress=lambda *a, **k: None)
    assert "**accuracy**" in summary and "confusion" in summary and len(examples) == 8
    assert examples["correct"].is_monotonic_increasing  # worst first
    assert sorted(table["metric"]) == ["accuracy", "f1", "perplexity"]


def test_bad_input_is_a_plain_error_and_records_nothing(tiny_loaded):
    with pytest.raises(backend.FornaxError, match="different data"):
        run_evaluation(None, "prose (perplexity, agreement)", ["perplexity", "bleu"], "", "", 64, 32, 16, 0.0,
                       progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="stride 64 > max_length 32"):  # through the handler the page calls
        user_errors(run_evaluation)(None, "prose (perplexity, agreement)", ["perplexity"], "", "", 32, 64, 16, 0.0,
                       progress=lambda *a, **k: None)
    table, chart = history_frames(None)
    assert len(table) == 0 and len(chart) == 0
