"""BERT-style encoders: parity with transformers' BertForMaskedLM / BertForSequenceClassification on tiny random
configs (odd sizes, padding in the batch), WordPiece ids equal to BertTokenizerFast's, fill-mask and
pseudo-log-likelihood against a direct computation with transformers, and the plain errors."""
from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch

import backend
from backend.errors import FornaxError, GenerationError

from .tiny import corpus_text

SENTENCES = ["The capital of France is Paris.", "A list comprehension builds a new list!",
             "Unbelievably, tokenizers split words into pieces: comprehensions."]


@lru_cache(maxsize=None)
def _vocab() -> tuple[str, ...]:
    """A WordPiece vocabulary trained by `tokenizers` on text that ships with Python."""
    from tokenizers import BertWordPieceTokenizer

    tk = BertWordPieceTokenizer(lowercase=True)
    text = corpus_text()
    tk.train_from_iterator([text[i:i + 2000] for i in range(0, 200_000, 2000)], vocab_size=400)
    vocab = tk.get_vocab()
    return tuple(sorted(vocab, key=vocab.get))


def _tokenizer(folder):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(_vocab())}, do_lower_case=True)
    assert len(tok) == len(_vocab())
    tok.save_pretrained(folder)
    (folder / "vocab.txt").unlink(missing_ok=True)  # we read tokenizer.json only
    return tok


def _perturb(model):
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: perturb them so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "LayerNorm" in name:
                p.normal_(1.0, 0.1)
    return model.eval()


def _config(vocab_size, **kw):
    from transformers import BertConfig

    # odd sizes: 3 heads of 10, an FFN of 37, 3 layers
    return BertConfig(vocab_size=vocab_size, hidden_size=30, num_hidden_layers=3, num_attention_heads=3,
                      intermediate_size=37, max_position_embeddings=48, type_vocab_size=2, initializer_range=0.2,
                      **kw)


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    from transformers import BertForMaskedLM

    folder = tmp_path_factory.mktemp("bert-mlm")
    tok = _tokenizer(folder)
    torch.manual_seed(0)
    model = _perturb(BertForMaskedLM(_config(len(tok))))
    model.save_pretrained(folder)
    return folder, model, tok


def _batch(tok):
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the batch really holds padding
    return enc["input_ids"], enc["attention_mask"]


def test_masked_lm_logits_match_transformers_with_padding(mlm):
    folder, model, tok = mlm
    h = backend.load(str(folder))
    assert h.config.family == "bert" and h.config.labels is None
    ids, mask = _batch(tok)
    ours = h.logits(ids, attention_mask=mask)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == theirs.shape == (3, ids.shape[1], len(tok))
    assert (ours - theirs).abs().max().item() <= 1e-4
    # padding changes nothing for the real tokens: the first sentence alone gives the same logits
    n = int(mask[0].sum())
    alone = h.logits(ids[:1, :n])
    assert (alone[0] - ours[0, :n]).abs().max().item() <= 1e-4


def test_token_types_match_transformers(mlm):
    folder, model, tok = mlm
    h = backend.load(str(folder))
    enc = tok(SENTENCES[0], SENTENCES[1], return_tensors="pt")
    assert enc["token_type_ids"].any()
    ours = h.model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    with torch.no_grad():
        theirs = model(**enc).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_pytorch_model_bin_loads_with_weights_only(mlm, tmp_path):
    folder, model, tok = mlm
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    h = backend.load(str(tmp_path))
    ids, mask = _batch(tok)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    assert (h.logits(ids, attention_mask=mask) - theirs).abs().max().item() <= 1e-4


def test_sequence_classification_matches_transformers(tmp_path):
    from transformers import BertForSequenceClassification

    tok = _tokenizer(tmp_path)
    torch.manual_seed(1)
    cfg = _config(len(tok), num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"},
                  label2id={"neg": 0, "neutral": 1, "pos": 2})
    model = _perturb(BertForSequenceClassification(cfg))
    model.save_pretrained(tmp_path)
    h = backend.load(str(tmp_path))
    assert h.config.labels == ["neg", "neutral", "pos"]
    ids, mask = _batch(tok)
    ours = h.logits(ids, attention_mask=mask)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == theirs.shape == (3, 3)
    assert (ours - theirs).abs().max().item() <= 1e-4
    with pytest.raises(GenerationError, match="classifier"):
        h.fill_mask("a [MASK] here")


