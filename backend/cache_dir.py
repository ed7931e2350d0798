"""The on-disk caches, size-capped with least-recently-used eviction.

Entries are the folders (or files) directly under each cache area: GGUF conversions, ONNX exports, export zips and
uploads kept for training jobs. An entry's last use is its modification time, which `touch` sets when a cache hit
uses it; `evict` deletes the least recently used entries until the areas together fit `limits.cache_bytes`.
Hidden temporary folders (`.tmp-*`, left by a write that was killed) are removed once they are an hour old.
Finetuned models and live job folders are never evicted: they are results, not caches.

    python -m backend cache            # list the entries, newest use first
    python -m backend cache --clear    # delete them all
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import limits

STALE_TEMP_S = 3600.0


def cache_root() -> Path:
    """Where Fornax caches live: $FORNAX_CACHE, else $XDG_CACHE_HOME/fornax or ~/.cache/fornax."""
    base = os.environ.get("FORNAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fornax")
    return Path(base)


def areas() -> dict[str, Path]:
    """Cache area name -> folder."""
    root = cache_root()
    return {"gguf": root / "gguf", "exports": root / "exports", "uploads": root / "train-data",
            "zips": Path(tempfile.gettempdir()) / "fornax-exports"}


@dataclass
class Entry:
    area: str
    path: Path
    bytes: int
    last_use: float   # seconds since the epoch


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def entries() -> list[Entry]:
    """Every cache entry, least recently used first; stale temporary folders are removed on the way."""
    found, now = [], time.time()
    for area, folder in areas().items():
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            try:
                mtime = p.lstat().st_mtime
            except OSError:
                continue
            if p.name.startswith("."):
                if now - mtime > STALE_TEMP_S:
                    _remove(p)
                continue
            found.append(Entry(area, p, _size(p), mtime))
    return sorted(found, key=lambda e: e.last_use)


def touch(path: str | Path) -> None:
    """Mark an entry as just used."""
    try:
        os.utime(path)
    except OSError:
        pass


def evict(cap_bytes: int | None = None, keep: tuple[str | Path, ...] = ()) -> list[Entry]:
    """Delete least recently used entries until all areas together hold at most cap_bytes (default: the
    deployment's cache_bytes); entries in `keep` (e.g. the one just written) stay. Returns what was deleted."""
    cap = limits.current().cache_bytes if cap_bytes is None else cap_bytes
    keep_set = {Path(k).resolve() for k in keep}
    found = entries()
    total = sum(e.bytes for e in found)
    removed = []
    for e in found:
        if total <= cap:
            break
        if e.path.resolve() in keep_set:
            continue
        _remove(e.path)
        total -= e.bytes
        removed.append(e)
    return removed


def clear() -> list[Entry]:
    return evict(0)


def describe(found: list[Entry]) -> str:
    """A table of entries for the command line, most recently used first."""
    if not found:
        return f"no cache entries under {cache_root()}"
    lines = [f"{'area':8} {'size':>10}  {'last use':19}  path"]
    for e in sorted(found, key=lambda e: -e.last_use):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_use))
        lines.append(f"{e.area:8} {e.bytes / 1e6:>8.1f}MB  {when}  {e.path}")
    total = sum(e.bytes for e in found)
    lines.append(f"{len(found)} entries, {total / 1e6:.1f} MB (cap {limits.current().cache_bytes / 1e9:.1f} GB)")
    return "\n".join(lines)
