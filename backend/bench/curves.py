"""LSTM vs Transformer on the same text with the same budget: both validation-loss curves, and the unigram baseline.

    python -m backend bench-train --compare [--compare-presets tiny-lstm,tiny-llama] [--steps 200] [--seq-len 64]
                                  [--batch-size 8] [--lr 3e-3] [--data FILE] [--csv F] [--png F]

Each preset is pretrained from scratch by the same training loop (backend/training) on the same text (default:
60 kB of Python's own docs, pydoc_data.topics), with the same byte-level BPE vocabulary, the same blocks, batches,
steps, learning rate and schedule; validation loss every `eval_every` steps. The unigram baseline is the
cross-entropy of the training targets' token frequencies (add-one smoothed) on the same validation targets: a model
below it has learned something about context. Writes a tidy CSV (preset, step, split, loss) and a PNG of the curves.
"""
from __future__ import annotations

import csv
import math
import sys
import tempfile
from collections import Counter
from pathlib import Path

DEFAULT_PRESETS = ("tiny-lstm", "tiny-llama")


def unigram_cross_entropy(data, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of the training targets' add-one-smoothed frequencies on the validation
    targets of a packed Data (training/data.py)."""
    from ..data.sequences import IGNORE

    def targets(seqs):
        return [t for i in range(len(seqs)) for t in seqs.batch([i])[1][0].tolist() if t != IGNORE]
    train, val = targets(data.train), targets(data.val)
    counts, total = Counter(train), len(train) + vocab_size
    return -sum(math.log((counts[t] + 1) / total) for t in val) / len(val)


def run_curves(presets=DEFAULT_PRESETS, steps: int = 200, seq_len: int = 64, batch_size: int = 8, lr: float = 3e-3,
               vocab_size: int = 384, eval_every: int = 10, data: str | None = None, csv_path: str | None = None,
               png_path: str | None = None, threads: int | None = None) -> dict:
    """Train each preset in this process, one after the other; returns {preset: {"val": [[step, loss]], "train":
    [[step, loss]], "params", "tokens_per_s", "seconds"}, "unigram": loss}."""
    import torch

    from ..formats.tokenizer import Tokenizer
    from ..training import TrainConfig, train
    from ..data.records import read_records
    from ..training.data import build_data

    if threads:
        torch.set_num_threads(threads)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            from pydoc_data.topics import topics

            data = str(Path(tmp) / "pydoc.txt")
            Path(data).write_text("\n".join(topics.values())[:60000])
        for preset in presets:
            out = Path(tmp) / preset
            cfg = TrainConfig(data=data, out=str(out), mode="pretrain", preset=preset, steps=steps, lr=lr,
                              batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, eval_every=eval_every,
                              sample_every=0, save_every=0, device="cpu")
            state = train(cfg)
            results[preset] = {"val": [[s, loss] for s, loss, _ in state["val_loss"]], "train": state["train_loss"],
                               "params": state["total_params"], "tokens_per_s": state["tokens_per_s"]}
            if "unigram" not in results:  # every preset trains the same BPE on the same text: one baseline
                packed = build_data(read_records(data, "lm"), Tokenizer.from_folder(out), seq_len, 0.1, 0)
                results["unigram"] = unigram_cross_entropy(packed, Tokenizer.from_folder(out).vocab_size)
    print(f"same text, vocabulary, {steps} steps of {batch_size} x {seq_len} tokens, lr {lr}; unigram baseline "
          f"{results['unigram']:.3f}", file=sys.stderr)
    for preset in presets:
        r = results[preset]
        print(f"{preset:12s} {r['params']:>10,d} params  final val loss {r['val'][-1][1]:.3f}  "
              f"{r['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["preset", "step", "split", "loss"])
            for preset in presets:
                for split in ("val", "train"):
                    w.writerows([preset, s, split, round(loss, 4)] for s, loss in results[preset][split])
            w.writerow(["unigram", 0, "val", round(results["unigram"], 4)])
    if png_path:
        plot(results, presets, png_path, f"{steps} steps × {batch_size} × {seq_len} tokens, lr {lr}")
    return results


def plot(results: dict, presets, png_path: str, subtitle: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for preset in presets:
        r = results[preset]
        steps, losses = zip(*r["val"])
        ax.plot(steps, losses, marker=".", label=f"{preset} ({r['params'] / 1e6:.2f} M params)")
    ax.axhline(results["unigram"], color="grey", linestyle="--", label="unigram baseline")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"LSTM vs Transformer, same text and budget\n{subtitle}", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
