"""GGUF files: read (our bounded walk of gguf_check.py, tensor bytes from a memory map), dequantize with the `gguf`
package, and convert once into a cached HF-style folder.

The cached folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) is keyed by the
file's SHA-256, so the slow dequantization happens on the first load only; transformers can read it too. A first
load (`open_gguf`, backend/loading.py) builds the model from the dequantized tensors in memory while a thread writes
the folder (`GGUFConversion.write_in_thread`); the load returns once it is written, whole or not at all.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import threading
from dataclasses import dataclass
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
from .gguf_check import DEQUANTIZED_BYTES, GGUFTensorInfo, check_hf_shapes, read_gguf_layout
from .hf import write_hf_folder
from .tokenizer import Tokenizer

CONVERTER_VERSION = 1  # bump when the conversion changes, so stale caches are not reused

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class GGUFTensor:
    """One tensor of a GGUF file: the fields of gguf's `ReaderTensor` the conversion uses, its `data` a read-only
    view of the file's memory map shaped as that reader shapes it (quantized types: rows of bytes)."""
    __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "data")

    def __init__(self, info: GGUFTensorInfo, file_bytes: np.ndarray):
        import gguf
        from gguf.quants import quant_shape_to_byte_shape

        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        self.name, self.tensor_type, self.shape = info.name, qtype, info.dims
        self.n_elements, self.n_bytes, self.data_offset = info.n_elements, info.n_bytes, info.offset
        np_dims = tuple(reversed(info.dims))
        raw = file_bytes[info.offset:info.offset + info.n_bytes]
        item = _PLAIN_TYPES.get(qtype.name)
        self.data = raw.view(item).reshape(np_dims) if item else raw.reshape(quant_shape_to_byte_shape(np_dims, qtype))


_PLAIN_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}  # stored as is; every other type is blocks of bytes


class GGUFFile:
    """A checked GGUF file's tensors (`tensors`, as `gguf.GGUFReader.tensors` lists them) over one memory map."""

    def __init__(self, path: Path, tensors: list[GGUFTensorInfo]):
        with open(path, "rb") as f:  # the map outlives the file object; the arrays keep it alive
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if tensors else b""
        file_bytes = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors = [GGUFTensor(t, file_bytes) for t in tensors]


def read_gguf(path: Path) -> tuple[dict, GGUFFile]:
    """(metadata dict, tensors) of a GGUF file, or a ModelLoadError that says what is wrong with it. One bounded
    walk (gguf_check.py) reads the metadata and the tensor table; the tensors are views of a memory map."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path.name} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")
    layout = read_gguf_layout(path)  # every declared count bounded before a value is kept
    check_conversion_memory(path, layout.summary)
    try:
        return layout.meta, GGUFFile(path, layout.tensors)
    except (OSError, ValueError) as e:  # the file changed under us since the walk
        raise ModelLoadError(f"{path.name} is a corrupt or truncated GGUF file: {e}") from e


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
    conversion = open_gguf(path, progress)
    if conversion.state is not None:
        check_hf_shapes(conversion.state, conversion.cfg)  # before the fp32 copy is written
        conversion.write(progress)
    return conversion.folder


def open_gguf(path: str | Path, progress: Callable | None = None) -> "GGUFConversion":
    """A GGUF file's conversion: its cache folder when converted before, else the config, tokenizer and HF-named
    fp32 state dequantized in memory, not yet written."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    digest = file_sha256(path)
    target = cache_root() / "gguf" / f"{digest[:24]}-v{CONVERTER_VERSION}"
    if (target / "config.json").exists():
        cache_dir.touch(target)
        return GGUFConversion(target, path, digest)
    meta, gguf_file = read_gguf(path)
    arch = meta.get("general.architecture")
    names = {t.name for t in gguf_file.tensors}
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
        state = gguf_to_hf_state_dict(gguf_file, cfg, arch, progress)
    except (ValueError, TypeError) as e:  # a tensor whose shape cannot be the one the metadata describes
        raise ModelLoadError(f"{path.name}: a tensor does not fit the model its metadata describes: {e}") from e
    return GGUFConversion(target, path, digest, cfg, tokenizer, state, str(meta.get("general.name", path.stem)))


@dataclass
class GGUFConversion:
    """What `open_gguf` found: `folder` is the cache; on a first conversion `cfg`, `tokenizer` and `state`
    (HF names, fp32) are set and the folder is not written until `write` / `write_in_thread`."""
    folder: Path
    source: Path
    digest: str
    cfg: ModelConfig | None = None
    tokenizer: Tokenizer | None = None
    state: dict | None = None
    name: str = ""

    def config_extra(self) -> dict:
        return {"_name_or_path": self.name}

    def folder_config(self) -> ModelConfig:
        """The config a load of the written folder reads back (config.json + generation_config.json)."""
        hf = json.loads(json.dumps({**self.cfg.to_hf_config(), **self.config_extra()}))
        cfg = ModelConfig.from_hf_config(hf)
        cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(self.generation_config()["eos_token_id"]))
        cfg.name = cfg.name or hf.get("_name_or_path") or self.folder.name
        return cfg

    def generation_config(self) -> dict:
        """generation_config.json as written (write_hf_folder)."""
        return json.loads(json.dumps({"bos_token_id": self.cfg.bos_token_id, "eos_token_id": self.cfg.eos_token_ids}))

    def write(self, progress: Callable | None = None) -> None:
        """Write the cache folder (atomically: a hidden sibling, fsynced, renamed), then evict old entries."""
        target = self.folder
        try:
            with atomic_folder(target) as tmp:  # a half-written cache is never seen as valid
                save_safetensors(self.state, tmp / "model.safetensors", {"format": "pt"})  # the weights first
                if progress:
                    progress(1.0, "saving the converted model")
                write_hf_folder(tmp, self.cfg, self.tokenizer, None, self.config_extra())
                (tmp / "source.json").write_text(json.dumps({"gguf": str(self.source), "sha256": self.digest},
                                                            indent=2))
        except FileExistsError:
            if not (target / "config.json").exists():  # not a concurrent writer that won the race
                raise ModelLoadError(f"{target} exists but holds no converted model (no config.json); delete it "
                                     f"and retry")
        except OSError as e:
            raise ModelLoadError(f"could not write the converted model to {target.parent}: {e}") from e
        cache_dir.evict(keep=(target,))

    def write_in_thread(self) -> "CacheWriter":
        """Start `write` in a thread (the model is built meanwhile); `CacheWriter.result()` waits and re-raises."""
        return CacheWriter(self)


class CacheWriter(threading.Thread):
    """A conversion's cache folder being written (numpy and file writes release the GIL: it overlaps the build)."""

    def __init__(self, conversion: GGUFConversion):
        super().__init__(name=f"gguf-cache-{conversion.digest[:8]}", daemon=True)
        self.conversion, self.error = conversion, None
        self.start()

    def run(self):
        try:
            self.conversion.write()
        except BaseException as e:  # handed to the caller by result()
            self.error = e

    def result(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `state` as a .safetensors file straight from the tensors' memory (safetensors' `save_file` first copies
    every tensor into a bytes object: a second copy of the model at the peak). Tensors must be on the CPU."""
    names = sorted(state)
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for name in names:
        t = state[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in names:
            t = state[name].contiguous()  # (a copy only of a tensor that is not: one at a time)
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's own memory, no copy
