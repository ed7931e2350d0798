"""ONNX exports of the two non-causal families: BERT-style encoders in optimum's layout (optimum's
ORTModelForMaskedLM / ORTModelForSequenceClassification load them and agree with transformers), and the LSTM with its
state as graph inputs/outputs (the same generation loop samples from it; greedy tokens equal eager's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import backend
from backend.models.config import ModelConfig
from backend.loading import save_pretrained
from backend.models.lstm import LSTMLM
from backend.runners.onnx_encoder_lstm import OnnxEncoderRunner, OnnxLSTMRunner
from backend.formats.tokenizer import Tokenizer
from export import ExportError, export
from export.__main__ import main as export_cli
from tests.backend.test_encoder import SENTENCES, _config, _perturb, _tokenizer
from tests.backend.tiny import save_tokenizer

from .test_export import optimum_path  # noqa: F401 -- the optimum oracle, installed on its own path


@pytest.fixture(scope="module")
def bert_exports(tmp_path_factory):
    """A tiny random BertForMaskedLM and BertForSequenceClassification (odd sizes), each exported at fp32."""
    from transformers import BertForMaskedLM, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bert-onnx")
    tok = _tokenizer(root / "mlm")
    _tokenizer(root / "cls")
    torch.manual_seed(0)
    models = {"mlm": _perturb(BertForMaskedLM(_config(len(tok)))),
              "cls": _perturb(BertForSequenceClassification(_config(
                  len(tok), num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"},
                  label2id={"neg": 0, "neutral": 1, "pos": 2})))}
    infos = {}
    for kind, model in models.items():
        model.save_pretrained(root / kind)
        infos[kind] = export(str(root / kind), root / f"{kind}-onnx")
    return root, tok, models, infos


def _padded_batch(tok):
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the batch really holds padding
    return enc["input_ids"], enc["attention_mask"]


def test_masked_lm_export_matches_eager_and_transformers(bert_exports):
    root, tok, models, infos = bert_exports
    r = infos["mlm"]["report"]
    assert r["head"] == "masked-lm" and r["padded_positions"] > 0 and r["masked_positions"] >= 10
    assert r["max_abs_logit_diff"] <= 1e-4 and r["top1_agreement"] == 1.0
    assert json.loads((root / "mlm-onnx" / "parity.json").read_text()) == r
    onnx, eager = backend.load(root / "mlm-onnx"), backend.load(root / "mlm")
    assert list(onnx.runners) == ["onnx"] and isinstance(onnx.runners["onnx"], OnnxEncoderRunner)
    ids, mask = _padded_batch(tok)
    with torch.no_grad():
        theirs = models["mlm"](input_ids=ids, attention_mask=mask).logits
    ours = onnx.logits(ids, attention_mask=mask)
    assert ours.shape == theirs.shape
    real = mask.bool()  # padded positions' logits are nobody's business
    assert (ours - theirs).abs()[real].max().item() <= 1e-4
    text = "The capital of [MASK] is a [MASK]."
    got, want = onnx.fill_mask(text, top_k=3), eager.fill_mask(text, top_k=3)
    assert [[c["id"] for c in m] for m in got] == [[c["id"] for c in m] for m in want]


def test_classifier_export_predicts_the_same_labels(bert_exports):
    root, tok, models, infos = bert_exports
    r = infos["cls"]["report"]
    assert r["head"] == "classify" and r["label_agreement"] == 1.0 and r["max_abs_logit_diff"] <= 1e-4
    assert set(r["labels_eager"]) <= {"neg", "neutral", "pos"}
    onnx = backend.load(root / "cls-onnx")
    ids, mask = _padded_batch(tok)
    with torch.no_grad():
        theirs = models["cls"](input_ids=ids, attention_mask=mask).logits
    ours = onnx.logits(ids, attention_mask=mask)
    assert ours.shape == theirs.shape == (3, 3)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_graph_is_the_one_optimum_reads(bert_exports):
    import onnx

    root, *_ = bert_exports
    for kind, out_dims in (("mlm", ["batch_size", "sequence_length", 400]), ("cls", ["batch_size", 3])):
        graph = onnx.load(str(root / f"{kind}-onnx" / "model.onnx")).graph
        assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
        assert [o.name for o in graph.output] == ["logits"]
        for i in graph.input:
            assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch_size", "sequence_length"]
        assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == out_dims
    config = json.loads((root / "cls-onnx" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}


def test_optimum_loads_both_encoder_exports_and_agrees_with_transformers(bert_exports, optimum_path):
    root, tok, models, _ = bert_exports
    enc = tok([SENTENCES[0], SENTENCES[1], SENTENCES[0]], [SENTENCES[0], SENTENCES[0], "Yes."], padding=True,
              truncation=True, max_length=40, return_tensors="pt")  # within the 48 positions
    assert (enc["attention_mask"] == 0).any() and enc["token_type_ids"].any()  # padding and a second segment
    batch = {k: v.tolist() for k, v in enc.items()}
    script = (
        "import json, sys, torch\n"
        "from optimum.onnxruntime import ORTModelForMaskedLM, ORTModelForSequenceClassification\n"
        "from transformers import AutoTokenizer\n"
        "batch = {k: torch.tensor(v) for k, v in json.loads(sys.argv[3]).items()}\n"
        "mlm = ORTModelForMaskedLM.from_pretrained(sys.argv[1])\n"
        "cls = ORTModelForSequenceClassification.from_pretrained(sys.argv[2])\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(json.dumps({'mlm': mlm(**batch).logits.tolist(), 'cls': cls(**batch).logits.tolist(),\n"
        "                  'labels': cls.config.id2label, 'mask_token': tok.mask_token,\n"
        "                  'ids': tok('The capital of France is [MASK].')['input_ids']}))\n")
    env = {**os.environ, "PYTHONPATH": str(optimum_path)}
    done = subprocess.run([sys.executable, "-c", script, str(root / "mlm-onnx"), str(root / "cls-onnx"),
                           json.dumps(batch)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        mlm, cls = models["mlm"](**enc).logits, models["cls"](**enc).logits
    real = enc["attention_mask"].bool()
    assert (torch.tensor(theirs["mlm"]) - mlm).abs()[real].max().item() <= 1e-4
    assert (torch.tensor(theirs["cls"]) - cls).abs().max().item() <= 1e-4
    assert theirs["labels"] == {"0": "neg", "1": "neutral", "2": "pos"}
    # the export's tokenizer names its [MASK] for transformers, and encodes as BertTokenizerFast does
    assert theirs["mask_token"] == "[MASK]"
    assert theirs["ids"] == tok("The capital of France is [MASK].")["input_ids"]


def test_encoder_refuses_int4_and_leaves_nothing(bert_exports, tmp_path, capsys):
    root, *_ = bert_exports
    with pytest.raises(ExportError, match="not offered for a BERT-style encoder model"):
        export(str(root / "mlm"), tmp_path / "int4", quant="int4")
    assert not (tmp_path / "int4").exists()
    assert export_cli(["--model", str(root / "mlm"), "--out", str(tmp_path / "x"), "--quant", "int4"]) == 2
    assert "choose one of none, int8" in capsys.readouterr().err
    assert export_cli(["bench", "--model", str(root / "mlm")]) == 2
    assert "causal Transformers" in capsys.readouterr().err


def test_encoder_int8_export_runs_with_a_report(bert_exports, tmp_path):
    root, *_ = bert_exports
    info = export(str(root / "mlm"), tmp_path / "int8", quant="int8")
    assert info["quant_method"].startswith("onnxruntime MatMulNBits quantizer, 8-bit")
    assert info["sizes_bytes"]["int8"] < info["sizes_bytes"]["fp32"]
    r = info["report"]
    # int8 weights and activations on a tiny random model: close, not exact
    assert 0 < r["max_abs_logit_diff"] < 1.0 and r["top1_agreement"] >= 0.8  # measured 0.27, 97.8 %


# --- the LSTM ---

@pytest.fixture(scope="module")
def lstm_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("lstm-onnx")
    (root / "hf").mkdir()
    save_tokenizer(root / "hf")
    tokenizer = Tokenizer.from_folder(root / "hf")
    cfg = ModelConfig(family="lstm", vocab_size=tokenizer.vocab_size, n_layer=2, d_model=36, max_seq_len=256)
    torch.manual_seed(3)
    model = LSTMLM(cfg)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # large logits: a wrong gate order or a dropped state would show
    save_pretrained(model, tokenizer, root / "hf")
    return root, export(str(root / "hf"), root / "onnx")


def test_lstm_export_matches_eager_with_the_state_carried(lstm_export):
    root, info = lstm_export
    r = info["report"]
    assert r["max_abs_logit_diff"] <= 1e-5 and r["max_abs_logit_diff_state_carried"] <= 1e-5
    assert r["top1_agreement"] == 1.0 and r["greedy_match_length"] == r["greedy_tokens"] == 64
    eager = backend.load(root / "hf")
    runner = OnnxLSTMRunner(root / "onnx" / "model.onnx", eager.config)
    ids = torch.randint(0, eager.config.vocab_size, (3, 20))
    expected = eager.logits(ids)                                                 # (3, 20, V), from a zero state
    assert (runner.full_logits(ids) - expected).abs().max().item() <= 1e-5
    runner.start(3, 20)
    got = [runner.forward(ids[:, :6], 0)]                                        # a prompt, then one token a step
    got += [runner.forward(ids[:, t:t + 1], t) for t in range(6, 20)]
    assert (torch.stack(got, 1) - expected[:, 5:]).abs().max().item() <= 1e-5
    with pytest.raises(backend.GenerationError, match="in order"):
        runner.forward(ids[:, :1], 3)


def test_lstm_export_loads_and_generates_as_eager(lstm_export):
    import onnx

    root, _ = lstm_export
    graph = onnx.load(str(root / "onnx" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "h0", "c0"]
    assert [o.name for o in graph.output] == ["logits", "hn", "cn"]
    eager, exported = backend.load(root / "hf"), backend.load(root / "onnx")
    assert exported.config.family == "lstm" and isinstance(exported.runners["onnx"], OnnxLSTMRunner)
    greedy = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
    want = eager.generate("The for statement", **greedy).completions[0].token_ids
    assert exported.generate("The for statement", **greedy).completions[0].token_ids == want
    sampled = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=5, num_samples=2, ignore_eos=True)
    assert exported.generate("The with", **sampled).texts == eager.generate("The with", **sampled).texts
    with pytest.raises(backend.GenerationError, match="chat template"):
        exported.generate([{"role": "user", "content": "hi"}], max_new_tokens=4)
