"""LoRA on our Transformer through `peft`: adapters on chosen projections, merged back for saving.

Our Linear subclasses nn.Linear, so peft wraps it like any other: W x + (alpha / r) * B A x with A (r, in) and
B (out, r), B zero at the start (the adapted model begins exactly as the base model). Targets are our module names:
attn.qkv and attn.proj (attention), mlp.gate_up (Llama) or mlp.up (GPT-2), and mlp.down.
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import TrainError
from ..models.transformer import Transformer

TARGETS = ("attn.qkv", "attn.q", "attn.k", "attn.v", "attn.proj", "mlp.gate_up", "mlp.up", "mlp.down", "up", "down")
ENCODER_HEAD = ("pooler", "classifier")  # an encoder classifier's head: new for the task, so it trains whole


def model_targets(model: Transformer) -> list[str]:
    """The projection names this model has (gate_up for Llama, up for GPT-2; q k v proj up down for an encoder)."""
    names = {name.split(".", 2)[2] for name, m in model.named_modules()
             if name.startswith("blocks.") and isinstance(m, nn.Linear)}
    return [t for t in TARGETS if t in names]


def add_lora(model: Transformer, r: int, alpha: float, dropout: float = 0.0, targets: list[str] | None = None):
    """A peft model over `model` with LoRA adapters on `targets` (default: every projection); only the adapters
    train. Returns the PeftModel (its forward is the model's forward)."""
    from peft import LoraConfig, get_peft_model

    have = model_targets(model)
    targets = list(targets) if targets else have
    unknown = [t for t in targets if t not in have]
    if unknown:
        raise TrainError(f"LoRA target(s) {', '.join(unknown)} are not in this {model.config.family} model; "
                         f"its projections are {', '.join(have)}")
    head = list(ENCODER_HEAD) if getattr(model.config, "labels", None) else None  # peft trains a copy of these
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        modules_to_save=head)
    return get_peft_model(model, config)


def merge_lora(peft_model) -> Transformer:
    """Fold every adapter into its base weight (W + alpha/r * B A) and return our plain Transformer."""
    model = peft_model.merge_and_unload()  # (a modules_to_save head is swapped for its trained copy)
    if model.config.tie_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.tok_emb.weight
    return model

