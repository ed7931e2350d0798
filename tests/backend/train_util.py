"""Tiny models and data files for the training tests, all made in the test (nothing read from shared/)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from backend.models.config import ModelConfig
from backend.loading import save_pretrained
from backend.models.transformer import Transformer
from backend.formats.tokenizer import Tokenizer
from backend.training import TrainConfig
from tests.backend.tiny import corpus_text, save_tokenizer

GOOD = "sunny bright happy warm lovely kind gentle sweet calm cheerful".split()
BAD = "gloomy dark sad cold awful cruel harsh bitter angry dreary".split()


def make_base(folder: Path, family: str = "llama", context: int = 128, seed: int = 0) -> Path:
    """A tiny randomly initialised model saved as an HF folder (ChatML tokenizer trained on the Python docs)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    tokenizer = Tokenizer.from_folder(folder)
    cfg = ModelConfig.from_name(f"tiny-{family}")
    cfg.vocab_size, cfg.max_seq_len, cfg.eos_token_ids = tokenizer.vocab_size, context, [2]
    cfg.name = f"tiny-{family}-test"
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    save_pretrained(model, tokenizer, folder)
    return folder


def write_text(path: Path, n_chars: int = 20000, offset: int = 0) -> Path:
    path.write_text(corpus_text()[offset:offset + n_chars])
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_rows(n: int, seed: int = 0) -> list[dict]:
    """Four words from one mood list with two neutral words mixed in; the label is the mood."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "good" if i % 2 else "bad"
        words = rng.sample(GOOD if label == "good" else BAD, 4) + rng.sample(["the", "a", "day", "was"], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def chats(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7 + 2, i % 5 + 1
        rows.append({"messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."}]})
    return rows


def quick(data: Path, out: Path, **kw) -> TrainConfig:
    """A small, fast configuration: no periodic evaluation, samples or checkpoints unless asked for."""
    base = dict(data=str(data), out=str(out), steps=10, seq_len=32, batch_size=8, eval_every=0, sample_every=0,
                save_every=0, device="cpu", val_fraction=0.1, sample_tokens=8)
    base.update(kw)
    return TrainConfig(**base)
