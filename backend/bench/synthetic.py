"""Synthetic GGUF models at real sizes, for racing speed where no real checkpoint is on the disk.

    python -m backend race --scale 360m|1b ...     (the file is built once, then cached)

A synthetic model has a real model's shape (SmolLM2-360M, or Llama-3.2-1B's with SmolLM2's vocabulary), random
weights, and the default model's file layout: Q4_1 matmuls, a Q8_0 embedding (tied to the output layer), F32 norms,
quantized by gguf's own quantizer, with the default file's tokenizer. Its weights mean nothing, so neither does its
text or fidelity; what it measures is bytes moved and time per token at that size.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from ..disk.caches import cache_root
from ..errors import FornaxError
from ..loading import default_gguf_path
from ..models.config import ModelConfig

SCALES = {"360m": "smollm2-360m", "1b": "llama-3.2-1b"}   # --scale -> the ModelConfig preset whose shape it has
MATMULS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def scale_config(scale: str) -> ModelConfig:
    """The shape of a --scale: its preset with SmolLM2's vocabulary (the tokenizer the synthetic file carries)."""
    if scale not in SCALES:
        raise FornaxError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    base = ModelConfig.from_name(SCALES[scale])
    return dataclasses.replace(base, vocab_size=ModelConfig.from_name("smollm2-135m").vocab_size,
                               name=f"synthetic-{scale}", max_seq_len=min(base.max_seq_len, 8192))


def synthetic_gguf(scale: str, folder: str | Path | None = None, seed: int = 0) -> Path:
    """The synthetic model of `scale` as a GGUF file under `folder` (default: the Fornax cache), built if absent."""
    cfg = scale_config(scale)
    folder = Path(folder) if folder is not None else cache_root() / "synthetic"
    path = folder / f"synthetic-{scale}-seed{seed}.Q4_1.gguf"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[synthetic] writing {path.name}: {cfg.n_params / 1e6:,.0f} M random parameters, Q4_1 (once; cached)",
              file=sys.stderr)
        write_synthetic_gguf(cfg, path, seed)
    return path


def write_synthetic_gguf(cfg: ModelConfig, path: Path, seed: int = 0) -> None:
    """Write `cfg` with random weights as a llama GGUF, laid out as the default model's file is; atomically."""
    import gguf

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    _copy_tokenizer(writer)
    writer.add_name(cfg.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    def weight(rows: int, cols: int) -> np.ndarray:  # (out, in), scaled as an initialisation would be
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (cols ** -0.5)).astype(np.float32)

    d, hd = cfg.d_model, cfg.head_dim
    shapes = {"attn_q": (cfg.n_head * hd, d), "attn_k": (cfg.n_kv_head * hd, d), "attn_v": (cfg.n_kv_head * hd, d),
              "attn_output": (d, cfg.n_head * hd), "ffn_gate": (cfg.d_ff, d), "ffn_up": (cfg.d_ff, d),
              "ffn_down": (d, cfg.d_ff)}
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(weight(cfg.vocab_size, d), Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(cfg.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        for name in MATMULS:
            writer.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(weight(*shapes[name]), Q.Q4_1),
                              raw_dtype=Q.Q4_1)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_tokenizer(writer) -> None:
    """Every tokenizer.* key of the default model's file, with its value types."""
    import gguf

    reader = gguf.GGUFReader(default_gguf_path())
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub)
