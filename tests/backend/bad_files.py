"""Crafted files for the bad-input catalogue and the fuzz tests: tiny valid GGUF files to mutate, raw GGUF byte
builders (for files `gguf.GGUFWriter` refuses to write), and peak-memory measurement."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import gguf
import numpy as np


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def gguf_kv_array_u8(key: str, count: int) -> bytes:
    """A key whose value is an array of `count` uint8 items, with no items written."""
    return gguf_string(key) + struct.pack("<IIQ", 9, 0, count)


def byte_level_tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_gguf(path: Path, *, vocab: list[str] | None = None, head_count: int = 2, context: int = 64,
              embd_rows: int | None = None, name=None, tokenizer_model: str = "gpt2", scores=None,
              skip_tokens: bool = False, d_model: int = 8) -> Path:
    """A valid tiny Llama GGUF (1 layer, width 8, byte-level vocabulary, F32), or one spoiled by an argument."""
    tokens = vocab if vocab is not None else byte_level_tokens() + ["<|endoftext|>"]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(context)
    w.add_embedding_length(d_model)
    w.add_head_count(head_count)
    w.add_head_count_kv(head_count)
    w.add_feed_forward_length(16)
    w.add_layer_norm_rms_eps(1e-5)
    if name is not None:
        w.add_uint32("general.name", name)  # a name of the wrong type
    w.add_tokenizer_model(tokenizer_model)
    if not skip_tokens:
        w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_eos_token_id(n_vocab - 1)
    rng = np.random.default_rng(0)
    d, f = d_model, 16

    def t(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    w.add_tensor("token_embd.weight", t(embd_rows or n_vocab, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for name_, shape in (("attn_norm", (d,)), ("ffn_norm", (d,)), ("attn_q", (d, d)), ("attn_k", (d, d)),
                         ("attn_v", (d, d)), ("attn_output", (d, d)), ("ffn_gate", (f, d)), ("ffn_up", (f, d)),
                         ("ffn_down", (d, f))):
        w.add_tensor(f"blk.0.{name_}.weight", np.ones(shape, np.float32) if len(shape) == 1 else t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024


def rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024
