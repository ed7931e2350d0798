"""Training an encoder: `--task classify` on a BERT folder (a new classification head, full or LoRA) through the
training loop and the job manager, checked against transformers' BertForSequenceClassification; the side-by-side
comparison with a causal model classifying by label words; next-sentence prediction in pretraining, checked against
transformers' BertForPreTraining."""
from __future__ import annotations

import json

import pytest
import torch

import backend
from backend.errors import TrainError
from backend.training import TrainConfig, train

from .test_encoder import _tokenizer
from .tiny import corpus_text
from .train_util import labelled_rows, make_base, write_jsonl


def _config(vocab_size):
    from transformers import BertConfig

    # odd sizes: 3 heads of 10, an FFN of 37, 2 layers; BERT's own initialisation (std 0.02)
    return BertConfig(vocab_size=vocab_size, hidden_size=30, num_hidden_layers=2, num_attention_heads=3,
                      intermediate_size=37, max_position_embeddings=48)


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory):
    """A tiny random BertForMaskedLM folder (odd sizes, WordPiece vocabulary of the Python docs)."""
    from transformers import BertForMaskedLM

    folder = tmp_path_factory.mktemp("bert-mlm")
    tok = _tokenizer(folder)
    torch.manual_seed(0)
    BertForMaskedLM(_config(len(tok))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "moods.jsonl", labelled_rows(120, seed=1))


def _cfg(model, data, out, mode, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), model=str(model), mode=mode, task="classify",
                       **{**dict(steps=40, lr=2e-3 if mode == "full" else 1e-2, batch_size=16, seq_len=32,
                                 eval_every=0, save_every=0, sample_every=0, val_fraction=0.25, device="cpu"), **kw})


def _val_rows(data, val_fraction=0.25, seed=0):
    from backend.data.records import read_records
    from backend.training.data import stratified_val_index

    items = read_records(str(data), "classify").items
    return [items[i] for i in stratified_val_index(items, val_fraction, seed)]


@torch.no_grad()
def _transformers_accuracy(folder, rows) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Accuracy of transformers' BertForSequenceClassification loaded from `folder` on (text, label) rows, and its
    logits with ours on the same padded batch."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    model = BertForSequenceClassification.from_pretrained(folder).eval()
    tok = BertTokenizerFast.from_pretrained(folder)
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    theirs = model(**enc).logits                                                   # (N, n_labels)
    ours = backend.load(str(folder)).logits(enc["input_ids"], attention_mask=enc["attention_mask"])
    predicted = [model.config.id2label[k] for k in theirs.argmax(-1).tolist()]
    return sum(p == label for p, (_, label) in zip(predicted, rows)) / len(rows), theirs, ours


def test_full_finetune_of_a_masked_lm_folder_trains_a_new_head_transformers_loads(bert_mlm, labelled, tmp_path):
    from backend.__main__ import main

    out = tmp_path / "clf"
    assert main(["finetune", "--task", "classify", "--model", str(bert_mlm), "--mode", "full", "--data", str(labelled),
                 "--out", str(out), "--steps", "40", "--lr", "2e-3", "--batch-size", "16", "--seq-len", "32",
                 "--val-fraction", "0.25", "--eval-every", "0", "--sample-every", "0", "--save-every", "0"]) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["BertForSequenceClassification"]
    assert hf["num_labels"] == 2 and hf["id2label"] == {"0": "bad", "1": "good"}
    metrics = json.loads((out / "training.json").read_text())["metrics"]
    print(f"encoder full finetune: {metrics}")
    assert metrics["method"] == "classification head" and metrics["n"] == 30
    assert metrics["accuracy"] >= metrics["majority_baseline"] + 0.3, metrics
    accuracy, theirs, ours = _transformers_accuracy(out, _val_rows(labelled))
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert accuracy == pytest.approx(metrics["accuracy"])   # the reported accuracy, counted independently


