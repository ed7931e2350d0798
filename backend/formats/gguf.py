"""GGUF files: read with the `gguf` package, dequantize, and convert once into a cached HF-style folder.

The cached folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) is keyed by the
file's SHA-256, so the slow dequantization happens on the first load only; transformers can read it too.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import budget
from ..disk import caches as cache_dir
from ..disk.caches import cache_root
from ..disk.atomic import atomic_folder
from ..models import family
from ..models.config import ModelConfig
from ..errors import FornaxError, ModelLoadError, UnsupportedModelError
from .gguf_check import DEQUANTIZED_BYTES, check_gguf, check_hf_shapes
from .hf import write_hf_folder
from .tokenizer import Tokenizer

CONVERTER_VERSION = 1  # bump when the conversion changes, so stale caches are not reused

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_gguf(path: Path):
    """(metadata dict, reader) for a GGUF file, or a ModelLoadError that says what is wrong with it."""
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path.name} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")
    summary = check_gguf(path)  # every declared count bounded before gguf's reader trusts them
    check_conversion_memory(path, summary)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path.name} is a corrupt or truncated GGUF file: {e}") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ModelLoadError(f"{path.name} is truncated: tensor {t.name} needs bytes up to "
                                 f"{t.data_offset + t.n_bytes:,} but the file has {size:,}")
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # a field the package cannot decode is not one we need
            continue
    return meta, reader


def conversion_parts(summary) -> dict[str, int]:
    """The conversion's peak, from the tensor table alone: every tensor dequantized to fp32 and held until the
    cache is written, plus the largest one's transient copies (dequantized, un-permuted, made contiguous)."""
    largest = summary.largest_tensor * DEQUANTIZED_BYTES
    return {"dequantized fp32 weights": summary.n_params * DEQUANTIZED_BYTES, "conversion copies": 2 * largest}


def check_conversion_memory(path: Path, summary) -> None:
    """Refuse a GGUF whose dequantized tensors would not fit the memory budget, before any is dequantized."""
    parts = conversion_parts(summary)
    budget.check_memory(sum(parts.values()), f"converting {path.name} ({summary.n_params:,} weights once "
                                             f"dequantized)", parts)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF's rotate-half layout)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_state_dict(reader, cfg: ModelConfig, arch: str, progress: Callable | None = None) -> dict:
    import gguf
    from tqdm import tqdm

    hf_name = family(cfg).gguf_tensor
    out = {}
    tensors = reader.tensors
    for n, t in enumerate(tqdm(tensors, desc="dequantizing GGUF", unit="tensor", leave=False)):
        if progress:
            progress(n / len(tensors), f"dequantizing {t.name}")
        name, fix = hf_name(cfg, arch, t.name)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(f"GGUF tensor type {t.tensor_type.name} ({t.name}) cannot be dequantized") from e
        w = np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)] if w.ndim != 1 else -1)
        if fix in ("rope_q", "rope_k"):
            w = unpermute_rope(w, cfg.n_head if fix == "rope_q" else cfg.n_kv_head)
        elif fix == "transpose":
            w = w.T
        w = np.ascontiguousarray(w)
        out[name] = torch.from_numpy(w if w.flags.writeable else w.copy())  # F32 tensors are read-only file views
    return out


def convert_gguf(path: str | Path, progress: Callable | None = None) -> Path:
    """Convert a GGUF file into a cached HF-style folder (done once per file content); returns the folder."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    digest = file_sha256(path)
    target = cache_root() / "gguf" / f"{digest[:24]}-v{CONVERTER_VERSION}"
    if (target / "config.json").exists():
        cache_dir.touch(target)
        return target
    meta, reader = read_gguf(path)
    arch = meta.get("general.architecture")
    names = {t.name for t in reader.tensors}
    try:
        cfg = ModelConfig.from_gguf_metadata(meta, tied="output.weight" not in names)
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    except FornaxError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a missing or mistyped key
        raise ModelLoadError(f"{path.name}: GGUF metadata is missing or has a bad value: "
                             f"{type(e).__name__}: {e}") from e
    cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | tokenizer.end_of_turn_ids())
    try:
        state = gguf_to_hf_state_dict(reader, cfg, arch, progress)
    except (ValueError, TypeError) as e:  # a tensor whose shape cannot be the one the metadata describes
        raise ModelLoadError(f"{path.name}: a tensor does not fit the model its metadata describes: {e}") from e
    check_hf_shapes(state, cfg)  # before the fp32 copy is written
    try:
        with atomic_folder(target) as tmp:  # a half-written cache is never seen as valid
            write_hf_folder(tmp, cfg, tokenizer, state, {"_name_or_path": str(meta.get("general.name", path.stem))})
            (tmp / "source.json").write_text(json.dumps({"gguf": str(path), "sha256": digest}, indent=2))
    except FileExistsError:
        if not (target / "config.json").exists():  # not a concurrent writer that won the race
            raise ModelLoadError(f"{target} exists but holds no converted model (no config.json); delete it and retry")
    except OSError as e:
        raise ModelLoadError(f"could not write the converted model to {target.parent}: {e}") from e
    cache_dir.evict(keep=(target,))
    return target
