"""A BERT-style encoder (backend/models/encoder.py) as one ONNX graph in optimum's layout, and its parity report.

Graph (the contract of backend/runners/onnx_encoder_lstm.py; the names optimum's ORTModelForMaskedLM and
ORTModelForSequenceClassification feed and read):
  inputs  input_ids, attention_mask, token_type_ids (B, T) int64, batch and sequence dynamic
  outputs logits (B, T, V) for a masked LM, (B, n_labels) for a classifier
With config.json (model_type "bert", the architecture, id2label) and the tokenizer beside it, the folder loads in
optimum as it is.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from backend.models.encoder import Encoder
from backend.generation.fill_mask import MASK_TOKEN
from backend.runners.onnx_encoder_lstm import ENCODER_INPUTS, ENCODER_OUTPUTS, OnnxEncoderRunner
from backend.formats.tokenizer import Tokenizer

PARITY_TEXTS = 6          # sentences of the fixed text, padded into one batch
MASK_EVERY = 5            # every 5th ordinary token of each sentence becomes [MASK]


class EncoderGraph(torch.nn.Module):
    """The encoder with the three inputs in optimum's order."""

    def __init__(self, model: Encoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids, attention_mask, token_type_ids)


def export_encoder(model: Encoder, path: Path, opset: int) -> None:
    """torch.onnx.export (TorchScript exporter) with dynamic batch and sequence axes."""
    cfg = model.config
    B, T = 2, 5  # example sizes; every axis below is dynamic
    example = (torch.randint(0, cfg.vocab_size, (B, T)), torch.ones(B, T, dtype=torch.long),
               torch.zeros(B, T, dtype=torch.long))
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in ENCODER_INPUTS}
    axes["logits"] = {0: "batch_size"} if model.is_classifier else {0: "batch_size", 1: "sequence_length"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the length check is constant for a traced shape
        torch.onnx.export(EncoderGraph(model), example, str(path), input_names=list(ENCODER_INPUTS),
                          output_names=list(ENCODER_OUTPUTS), dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)


BERT_SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": MASK_TOKEN, "pad_token": "[PAD]",
                 "unk_token": "[UNK]"}


def name_special_tokens(folder: Path, tokenizer: Tokenizer) -> None:
    """Name BERT's special tokens in tokenizer_config.json, so transformers' tokenizer (and its fill-mask pipeline
    over optimum's model) knows its [MASK] and [CLS]."""
    path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update({k: v for k, v in BERT_SPECIALS.items() if tokenizer.token_to_id(v) is not None})
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def parity_batch(tokenizer: Tokenizer, cfg, text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sentences of `text` as one right-padded batch (ids, attention mask) with every MASK_EVERY-th ordinary token
    replaced by [MASK] (when the tokenizer has one); returns ids (B, T), mask (B, T), masked (B, T) bool."""
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) >= 4][:PARITY_TEXTS]
    rows = [tokenizer.encode(s)[:cfg.max_seq_len] for s in sentences]
    T = max(len(r) for r in rows)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attention[i, :len(r)] = torch.tensor(r), 1
    mask_id, special = tokenizer.token_to_id(MASK_TOKEN), set(tokenizer.special_ids)
    masked = torch.zeros_like(ids, dtype=torch.bool)
    if mask_id is not None:
        for i, r in enumerate(rows):
            ordinary = [t for t, tok in enumerate(r) if tok not in special]
            masked[i, ordinary[MASK_EVERY - 1::MASK_EVERY]] = True
        ids[masked] = mask_id
    return ids, attention, masked


@torch.inference_mode()
def verify_encoder(folder: Path, model: Encoder, tokenizer: Tokenizer, text: str) -> dict:
    """Eager vs the export on a padded batch of fixed sentences: max |logit diff| over the real tokens (or per
    sentence for a classifier), top-1 agreement on the masked positions, and a classifier's predicted labels."""
    runner = OnnxEncoderRunner(Path(folder) / "model.onnx", model.config)
    ids, attention, masked = parity_batch(tokenizer, model.config, text)
    ref, got = model(ids, attention).float(), runner.full_logits(ids, attention).float()
    report = {"kind": "encoder", "sentences": ids.shape[0], "tokens": int(attention.sum()),
              "padded_positions": int((attention == 0).sum())}
    if model.is_classifier:                                                  # (B, n_labels)
        labels = model.config.labels
        eager, onnx = [labels[i] for i in ref.argmax(-1).tolist()], [labels[i] for i in got.argmax(-1).tolist()]
        return {**report, "head": "classify", "max_abs_logit_diff": (ref - got).abs().max().item(),
                "labels_eager": eager, "labels_onnx": onnx,
                "label_agreement": sum(a == b for a, b in zip(eager, onnx)) / len(eager)}
    real = attention.bool()                                                  # (B, T): padding's logits are unused
    where = masked if masked.any() else real
    return {**report, "head": "masked-lm", "max_abs_logit_diff": (ref - got).abs()[real].max().item(),
            "masked_positions": int(masked.sum()),
            "top1_agreement": (ref.argmax(-1) == got.argmax(-1))[where].float().mean().item()}