def test_lora_trains_adapters_and_head_only_through_the_job_manager(bert_mlm, labelled, tmp_path):
    from backend.training.jobs import JobManager

    manager = JobManager(tmp_path / "jobs")
    job = manager.start(_cfg(bert_mlm, labelled, tmp_path / "lora", "lora", lora_r=4))
    state = manager.wait(job, timeout=300)
    assert state["status"] == "done", manager.log(job)
    c = _config(400)
    d, f, L, r = c.hidden_size, c.intermediate_size, c.num_hidden_layers, 4
    adapters = L * r * (4 * (d + d) + (d + f) + (f + d))      # q k v proj, up, down: A (r, in) + B (out, r)
    head = (d * d + d) + (d * 2 + 2)                           # pooler + classifier, trained whole
    assert state["trainable_params"] == adapters + head
    print(f"encoder LoRA: {state['metrics']}, {state['trainable_params']} trainable")
    assert state["metrics"]["accuracy"] >= state["metrics"]["majority_baseline"] + 0.2, state["metrics"]
    from safetensors.torch import load_file

    base = load_file(str(bert_mlm / "model.safetensors"))
    tuned = load_file(str(tmp_path / "lora" / "model.safetensors"))
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(base[emb], tuned[emb])                  # frozen
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(base[q], tuned[q])               # the adapter merged in
    accuracy, theirs, ours = _transformers_accuracy(tmp_path / "lora", _val_rows(labelled))
    assert (ours - theirs).abs().max().item() <= 1e-4 and accuracy == pytest.approx(state["metrics"]["accuracy"])


def test_cancelled_encoder_run_resumes_to_the_same_model(bert_mlm, labelled, tmp_path):
    straight = train(_cfg(bert_mlm, labelled, tmp_path / "straight", "lora", steps=12, lora_r=4))
    out, asked = tmp_path / "resumed", []
    cancelled = train(_cfg(bert_mlm, labelled, out, "lora", steps=12, lora_r=4),  # asked once before each step
                      should_stop=lambda: asked.append(1) or len(asked) > 5)
    assert cancelled["status"] == "cancelled" and cancelled["step"] == 5 and any(out.glob("checkpoint-*"))
    resumed = train(_cfg(bert_mlm, labelled, out, "lora", steps=12, lora_r=4, resume=True))
    assert resumed["status"] == "done" and [s for s, _ in resumed["train_loss"]] == list(range(1, 13))
    assert straight["train_loss"][-1][1] == pytest.approx(resumed["train_loss"][-1][1], rel=1e-5)
    a, b = backend.load(str(tmp_path / "straight")), backend.load(str(out))
    for text in ("sunny warm day", "dark cold day"):
        ids = torch.tensor([a.tokenizer.encode(text)])
        assert (a.logits(ids) - b.logits(ids)).abs().max().item() <= 1e-5


def test_causal_and_encoder_runs_compare_side_by_side(bert_mlm, labelled, tmp_path):
    from backend.training.compare import classify_comparison

    causal_folder = make_base(tmp_path / "causal-base")
    causal = train(_cfg(causal_folder, labelled, tmp_path / "causal", "full", steps=10, lr=2e-3, seq_len=48))
    encoder = train(_cfg(bert_mlm, labelled, tmp_path / "encoder", "full", steps=10))
    table = classify_comparison(causal, encoder)
    assert table["same_validation"] and table["labels"] == ["bad", "good"]
    by_kind = {row["kind"]: row for row in table["runs"]}
    assert by_kind["causal"]["method"] == "label words" and by_kind["encoder"]["method"] == "classification head"
    for kind, state in (("causal", causal), ("encoder", encoder)):
        row = by_kind[kind]
        assert row["accuracy"] == state["metrics"]["accuracy"] and row["n"] == 30
        assert row["majority_baseline"] == pytest.approx(0.5) and row["steps"] == 10
    other = write_jsonl(tmp_path / "other.jsonl", labelled_rows(120, seed=2))
    third = train(_cfg(bert_mlm, other, tmp_path / "third", "full", steps=2))
    assert not classify_comparison(causal, third)["same_validation"]
    with pytest.raises(TrainError, match="classif"):
        classify_comparison(causal, {"config": {}, "metrics": {}, "status": "done"})


