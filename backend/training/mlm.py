"""Masked-language-model pieces for pretraining an encoder (used by the training loop for a "bert" preset): a WordPiece tokenizer
trained by `tokenizers` the way BERT's is built, BERT's dynamic masking (15 % of the ordinary tokens are chosen;
of those 80 % become [MASK], 10 % a random token, 10 % stay; the loss is on the chosen ones only), and
validation: masked-LM loss and masked-token accuracy on a fixed masking of the validation blocks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..tokenizer import Tokenizer
from .data import IGNORE, MAX_VAL_SEQUENCES, Sequences

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


class MLM:
    """What the loop needs to pretrain an encoder: a fresh masking per micro-batch (seeded by the run's seed and the
    step, so a resumed run masks the same way) and the validation score."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, seed: int):
        self.mask_id = tokenizer.token_to_id("[MASK]")
        self.specials = [i for i in (tokenizer.token_to_id(t) for t in SPECIALS) if i is not None]
        self.vocab_size, self.seed = vocab_size, seed

    def mask(self, x: torch.Tensor, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
        return mask_tokens(x, self.mask_id, self.vocab_size, self.specials, g)

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, seqs: Sequences, batch_size: int, device: torch.device
                 ) -> tuple[float, float, float]:
        """(mean loss per masked token, its perplexity, masked-token accuracy) on a fixed masking of `seqs`."""
        was_training = module.training
        module.eval()
        total = correct = count = 0
        n = min(len(seqs), MAX_VAL_SEQUENCES)
        for i in range(0, n, batch_size):
            x, _ = seqs.batch(list(range(i, min(n, i + batch_size))))
            inputs, labels = self.mask(x, -1 - i)              # the same masking at every evaluation
            logits = module(inputs.to(device)).float()                                   # (B, T, V)
            labels = labels.to(device)
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                     reduction="sum").item()
            chosen = labels != IGNORE
            correct += int((logits.argmax(-1)[chosen] == labels[chosen]).sum())
            count += int(chosen.sum())
        module.train(was_training)
        loss = total / max(1, count)
        return loss, math.exp(min(loss, 50.0)), correct / max(1, count)
