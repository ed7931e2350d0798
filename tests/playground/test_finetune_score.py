"""'Score the result' over gradio_client: a short full finetune of a tiny model, then /score_finetune scores the
result and the model it started from on the job's own validation text; both land in the evaluation history, equal
to transformers' sliding-window perplexity of each saved model on that text."""
import pytest

from backend.scoring.history import History
from playground import build_app
from playground.tabs.finetune import manager
from tests.backend.test_scoring import transformers_sliding_perplexity
from tests.backend.tiny import corpus_text, make_tiny
from tests.playground.serve import serving

gradio_client = pytest.importorskip("gradio_client")


def test_score_the_result_records_before_and_after_on_the_validation_text(tmp_path, monkeypatch):
    import backend
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FORNAX_SCORES_DB", str(tmp_path / "scores.sqlite"))
    make_tiny("llama", tmp_path / "base")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text()[:8_000])
    form = dict(upload=None, data_path=str(corpus), mode="full", task="auto", model=str(tmp_path / "base"),
                preset="tiny-llama", steps=6, lr=1e-3, batch_size=2, seq_len=32, lora_r=8, eval_every=0,
                sample_prompts="The", out="")
    with serving(build_app()) as url:
        client = gradio_client.Client(url, verbose=False)
        client.predict(**form, api_name="/finetune")
        state = manager().wait(manager().latest(), timeout=300)
        assert state["status"] == "done", state.get("error")
        before = len(History().rows())  # the trainer's own val_perplexity row
        summary, _, _ = client.predict(api_name="/score_finetune")
    assert len(History().rows()) == before + 2
    rows = History().rows()[:2]
    assert [r.metric for r in rows] == ["perplexity", "perplexity"]
    after, base = rows  # newest first: the base is scored first, so the chart reads before -> after
    assert (base.model, after.model) == (str(tmp_path / "base"), state["out_dir"])
    assert base.data == after.data == "validation.txt" and base.data_fingerprint == after.data_fingerprint
    text = (manager().job_dir(manager().latest()) / "validation.txt").read_text()
    assert len(text) > 200 and text in corpus.read_text()  # the tail of the job's own data, not some other text
    ids = backend.load(state["out_dir"]).tokenizer.encode(text)
    for row in rows:
        model = AutoModelForCausalLM.from_pretrained(row.model, dtype="float32").eval()
        expected, _ = transformers_sliding_perplexity(model, ids, row.settings["max_length"], row.settings["stride"])
        assert row.value == pytest.approx(expected, rel=1e-4)
        assert f"{row.value:.4g}" in summary
    assert base.value != pytest.approx(after.value, rel=1e-3)  # the finetune changed the model