def test_wordpiece_ids_equal_bert_tokenizer_fast(mlm):
    folder, _, tok = mlm
    h = backend.load(str(folder))
    texts = SENTENCES + ["  Ünïcödé   accents, CAPITALS and [MASK] tokens ##x  ", "def f(x): return x ** 2  # 42"]
    for text in texts:
        assert h.tokenizer.encode(text) == tok(text)["input_ids"], text
    assert h.tokenizer.decode(tok(texts[0])["input_ids"], skip_special_tokens=True) == tok.decode(
        tok(texts[0])["input_ids"], skip_special_tokens=True)


def test_fill_mask_matches_a_direct_transformers_computation(mlm):
    folder, model, tok = mlm
    h = backend.load(str(folder))
    text = "The [MASK] of France is [MASK]."
    got = h.fill_mask(text, top_k=4)
    enc = tok(text, return_tensors="pt")
    where = (enc["input_ids"][0] == tok.mask_token_id).nonzero().flatten()
    with torch.no_grad():
        probs = model(**enc).logits[0, where].softmax(-1)
    assert len(got) == 2
    for row, p in zip(got, probs):
        top = p.topk(4)
        assert [c["id"] for c in row] == top.indices.tolist()
        assert [c["prob"] for c in row] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert [c["token"] for c in row] == [tok.convert_ids_to_tokens(i) for i in top.indices.tolist()]


def test_pseudo_log_likelihood_matches_transformers(mlm):
    folder, model, tok = mlm
    h = backend.load(str(folder))
    text = SENTENCES[0]
    got = h.pseudo_log_likelihood(text)
    ids = tok(text)["input_ids"]
    expected = []
    for i in range(1, len(ids) - 1):  # every token but [CLS] and [SEP]
        masked = torch.tensor([ids[:i] + [tok.mask_token_id] + ids[i + 1:]])
        with torch.no_grad():
            expected.append(model(input_ids=masked).logits[0, i].log_softmax(-1)[ids[i]].item())
    assert [t["logprob"] for t in got["tokens"]] == pytest.approx(expected, abs=1e-4)
    assert got["pll"] == pytest.approx(sum(expected), abs=1e-3)


def test_encoder_plain_errors(mlm):
    folder, _, _ = mlm
    h = backend.load(str(folder))
    with pytest.raises(GenerationError, match=r"no \[MASK\]"):
        h.fill_mask("no mask in this text")
    with pytest.raises(GenerationError, match="top_k"):
        h.fill_mask("a [MASK] here", top_k=0)
    with pytest.raises(GenerationError, match="encoder"):
        h.generate("Once upon a time", max_new_tokens=4)
    with pytest.raises(GenerationError, match="encoder"):
        h.generate([{"role": "user", "content": "hi"}], max_new_tokens=4)
    with pytest.raises(GenerationError, match="exceed|at most"):
        h.fill_mask("[MASK] " + "word " * 100)


