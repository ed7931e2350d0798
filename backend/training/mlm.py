"""Masked-language-model pieces for pretraining an encoder (used by the training loop for a "bert" preset): a
WordPiece tokenizer trained by `tokenizers` the way BERT's is built; BERT's dynamic masking (15 % of the ordinary
tokens are chosen; of those 80 % become [MASK], 10 % a random token, 10 % stay; the loss is on the chosen ones only);
validation masked-LM loss and masked-token accuracy on a fixed masking of the validation blocks; and optionally BERT's
next-sentence prediction on sentence pairs built from the text's own sentence order."""
from __future__ import annotations

import math
import random
import re

import torch
import torch.nn.functional as F

from ..data.records import Records
from ..data.sequences import IGNORE, EncoderExamples
from ..errors import TrainError
from ..formats.tokenizer import Tokenizer
from .data import MAX_VAL_SEQUENCES, Data
from .validation import autocast

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


def split_sentences(text: str) -> list[str]:
    """The text's sentences in order: cut after . ! ? and at blank lines; pieces without a letter are dropped."""
    pieces = (p.strip() for p in re.split(r"(?<=[.!?])\s+|\n\s*\n", text))
    return [p for p in pieces if any(c.isalpha() for c in p)]


def build_nsp(records: Records, tokenizer: Tokenizer, seq_len: int, val_fraction: float, seed: int) -> Data:
    """Sentence pairs for next-sentence prediction, from the text's own order: each sentence A is followed by the
    sentence after it (label 0, "is next") or, half the time, by a random other sentence of the same split (label 1).
    The validation pairs come from the last val_fraction of the sentences. `[CLS] A [SEP] B [SEP]`, token types 0 then
    1, the longer side cut first to fit seq_len."""
    sentences = split_sentences(records.corpus)
    if len(sentences) < 8:
        raise TrainError(f"{records.path.name} has {len(sentences)} sentences; next-sentence prediction needs at "
                         f"least 8 (sentences end with . ! ? or a blank line)")
    ids = [e.ids for e in tokenizer.tk.encode_batch(sentences, add_special_tokens=False)]
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    n_val = max(4, round(len(ids) * val_fraction)) if val_fraction > 0 else 0
    rng = random.Random(seed)

    def pairs(part: list[list[int]]) -> EncoderExamples:
        out = EncoderExamples()
        for i in range(len(part) - 1):
            j = i + 1
            if rng.random() < 0.5:  # any sentence but A and its successor
                j = rng.randrange(len(part) - 2)
                j += 2 if j >= i else 0
            a, b = list(part[i]), list(part[j])
            while len(a) + len(b) > seq_len - 3:          # longest first, as BERT's truncate_seq_pair
                (a if len(a) >= len(b) else b).pop()
            out.add([cls] + a + [sep] + b + [sep], int(j != i + 1), [0] * (len(a) + 2) + [1] * (len(b) + 1))
        return out
    train, val = pairs(ids[:len(ids) - n_val]), pairs(ids[len(ids) - n_val:]) if n_val else EncoderExamples()
    return Data("lm", train, val, [], summary=f"{len(sentences)} sentences -> {len(train)} training + {len(val)} "
                f"validation sentence pairs (half next, half random) of at most {seq_len} tokens")


class MaskedLM:
    """The loop's objective for pretraining an encoder: a fresh masking per micro-batch (seeded by the run's seed
    and the step, so a resumed run masks the same way), the loss on the chosen tokens; with nsp, sentence pairs and
    loss = mean masked-LM loss + mean next-sentence loss. Validation: masked-LM loss and masked-token accuracy on a
    fixed masking; next-sentence accuracy on the unmasked pairs."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, seed: int, nsp: bool = False):
        self.mask_id = tokenizer.token_to_id("[MASK]")
        self.specials = [i for i in (tokenizer.token_to_id(t) for t in SPECIALS) if i is not None]
        self.pad = tokenizer.token_to_id("[PAD]") or 0
        self.vocab_size, self.seed, self.nsp = vocab_size, seed, nsp

    def mask(self, x: torch.Tensor, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
        return mask_tokens(x, self.mask_id, self.vocab_size, self.specials, g)

    def _batch(self, split, index: list[int], salt: int):
        if self.nsp:
            pair = split.batch(index, self.pad)
            return (*self.mask(pair.ids, salt), pair)
        x, _ = split.batch(index)
        return (*self.mask(x, salt), None)

    def batches(self, split, micro: list[list[int]], step: int) -> list:
        return [self._batch(split, idx, step * 1000 + m) for m, idx in enumerate(micro)]

    def counts(self, batch) -> list[float]:
        inputs, labels, pair = batch
        return [int((labels != IGNORE).sum()), 0 if pair is None else len(pair.labels),
                inputs.numel() if pair is None else int(pair.attention_mask.sum())]

    def _forward(self, module, batch, device):
        inputs, labels, pair = batch
        with autocast(device):
            if pair is None:
                return module(inputs.to(device)), None                                   # (B, T, V)
            return module(inputs.to(device), pair.attention_mask.to(device), pair.token_types.to(device), nsp=True)

    def loss(self, module, batch, totals: list[float], device) -> tuple[torch.Tensor, float]:
        logits, nsp_logits = self._forward(module, batch, device)                       # (B, T, V), (B, 2)
        labels = batch[1].to(device)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                               reduction="sum") / max(1.0, totals[0])
        if nsp_logits is not None:
            loss = loss + F.cross_entropy(nsp_logits.float(), batch[2].labels.to(device), reduction="sum") / totals[1]
        return loss, 1.0  # (each term already divided by its global total)

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, seqs, batch_size: int, device: torch.device
                 ) -> tuple[float, float, dict, str]:
        """(mean loss per masked token, its perplexity, {masked_accuracy[, nsp_accuracy]}, a log line)."""
        was_training = module.training
        module.eval()
        total = correct = count = nsp_right = 0
        n = min(len(seqs), MAX_VAL_SEQUENCES)
        try:
            for i in range(0, n, batch_size):
                batch = self._batch(seqs, list(range(i, min(n, i + batch_size))), -1 - i)  # the same masking always
                logits, _ = self._forward(module, batch, device)
                labels = batch[1].to(device)
                total += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                         reduction="sum").item()
                chosen = labels != IGNORE
                correct += int((logits.argmax(-1)[chosen] == labels[chosen]).sum())
                count += int(chosen.sum())
                pair = batch[2]
                if pair is not None:  # is-next judged on the real pair, nothing masked
                    with autocast(device):
                        _, nsp_logits = module(pair.ids.to(device), pair.attention_mask.to(device),
                                               pair.token_types.to(device), nsp=True)     # (B, 2)
                    nsp_right += int((nsp_logits.argmax(-1).cpu() == pair.labels).sum())
        finally:
            module.train(was_training)
        loss = total / max(1, count)
        metrics = {"masked_accuracy": correct / max(1, count)}
        line = f"val masked-LM loss {loss:.4f}, masked-token accuracy {metrics['masked_accuracy']:.3f}"
        if self.nsp:
            metrics["nsp_accuracy"] = nsp_right / max(1, n)
            metrics["nsp_pairs"] = n
            line += f", next-sentence accuracy {metrics['nsp_accuracy']:.3f} on {n} pairs"
        return loss, math.exp(min(loss, 50.0)), metrics, line
