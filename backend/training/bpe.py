"""A byte-level BPE tokenizer trained on the user's corpus, for pretraining from scratch.

Byte-level (GPT-2's byte alphabet as the 256 base symbols) so any text encodes, nothing is ever unknown, and decoding
is lossless. It ships ChatML control tokens and a ChatML template, so a model pretrained here can later be
chat-finetuned and chatted with in the playground without changing its vocabulary.
"""
from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import TrainError
from ..formats.tokenizer import Tokenizer

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [EOS, IM_START, IM_END]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHUNK = 4096  # characters per training "sentence": tokenizers' trainer counts words per chunk in parallel


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on `text` up to `vocab_size` tokens (fewer if the text has no more merges to learn)."""
    if vocab_size < 256 + len(SPECIALS):
        raise TrainError(f"vocab_size must be at least {256 + len(SPECIALS)} (256 bytes + special tokens)")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator((text[i:i + CHUNK] for i in range(0, len(text), CHUNK)), trainer)
    return Tokenizer(tk, bos_token=None, eos_token=EOS, chat_template=CHATML)
