"""What a training run reports besides its training loss: validation loss and perplexity, classification accuracy
and macro-F1, and samples from fixed prompts.

This is the training loop's own evaluation (of the module being trained, on its held-out split, in train/eval mode
around each pass), so it lives with the loop; the label-words scoring and the classification counts it shares with
an evaluation are backend/data's (labels.py, counts.py)."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..data.counts import classification_report
from ..data.labels import label_scores
from ..data.sequences import IGNORE, EncoderExamples, Sequences
from ..formats.tokenizer import Tokenizer
from ..models.transformer import Transformer
from .data import MAX_VAL_SEQUENCES


def autocast(device: torch.device):
    """bf16 autocast on CUDA; the CPU stays fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(module: torch.nn.Module, seqs: Sequences, batch_size: int, device: torch.device
                  ) -> tuple[float, float]:
    """Mean loss per target token over (at most MAX_VAL_SEQUENCES of) `seqs`, and its perplexity."""
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    n = min(len(seqs), MAX_VAL_SEQUENCES)
    for i in range(0, n, batch_size):
        x, y = seqs.batch(list(range(i, min(n, i + batch_size))))
        with autocast(device):
            logits = module(x.to(device))                                        # (B, T, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((y != IGNORE).sum())
    module.train(was_training)
    loss = total / max(1, count)
    return loss, math.exp(min(loss, 50.0))


@torch.no_grad()
def evaluate_classify(module: torch.nn.Module, tokenizer: Tokenizer, records: list[tuple[str, str]],
                      labels: list[str], seq_len: int, device: torch.device, batch_rows: int = 8) -> dict:
    """Accuracy and macro-F1 on labelled rows: each row is given the label whose tokens (and the end-of-sequence
    after them) have the highest total log-probability after its prompt.

    Why a label word from the LM rather than a new classification head: the finetuned model stays a plain causal LM
    that loads, chats and exports like any other (no extra head to save), the label is readable in its samples, and
    ranking only the known labels means every prediction is a valid label, so accuracy is against a clear chance
    level (the majority label's share, reported as `majority_baseline`)."""
    was_training = module.training
    module.eval()

    def logits_fn(x):
        with autocast(device):
            return module(x.to(device))                                          # (B, T, V)
    try:
        scores = label_scores(logits_fn, tokenizer, [text for text, _ in records], labels, seq_len, batch_rows)
    finally:
        module.train(was_training)
    pred = [labels[k] for k in scores.argmax(-1).tolist()]
    report = classification_report(pred, [label for _, label in records], labels)
    return {k: report[k] for k in ("accuracy", "macro_f1", "majority_baseline", "n")}


@torch.no_grad()
def evaluate_encoder_classify(module: torch.nn.Module, val: EncoderExamples, labels: list[str], batch_size: int,
                              device: torch.device, pad_id: int = 0, max_rows: int = 200) -> tuple[dict, float]:
    """An encoder classifier's head on (at most max_rows of) its validation examples (encoder_classify.py):
    (accuracy, macro-F1, majority_baseline and n from classification_report; the mean cross-entropy)."""
    was_training = module.training
    module.eval()
    predicted, loss, n = [], 0.0, min(len(val), max_rows)
    try:
        for i in range(0, n, batch_size):
            batch = val.batch(list(range(i, min(n, i + batch_size))), pad_id)
            with autocast(device):
                logits = module(batch.ids.to(device), batch.attention_mask.to(device)).float()   # (B, n_labels)
            loss += F.cross_entropy(logits, batch.labels.to(device), reduction="sum").item()
            predicted += logits.argmax(-1).tolist()
    finally:
        module.train(was_training)
    report = classification_report([labels[k] for k in predicted], [labels[k] for k in val.labels[:n]], labels)
    return {k: report[k] for k in ("accuracy", "macro_f1", "majority_baseline", "n")}, loss / max(1, n)


def make_samples(model: Transformer, tokenizer: Tokenizer, prompts: list[str], task: str, step: int,
                 max_new_tokens: int, seed: int) -> list[dict]:
    """One seeded sample per prompt from the model as it is now (chat prompts are a user message)."""
    from ..handle import ModelHandle

    was_training = model.training
    model.eval()
    handle = ModelHandle(model, tokenizer, "training")
    out = []
    try:
        for prompt in prompts:
            inp = [{"role": "user", "content": prompt}] if task == "chat" else prompt
            room = model.config.max_seq_len - len(handle.encode(inp)) - 1
            text = handle.generate(inp, max_new_tokens=min(max_new_tokens, room), temperature=0.8, top_p=0.95,
                                   seed=seed).text if room > 0 else "(the prompt fills the context)"
            out.append({"step": step, "prompt": prompt, "text": text})
    finally:
        model.free_cache()
        model.train(was_training)
    return out
