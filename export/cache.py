"""Exports made on demand (playground backend selector, benchmark) are cached per model content and precision."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Callable

from backend.disk import caches as cache_dir
from backend.disk.caches import cache_root
from backend.loading import resolve

from .onnx_export import EXPORT_VERSION, MODEL_FILE, export


def model_key(folder: Path) -> str:
    """Content key of a resolved model folder: its config and the size and mtime of its weight files."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def export_folder(source: str, quant: str = "none") -> Path:
    """Where the cached export of `source` at `quant` lives (whether it is there yet or not)."""
    return cache_root() / "exports" / f"{model_key(resolve(source))}-v{EXPORT_VERSION}-{quant}"


def is_cached(source: str, quant: str = "none") -> bool:
    return (export_folder(source, quant) / MODEL_FILE).exists()


_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(out: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(out, threading.Lock())


def cached_export(source: str, quant: str = "none", progress: Callable[[float, str], None] | None = None) -> Path:
    """The export folder of `source` at `quant`, exporting it first if it is not cached yet. Requests for the same
    export wait for the one making it and then reuse it: the work (and its memory) is never done twice at once."""
    out = export_folder(source, quant)
    with _lock_for(out):
        if not (out / MODEL_FILE).exists():
            export(source, out, quant=quant, progress=progress)  # the source, not the folder: int4 looks for its GGUF
            cache_dir.evict(keep=(out,))  # least recently used exports, conversions and zips go past the cap
        else:
            cache_dir.touch(out)
    return out
