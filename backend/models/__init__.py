"""The model families: the causal Transformer (GPT-2, Llama), the BERT-style encoder, the LSTM baseline, and the
reference ops. Each family is one `Family` record (family.py); `family(cfg)` finds it."""
from __future__ import annotations

from typing import Union

from .encoder import ENCODER, Encoder
from .family import Family
from .lstm import LSTM, LSTMLM
from .transformer import Transformer
from .transformer_hf import GPT2, LLAMA

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, LLAMA, ENCODER, LSTM)}
LanguageModel = Union[Transformer, Encoder, LSTMLM]   # what a ModelHandle holds when it has PyTorch weights


def family(of) -> Family:
    """The Family of a ModelConfig, of anything with a `.config`, or of a family name."""
    name = of if isinstance(of, str) else getattr(getattr(of, "config", of), "family", None)
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"no model family {name!r}; Fornax runs {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "LanguageModel", "family", "Transformer", "Encoder", "LSTMLM"]
