"""Masked-language-model pieces for pretraining an encoder (the loop does not call them yet): a WordPiece tokenizer
trained by `tokenizers` the way BERT's is built, and BERT's dynamic masking (15 % of the ordinary tokens are chosen;
of those 80 % become [MASK], 10 % a random token, 10 % stay; the loss is on the chosen ones only)."""
from __future__ import annotations

import torch

from ..tokenizer import Tokenizer
from .data import IGNORE

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(corpus: str, vocab_size: int, lowercase: bool = True) -> Tokenizer:
    """A BERT WordPiece tokenizer (BertNormalizer, BertPreTokenizer, [CLS] text [SEP]) trained on `corpus`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    tk = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
    tk.train_from_iterator([corpus[i:i + 4000] for i in range(0, len(corpus), 4000)], trainer)
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return Tokenizer(tk, extra_special={"unk_token": "[UNK]", "pad_token": "[PAD]"})


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids: list[int], generator: torch.Generator,
                rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) -> (inputs (B, T), labels (B, T)): labels hold the original id where a token was chosen, IGNORE
    elsewhere. Special tokens ([CLS], [SEP], [PAD]) are never chosen."""
    can = ~torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype))
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & can                       # (B, T)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id                                                  # 80 %: [MASK]
    random_pos = chosen & (roll >= 0.8) & (roll < 0.9)                                       # 10 %: a random token
    inputs[random_pos] = torch.randint(0, vocab_size, ids.shape, generator=generator)[random_pos]
    return inputs, labels                                                                    # 10 %: unchanged