def test_unsupported_bert_heads_and_activations_are_refused(mlm, tmp_path):
    folder, _, tok = mlm
    from backend.errors import UnsupportedModelError

    hf = json.loads((folder / "config.json").read_text())
    for change, message in (({"architectures": ["BertForQuestionAnswering"]}, "not supported"),
                            ({"hidden_act": "relu"}, "activation"),
                            ({"position_embedding_type": "relative_key"}, "absolute")):
        (tmp_path / "config.json").write_text(json.dumps({**hf, **change}))
        (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        tok.save_pretrained(tmp_path)
        with pytest.raises(UnsupportedModelError, match=message):
            backend.load(str(tmp_path))


def test_fill_mask_refuses_a_causal_model(tmp_path):
    from .tiny import make_tiny

    make_tiny("llama", tmp_path)
    h = backend.load(str(tmp_path))
    with pytest.raises(FornaxError, match="encoder"):
        h.fill_mask("The [MASK] is", top_k=3)


def test_fill_mask_command_line(mlm, capsys):
    from backend.__main__ import main

    folder, _, _ = mlm
    h = backend.load(str(folder))
    expected = h.fill_mask("The [MASK] of France is [MASK].", top_k=3)
    assert main(["fill-mask", "--model", str(folder), "--text", "The [MASK] of France is [MASK].", "--top-k", "3"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[MASK]")]
    assert len(lines) == 2
    for line, row in zip(lines, expected):
        assert line.split(": ", 1)[1].split()[::2] == [c["token"] for c in row]
    assert main(["fill-mask", "--model", str(folder), "--text", "no mask here"]) == 2
    assert "no [MASK]" in capsys.readouterr().err
    assert main(["fill-mask", "--model", str(folder), "--text", SENTENCES[0], "--pll"]) == 0
    assert "pseudo-perplexity" in capsys.readouterr().out


def test_trained_wordpiece_ids_equal_bert_tokenizer_fast_on_its_vocab():
    from transformers import BertTokenizerFast

    from backend.training.mlm import train_wordpiece

    ours = train_wordpiece(corpus_text()[:100_000], 500)
    vocab = ours.tk.get_vocab()
    theirs = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    for text in SENTENCES + ["Ünïcödé accents and CAPITALS, [MASK] too", "def f(x): return x ** 2"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text


def test_dynamic_masking_is_15_percent_80_10_10():
    from backend.data.sequences import IGNORE
    from backend.training.mlm import mask_tokens

    g = torch.Generator().manual_seed(0)
    V, mask_id, specials = 1000, 4, [0, 2, 3]
    ids = torch.randint(5, V, (64, 512), generator=g)
    ids[:, 0], ids[:, -1], ids[:8, -40:] = 2, 3, 0                   # [CLS] ... [SEP], some [PAD]
    inputs, labels = mask_tokens(ids, mask_id, V, specials, g)
    chosen = labels != IGNORE
    ordinary = ~torch.isin(ids, torch.tensor(specials))
    assert not (chosen & ~ordinary).any()                             # specials are never chosen
    assert (labels[chosen] == ids[chosen]).all()
    assert chosen.sum().item() / ordinary.sum().item() == pytest.approx(0.15, abs=0.01)
    n = chosen.sum().item()
    as_mask = (inputs[chosen] == mask_id).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / V, abs=0.02)              # 10 % kept (+ random draws of the same id)
    assert 1 - as_mask - kept == pytest.approx(0.1, abs=0.02)
    assert (inputs[~chosen] == ids[~chosen]).all()



def test_tiny_bert_pretrains_through_the_loop_and_beats_the_unigram_baseline(tmp_path):
    """--mode pretrain --preset tiny-bert: WordPiece trained on the text, dynamic masking, and on held-out masked
    tokens the model beats the unigram-frequency baseline on both counts: accuracy above always guessing the most
    frequent training token, and masked-LM loss below the cross-entropy of the training tokens' frequencies (masking
    picks ordinary tokens uniformly, so that is the unigram model's expected loss on the masked ones)."""
    import math
    from collections import Counter

    from backend.__main__ import main
    from backend.formats.tokenizer import Tokenizer
    from backend.data.records import read_records
    from backend.training.data import build_data
    from backend.training.mlm import SPECIALS

    data = tmp_path / "docs.txt"
    data.write_text(corpus_text()[:60000])
    out = tmp_path / "bert"
    assert main(["finetune", "--mode", "pretrain", "--preset", "tiny-bert", "--data", str(data), "--out", str(out),
                 "--steps", "300", "--batch-size", "32", "--seq-len", "64", "--lr", "3e-3", "--warmup-steps", "30",
                 "--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--vocab-size", "300"]) == 0
    report = json.loads((out / "training.json").read_text())
    (_, first, _), (_, last, _) = report["val_loss"][0], report["val_loss"][-1]
    accuracy = report["metrics"]["masked_accuracy"]
    tokenizer = Tokenizer.from_folder(out)
    blocks = build_data(read_records(str(data), "lm"), tokenizer, 64, 0.1, 0)
    specials = {tokenizer.token_to_id(t) for t in SPECIALS}

    def ordinary(seqs):
        return [t for i in range(len(seqs)) for t in seqs.batch([i])[0][0].tolist() if t not in specials]
    train, val = ordinary(blocks.train), ordinary(blocks.val)
    counts, V = Counter(train), tokenizer.vocab_size
    top, _ = counts.most_common(1)[0]
    top_share = val.count(top) / len(val)
    unigram = -sum(math.log((counts[t] + 1) / (len(train) + V)) for t in val) / len(val)
    print(f"tiny-bert: val masked-LM loss {first:.3f} -> {last:.3f} (unigram {unigram:.3f}), masked-token accuracy "
          f"{accuracy:.3f} (most frequent token {top_share:.3f})")
    assert accuracy > 1.5 * top_share and accuracy > top_share + 0.03
    assert last < unigram - 0.2
    h = backend.load(str(out))
    assert h.config.family == "bert" and h.tokenizer.encode("def")[0] == tokenizer.token_to_id("[CLS]")
    assert len(h.fill_mask("The [MASK] statement is used to", top_k=3)[0]) == 3
