"""Tiny random models saved the way transformers saves them, for parity tests against transformers itself."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_text() -> str:
    """English prose that ships with Python: the pydoc topic help texts."""
    from pydoc_data.topics import topics

    return "\n".join(topics.values())


@lru_cache(maxsize=None)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = corpus_text()
    tk.train_from_iterator([text[i:i + 2000] for i in range(0, 400_000, 2000)], trainer)
    return tk.to_str()


def save_tokenizer(folder: Path, vocab_size: int = 384) -> int:
    (folder / "tokenizer.json").write_text(_trained_tokenizer_json(vocab_size))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "chat_template": CHATML}))
    return vocab_size


def make_tiny(kind: str, folder: Path, seed: int = 0):
    """Save a tiny random transformers model of `kind` into folder; returns the transformers model (fp32, eval)."""
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=None, eos_token_id=2, initializer_range=0.08)
    if kind.startswith("gpt2"):
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=kind == "gpt2",
                            **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind in ("llama", "llama-untied", "llama3-rope"):
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0} if kind == "llama3-rope" else None
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                             tie_word_embeddings=kind != "llama-untied", **common,
                             **({"rope_parameters": rope} if rope else {}))
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: perturb them so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name or ".ln_" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(folder)
    return model.eval()