def test_encoder_classify_plain_errors(bert_mlm, labelled, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(corpus_text()[:3000])
    clf = tmp_path / "clf"
    train(_cfg(bert_mlm, labelled, clf, "full", steps=1))
    with pytest.raises(TrainError, match="classification head"):   # a classifier asked to train on plain text
        train(TrainConfig(data=str(text), out=str(tmp_path / "a"), model=str(clf), mode="full", steps=1))
    relabelled = write_jsonl(tmp_path / "r.jsonl", [{**r, "label": "meh" if r["label"] == "bad" else "good"}
                                                   for r in labelled_rows(40)])
    with pytest.raises(TrainError, match="'meh'"):
        train(_cfg(clf, relabelled, tmp_path / "b", "full", steps=1))
    with pytest.raises(TrainError, match="finetune the pretrained folder"):
        train(TrainConfig(data=str(labelled), out=str(tmp_path / "d"), mode="pretrain", preset="tiny-bert",
                          task="classify", steps=1, vocab_size=300, seq_len=32))
    with pytest.raises(TrainError, match="--nsp"):
        TrainConfig(data=str(text), out=str(tmp_path / "c"), model=str(bert_mlm), mode="full", nsp=True).check()


def test_nsp_pretraining_accuracy_matches_an_independent_count_in_transformers(tmp_path):
    from transformers import BertForPreTraining

    from backend.__main__ import main
    from backend.formats.tokenizer import Tokenizer
    from backend.data.records import read_records
    from backend.training.mlm import build_nsp, split_sentences

    data = tmp_path / "docs.txt"
    data.write_text(corpus_text()[:30000])
    out = tmp_path / "nsp"
    assert main(["finetune", "--mode", "pretrain", "--preset", "tiny-bert", "--nsp", "--data", str(data), "--out",
                 str(out), "--steps", "30", "--batch-size", "16", "--seq-len", "48", "--lr", "2e-3", "--eval-every",
                 "0", "--sample-every", "0", "--save-every", "0", "--vocab-size", "400"]) == 0
    report = json.loads((out / "training.json").read_text())
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    model = BertForPreTraining.from_pretrained(out).eval()     # every tensor of the layout present (no warning)
    pairs = build_nsp(read_records(str(data), "lm"), Tokenizer.from_folder(out), 48, 0.1, 0).val
    sentences = split_sentences(data.read_text())
    assert len(pairs) == max(4, round(len(sentences) * 0.1)) - 1
    labels = torch.tensor(pairs.labels)
    assert 0.25 < labels.float().mean().item() < 0.75           # about half random
    right = 0
    with torch.no_grad():
        for i in range(len(pairs)):
            ids, types = pairs.ids[i][None], pairs.types[i][None]
            logits = model(input_ids=ids, token_type_ids=types).seq_relationship_logits  # (1, 2)
            right += int(logits.argmax(-1).item() == pairs.labels[i])
    metrics = report["metrics"]
    assert metrics["nsp_pairs"] == len(pairs)
    assert metrics["nsp_accuracy"] == pytest.approx(right / len(pairs))
    assert "masked_accuracy" in metrics
    h = backend.load(str(out))                                  # our loader reads it as a masked LM
    assert h.config.family == "bert" and len(h.fill_mask("The [MASK] statement", top_k=2)[0]) == 2

    # A tiny run may still guess one class everywhere; a random wide init predicts both, so the count must really
    # follow each pair: the same evaluation on such a model, saved and counted in transformers again.
    from backend.models.config import ModelConfig
    from backend.models.encoder import Encoder
    from backend.loading import save_pretrained
    from backend.training.mlm import MaskedLM

    tokenizer = Tokenizer.from_folder(out)
    cfg = ModelConfig.from_dict({**ModelConfig.from_name("tiny-bert").to_dict(), "vocab_size": tokenizer.vocab_size,
                                 "nsp_head": True, "pad_token_id": tokenizer.token_to_id("[PAD]")})
    torch.manual_seed(3)
    wide = Encoder(cfg)
    wide.init_weights(std=0.5)
    with torch.no_grad():  # centre the is-next margin on these pairs so that both answers occur, whatever the init
        pad = torch.nn.utils.rnn.pad_sequence
        ids, types = pad(list(pairs.ids), batch_first=True), pad(list(pairs.types), batch_first=True)
        mask = pad([torch.ones(len(t), dtype=torch.long) for t in pairs.ids], batch_first=True)
        margin = wide.eval()(ids, mask, types, nsp=True)[1].diff(dim=-1).squeeze(-1)    # logit 1 - logit 0
        ordered, n = margin.sort().values, len(margin)  # threshold in the widest gap of the middle half, so that
        cut = max(range(n // 4, 3 * n // 4 + 1), key=lambda i: ordered[i] - ordered[i - 1])  # rounding flips none
        wide.nsp_head.bias[1] -= (ordered[cut - 1] + ordered[cut]) / 2
    metrics = MaskedLM(tokenizer, cfg.vocab_size, 0, nsp=True).evaluate(wide, pairs, 8, torch.device("cpu"))[2]
    save_pretrained(wide.eval(), tokenizer, tmp_path / "wide")
    model = BertForPreTraining.from_pretrained(tmp_path / "wide").eval()
    with torch.no_grad():
        guesses = [int(model(input_ids=pairs.ids[i][None], token_type_ids=pairs.types[i][None])
                       .seq_relationship_logits.argmax(-1)) for i in range(len(pairs))]
    assert len(set(guesses)) == 2
    assert metrics["nsp_accuracy"] == pytest.approx(sum(g == y for g, y in zip(guesses, pairs.labels)) / len(pairs))
