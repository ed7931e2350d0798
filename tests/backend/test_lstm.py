"""The LSTM baseline: parity with a plain nn.Embedding -> nn.LSTM -> nn.Linear model holding the same weights, the
state-as-cache runner under the shared generation loop, save/load, plain errors, and learning: an LSTM and a tiny
Transformer pretrained by the same loop on the same text with the same budget both beat the unigram baseline."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn

import backend
from backend.models.config import ModelConfig
from backend.errors import GenerationError, TrainError
from backend.loading import save_pretrained
from backend.models.lstm import LSTMLM, LSTMRunner
from backend.formats.tokenizer import Tokenizer

from .tiny import save_tokenizer
from .train_util import write_text


class Reference(nn.Module):
    """The textbook recurrent LM, written independently of backend/models/lstm.py."""

    def __init__(self, vocab: int, d: int, layers: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, num_layers=layers, batch_first=True)
        self.out = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        return self.out(self.rnn(self.emb(idx))[0])


def _pair(vocab=97, d=36, layers=3, seed=0):
    cfg = ModelConfig(family="lstm", vocab_size=vocab, n_layer=layers, d_model=d, max_seq_len=256)
    torch.manual_seed(seed)
    ours = LSTMLM(cfg)
    ours.init_weights()
    ref = Reference(vocab, d, layers)
    ref.emb.weight.data.copy_(ours.tok_emb.weight)
    ref.rnn.load_state_dict(ours.lstm.state_dict())
    ref.out.weight.data.copy_(ours.lm_head.weight)
    with torch.no_grad():  # make the head's output large enough that a wrong gate order would show
        for m in (ours, ref):
            m.lm_head.weight.mul_(20) if m is ours else m.out.weight.mul_(20)
    return cfg, ours.eval(), ref.eval()


@torch.no_grad()
def test_full_forward_and_stepwise_runner_match_a_plain_lstm():
    cfg, ours, ref = _pair()
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    expected = ref(ids)                                                          # (3, 17, V)
    assert (ours(ids) - expected).abs().max().item() <= 1e-5
    runner = LSTMRunner(ours)
    runner.start(3, 17)
    got = [runner.forward(ids[:, :5], 0)]                                        # a prompt, then one token a step
    got += [runner.forward(ids[:, t:t + 1], t) for t in range(5, 17)]
    assert (torch.stack(got, 1) - expected[:, 4:]).abs().max().item() <= 1e-5
    with pytest.raises(GenerationError, match="in order"):
        runner.forward(ids[:, :1], 3)


def test_saved_lstm_generates_greedily_like_the_reference(tmp_path):
    save_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_folder(tmp_path)
    cfg, ours, ref = _pair(vocab=tokenizer.vocab_size, d=32, layers=2, seed=1)
    save_pretrained(ours, tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "fornax_lstm"
    h = backend.load(str(tmp_path))
    assert h.config.family == "lstm" and isinstance(h.runners["eager"], LSTMRunner)
    prompt = "The for statement"
    result = h.generate(prompt, temperature=0, max_new_tokens=12, ignore_eos=True)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(ref(torch.tensor([ids]))[0, -1].argmax()))
    assert result.completions[0].token_ids == ids[-12:]
    assert (h.logits(torch.tensor([ids])) - ref(torch.tensor([ids]))).abs().max().item() <= 1e-5
    with pytest.raises(GenerationError, match="chat template"):
        h.generate([{"role": "user", "content": "hi"}], max_new_tokens=4)
    with pytest.raises(GenerationError, match="encoder"):
        h.fill_mask("The [MASK] statement")


def _unigram_and_val_loss(out, data_path, seq_len):
    """(validation loss the run reported, unigram cross-entropy on the same validation targets from the training
    targets' frequencies, add-one smoothed)."""
    from backend.data.records import read_records
    from backend.data.sequences import IGNORE
    from backend.training.data import build_data

    tokenizer = Tokenizer.from_folder(out)
    data = build_data(read_records(str(data_path), "lm"), tokenizer, seq_len, 0.1, 0)
    train_targets = [t for i in range(len(data.train)) for t in data.train.batch([i])[1][0].tolist() if t != IGNORE]
    val_targets = [t for i in range(len(data.val)) for t in data.val.batch([i])[1][0].tolist() if t != IGNORE]
    counts, V = Counter(train_targets), tokenizer.vocab_size
    total = len(train_targets) + V
    unigram = -sum(math.log((counts[t] + 1) / total) for t in val_targets) / len(val_targets)
    report = json.loads((out / "training.json").read_text())
    return report["val_loss"][-1][1], unigram


def test_lstm_and_transformer_both_beat_the_unigram_baseline(tmp_path):
    from backend.__main__ import main

    data = write_text(tmp_path / "docs.txt", n_chars=60000)
    losses = {}
    for preset in ("tiny-lstm", "tiny-llama"):
        out = tmp_path / preset
        code = main(["finetune", "--mode", "pretrain", "--data", str(data), "--out", str(out), "--preset", preset,
                     "--steps", "80", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--eval-every", "0",
                     "--sample-every", "0", "--save-every", "0", "--vocab-size", "384"])
        assert code == 0
        losses[preset] = _unigram_and_val_loss(out, data, 64)
        assert backend.load(str(out)).config.family == ("lstm" if preset == "tiny-lstm" else "llama")
    for preset, (val, unigram) in losses.items():
        print(f"{preset}: validation loss {val:.3f} vs unigram {unigram:.3f}")
        assert val < unigram - 0.3, (preset, val, unigram)


def test_lstm_refuses_chat_data_and_lora(tmp_path):
    from backend.training import TrainConfig, train

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": "hello there"}]}) + "\n"
                            for i in range(40)))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "out"), mode="pretrain", preset="tiny-lstm", steps=2,
                      vocab_size=300, seq_len=32)
    with pytest.raises(TrainError, match="LSTM"):
        train(cfg)



def test_bench_train_compare_writes_both_curves_and_the_unigram_baseline(tmp_path):
    """`bench-train --compare` at a toy size: a CSV with each preset's validation curve at the same steps, the
    unigram baseline equal to an independent count on the same blocks, and a PNG."""
    import csv

    from backend.__main__ import main

    data = write_text(tmp_path / "docs.txt", n_chars=8000)
    csv_path, png = tmp_path / "curves.csv", tmp_path / "curves.png"
    assert main(["bench-train", "--compare", "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--seq-len",
                 "32", "--data", str(data), "--csv", str(csv_path), "--png", str(png), "--threads", "1"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    for preset in ("tiny-lstm", "tiny-llama"):
        assert [int(r["step"]) for r in rows if r["preset"] == preset and r["split"] == "val"] == [0, 2, 4]
        assert [int(r["step"]) for r in rows if r["preset"] == preset and r["split"] == "train"] == [1, 2, 3, 4]
    unigram = float(next(r["loss"] for r in rows if r["preset"] == "unigram"))
    from backend.training import TrainConfig, train

    out = tmp_path / "again"  # the same tokenizer (deterministic) to count the unigram baseline independently
    train(TrainConfig(data=str(data), out=str(out), mode="pretrain", preset="tiny-lstm", steps=1, vocab_size=384,
                      seq_len=32, eval_every=0, sample_every=0, save_every=0, device="cpu"))
    assert unigram == pytest.approx(_unigram_and_val_loss(out, data, 32)[1], abs=1e-4)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
