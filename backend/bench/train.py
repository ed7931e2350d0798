"""Training benchmark: our loop against transformers' Trainer on the same model, data and hyper-parameters.

    python -m backend bench-train [--steps 30] [--threads 2] [--preset small-llama] [--seq-len 256] [--batch-size 8]
                                  [--csv F]

A randomly initialised preset model with a byte-level BPE tokenizer trained on the benchmark text is saved once as an
HF folder; then each engine fully finetunes it in its own process (so each gets a clean peak-RSS figure): AdamW
(weight decay 0.1, betas 0.9/0.95), warm-up + cosine, grad-norm clip 1.0, fp32 on the CPU, the same packed blocks of
seq_len tokens. Throughput is training tokens over the time spent in training steps (no evaluation, no saving);
the engines run alternately `repeats` times and the best run of each is kept.
"""
from __future__ import annotations

import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import append_csv, bench_text, peak_rss_mb, run_child

LR, WARMUP = 1e-3, 3


def prepare(folder: Path, preset: str) -> Path:
    """Save the benchmark model (random init) and corpus into folder; returns the corpus path."""
    from ..models.config import ModelConfig
    from ..loading import save_pretrained
    from ..models.transformer import Transformer
    from ..training.bpe import train_tokenizer

    text = bench_text()
    cfg = ModelConfig.from_name(preset)
    tokenizer = train_tokenizer(text, min(cfg.vocab_size, 4096))
    cfg.vocab_size = tokenizer.vocab_size
    cfg.eos_token_ids = [tokenizer.token_to_id(tokenizer.eos_token)]
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    save_pretrained(model, tokenizer, folder / "model")
    (folder / "corpus.txt").write_text(text)
    return folder / "corpus.txt"


def measure_ours(folder: Path, steps: int, seq_len: int, batch_size: int) -> dict:
    from ..training import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=str(folder / "corpus.txt"), out=str(Path(tmp) / "out"), mode="full",
                          model=str(folder / "model"), steps=steps, lr=LR, warmup_steps=WARMUP, batch_size=batch_size,
                          seq_len=seq_len, eval_every=0, sample_every=0, save_every=0, val_fraction=0.0, device="cpu")
        state = train(cfg)
    losses = [loss for _, loss in state["train_loss"]]
    return dict(tokens_per_s=state["tokens_per_s"], mean_loss=sum(losses) / len(losses), params=state["total_params"])


def measure_transformers(folder: Path, steps: int, seq_len: int, batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from ..formats.tokenizer import Tokenizer
    from ..data.records import read_records
    from ..training.data import build_data

    tokenizer = Tokenizer.from_folder(folder / "model")
    data = build_data(read_records(folder / "corpus.txt"), tokenizer, seq_len, 0.0, 0)  # the same blocks as ours
    rows = [{"input_ids": ids[:seq_len], "labels": ids[:seq_len]} for ids in data.train.ids]  # seq_len tokens in
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)

    class Clock(TrainerCallback):
        start = end = None
        losses: list = []

        def on_step_begin(self, args, state, control, **kw):
            Clock.start = Clock.start or time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            Clock.end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                Clock.losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=LR,
            lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
            max_grad_norm=1.0, logging_steps=steps, save_strategy="no", eval_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()]).train()
    return dict(tokens_per_s=steps * batch_size * seq_len / (Clock.end - Clock.start),
                mean_loss=Clock.losses[-1] if Clock.losses else float("nan"),  # logged once: the mean of all steps
                params=sum(p.numel() for p in model.parameters()))


def run_bench_train(steps: int = 30, threads: int = 2, preset: str = "small-llama", seq_len: int = 256,
                    batch_size: int = 8, csv_path: str | None = None, repeats: int = 2) -> dict:
    """Each engine in its own process, one after the other, on the same prepared folder."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, preset)
        print(f"{preset} full finetuning · {steps} steps · batch {batch_size} x {seq_len} tokens · fp32 · {threads} "
              f"threads · each engine in its own process, {repeats} alternated runs, best kept", file=sys.stderr)
        for _ in range(repeats):  # alternated, best of each: a busy machine slows whichever runs then
            for engine in ("fornax", "transformers"):
                r = run_child("backend.bench.train:measure_one",
                              [engine, str(folder), steps, seq_len, batch_size, threads], threads)
                if r is not None and (engine not in results or r["tokens_per_s"] > results[engine]["tokens_per_s"]):
                    results[engine] = r
    print(f"{'engine':14s} {'params':>10s} {'tokens/s':>10s} {'s/step':>8s} {'mean loss':>9s} {'peak RSS MB':>12s}")
    for name, r in results.items():
        r["s_per_step"] = batch_size * seq_len / r["tokens_per_s"]
        print(f"{name:14s} {r['params']:10,d} {r['tokens_per_s']:10.0f} {r['s_per_step']:8.3f} {r['mean_loss']:9.3f} "
              f"{r['peak_rss_mb']:12.0f}")
    if len(results) == 2:
        ours, theirs = results["fornax"], results["transformers"]
        print(f"fornax / transformers: tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, "
              f"peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x")
    if csv_path:
        append_csv(csv_path, ["date", "preset", "engine", "metric", "value", "threads", "steps", "batch", "seq_len",
                              "torch"],
                   [[datetime.date.today(), preset, name, metric, round(r[metric], 3), threads, steps, batch_size,
                     seq_len, torch.__version__]
                    for name, r in results.items() for metric in ("tokens_per_s", "peak_rss_mb", "mean_loss")])
    return results


def measure_one(engine: str, folder: str, steps: int, seq_len: int, batch: int, threads: int) -> dict:
    """One engine in this (child) process: tokens/s, mean loss, peak RSS."""
    torch.set_num_threads(threads)
    measure = measure_ours if engine == "fornax" else measure_transformers
    return {**measure(Path(folder), steps, seq_len, batch), "peak_rss_mb": peak_rss_mb()}
