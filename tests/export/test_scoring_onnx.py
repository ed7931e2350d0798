"""The same perplexity from the eager model and its ONNX export (scoring through any runner's logits)."""
import pytest

import backend
from backend.scoring.agreement import backend_agreement
from backend.scoring.modules import compute_metric
from export import export
from tests.backend.tiny import corpus_text, make_tiny


@pytest.mark.parametrize("kind", ["llama"])
def test_eager_and_onnx_perplexity_agree(kind, tmp_path):
    from backend.scoring.run import evaluate_model

    make_tiny(kind, tmp_path / "hf")
    export(str(tmp_path / "hf"), tmp_path / "onnx", verify=False)
    eager, onnx = backend.load(tmp_path / "hf"), backend.load(tmp_path / "onnx")
    texts = [corpus_text()[:900], corpus_text()[3000:3500]]
    ours = compute_metric("perplexity", texts, model=eager, max_length=64, stride=32)
    theirs = compute_metric("perplexity", texts, model=onnx, backend="onnx", max_length=64, stride=32)
    assert ours["tokens"] == theirs["tokens"]
    assert abs(theirs["perplexity"] - ours["perplexity"]) / ours["perplexity"] <= 5e-3
    agree = backend_agreement(eager.logits, onnx.logits, [eager.tokenizer.encode(t) for t in texts], 64, 32)
    assert agree["top1_agreement"] > 0.99 and agree["mean_kl"] < 1e-6
    assert abs(agree["perplexity_rel_delta"]) <= 5e-3
    # the same through one handle with the export attached as a second backend (the CLI's --against)
    eager.add_runner("onnx", onnx.runners["onnx"])
    (tmp_path / "t.txt").write_text(texts[0])
    result = evaluate_model(eager, ["perplexity", "agreement"], tmp_path / "t.txt", against="onnx", max_length=64,
                            history=False)
    assert result["values"]["top1_agreement"] > 0.99 and result["values"]["mean_kl"] < 1e-6
    assert abs(result["agreement"]["perplexity_rel_delta"]) <= 5e-3
    assert result["agreement"]["perplexity_ref"] == pytest.approx(result["values"]["perplexity"], rel=1e-6)
