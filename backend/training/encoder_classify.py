"""Classification with an encoder's own head: `--task classify` on a BERT folder trains the pooler + classifier
(mode full: everything; mode lora: adapters on the encoder's projections, the head trained whole).

Each labelled row becomes `[CLS] text [SEP]` (cut to seq_len, [SEP] kept) and its label's index; the loss is the
cross-entropy of the class logits (B, n_labels). The validation rows are the ones the causal path (label words,
data.py) holds out — the same stratified split of the same file — so the two are scored on the same rows, by the
same report (backend/data/counts.py: accuracy, macro-F1, the majority label's share).

`encoder_objective` picks an encoder's data and objective (objectives.Objective, as mlm.MaskedLM) for the loop.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F

from ..data.records import Records
from ..data.sequences import EncoderBatch, EncoderExamples
from ..errors import TrainError
from ..formats.tokenizer import Tokenizer
from .data import MAX_VAL_RECORDS, Data, build_data, stratified_val_index
from .validation import autocast, evaluate_encoder_classify

METHOD = "classification head"  # how the encoder path classifies (the causal path: "label words")


def pad_id(tokenizer: Tokenizer, config) -> int:
    found = tokenizer.token_to_id("[PAD]")
    return found if found is not None else (config.pad_token_id or 0)


def encode_single(tokenizer: Tokenizer, text: str, seq_len: int) -> list[int]:
    """[CLS] text [SEP] as the tokenizer builds it, cut to seq_len tokens keeping the final [SEP]."""
    ids = tokenizer.encode(text)
    return ids if len(ids) <= seq_len else ids[:seq_len - 1] + ids[-1:]


def build_classify(records: Records, tokenizer: Tokenizer, labels: list[str], seq_len: int, val_fraction: float,
                   seed: int) -> Data:
    """Labelled rows -> EncoderExamples (train, val) over the model's `labels`."""
    index_of = {label: i for i, label in enumerate(labels)}
    val_index = stratified_val_index(records.items, val_fraction, seed)
    val_set = set(val_index)
    train, val = EncoderExamples(), EncoderExamples()
    for i, (text, label) in enumerate(records.items):
        (val if i in val_set else train).add(encode_single(tokenizer, text, seq_len), index_of[label])
    counts = Counter(label for _, label in records.items)
    return Data("classify", train, val, [], labels=list(labels),
                val_records=[records.items[i] for i in val_index][:MAX_VAL_RECORDS],
                summary=f"{len(records.items)} rows, labels {dict(sorted(counts.items()))} -> {len(train)} training "
                        f"+ {len(val)} validation (encoder: [CLS] text [SEP] -> {METHOD})")


def check_labels(model_labels: list[str], file_labels: list[str], model: str):
    """A classifier folder trains only on the labels it has (the file may use a subset of them)."""
    unknown = sorted(set(file_labels) - set(model_labels))
    if unknown:
        raise TrainError(f"the data has label(s) {', '.join(map(repr, unknown))} that the classifier {model} does not "
                         f"have (its labels: {', '.join(map(repr, model_labels))}); train from its masked-LM "
                         f"checkpoint or relabel the data")


class ClassifyHead:
    """The loop's objective for an encoder classifier: mean cross-entropy over the rows of the global batch."""

    def __init__(self, labels: list[str], pad: int):
        self.labels, self.pad = list(labels), pad

    def batches(self, split: EncoderExamples, micro: list[list[int]], step: int) -> list[EncoderBatch]:
        return [split.batch(idx, self.pad) for idx in micro]

    def counts(self, batch: EncoderBatch) -> list[float]:
        return [len(batch.labels), float(batch.attention_mask.sum())]

    def loss(self, module, batch: EncoderBatch, totals: list[float], device) -> tuple[torch.Tensor, float]:
        with autocast(device):
            logits = module(batch.ids.to(device), batch.attention_mask.to(device))             # (B, n_labels)
        return F.cross_entropy(logits.float(), batch.labels.to(device), reduction="sum") / totals[0], 1.0

    @torch.no_grad()
    def evaluate(self, module, val: EncoderExamples, batch_size: int, device) -> tuple[float, float, dict, str]:
        metrics, loss = evaluate_encoder_classify(module, val, self.labels, batch_size, device, self.pad,
                                                  MAX_VAL_RECORDS)
        line = (f"val loss {loss:.4f}, accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
                f"(majority {metrics['majority_baseline']:.3f})")
        return loss, math.exp(min(loss, 50.0)), {**metrics, "method": METHOD}, line


def encoder_objective(cfg, core, tokenizer: Tokenizer, records: Records, seq_len: int):
    """(data, objective) for an encoder: a classification head on labelled rows, else masked-LM (+ NSP) on text."""
    if core.is_classifier:
        if records.task != "classify":
            raise TrainError("this encoder has a classification head: train it on labelled rows (--task classify, "
                             "a .jsonl with 'text' and 'label' or a .csv)")
        data = build_classify(records, tokenizer, core.config.labels, seq_len, cfg.val_fraction, cfg.seed)
        return data, ClassifyHead(core.config.labels, pad_id(tokenizer, core.config))
    from .mlm import MaskedLM, build_nsp

    if records.task != "lm":
        raise TrainError("pretraining an encoder is masked-LM on plain text; to classify labelled rows, finetune the "
                         "pretrained folder: --mode full|lora --task classify --model FOLDER" if cfg.mode == "pretrain"
                         else f"an encoder with a masked-LM head trains on plain text or labelled rows (--task "
                              f"classify), not {records.task} data")
    if cfg.nsp:
        data = build_nsp(records, tokenizer, seq_len, cfg.val_fraction, cfg.seed)
    else:
        data = build_data(records, tokenizer, seq_len, cfg.val_fraction, cfg.seed)
    return data, MaskedLM(tokenizer, core.config.vocab_size, cfg.seed, nsp=cfg.nsp)
