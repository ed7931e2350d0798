"""The on-disk caches, size-capped with least-recently-used eviction.

Entries are the folders (or files) directly under each cache area: GGUF conversions, ONNX exports, export zips,
uploads kept for training jobs, the models finetuning wrote, chat exports, and the inductor / Triton compile caches
(pointed here by `use_capped_compiler_caches`). An entry's last use is its modification time, which `touch` sets
when a cache hit uses it; `evict` deletes the least recently used entries until the areas together fit
`limits.cache_bytes`. In public mode the finetuned models count too (a finished one is dated by its last write:
the oldest finished goes first).
The data and output folder of a training job that is still starting or running are never evicted, whoever started
it. Hidden temporary folders (`.tmp-*`, left by a write that was killed) are removed once they are an hour old.

    python -m backend cache            # list the entries, newest use first
    python -m backend cache --clear    # delete them all
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import limits

STALE_TEMP_S = 3600.0


def cache_root() -> Path:
    """Where Fornax caches live: $FORNAX_CACHE, else $XDG_CACHE_HOME/fornax or ~/.cache/fornax."""
    base = os.environ.get("FORNAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fornax")
    return Path(base)


def areas() -> dict[str, Path]:
    """Cache area name -> folder."""
    root, tmp = cache_root(), Path(tempfile.gettempdir())
    found = {"gguf": root / "gguf", "exports": root / "exports", "uploads": root / "train-data",
             "zips": tmp / "fornax-exports", "chats": tmp / "fornax-chats", "inductor": root / "inductor",
             "triton": root / "triton"}
    if limits.public_mode():  # visitors' finetunes are cache too; a local user's are results, kept until deleted
        found["finetuned"] = root / "finetuned"
    return found


def use_capped_compiler_caches() -> None:
    """Point torch.compile's inductor cache and Triton's kernel cache into the capped areas (unless the operator
    chose folders), before anything compiles."""
    found = areas()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(found["inductor"]))
    os.environ.setdefault("TRITON_CACHE_DIR", str(found["triton"]))


def busy_paths() -> set[Path]:
    """The data file and output folder of every training job still starting or running (read from the jobs'
    state files, so it holds for jobs another app process started)."""
    busy = set()
    jobs = cache_root() / "jobs"
    for state_file in jobs.glob("*/state.json") if jobs.is_dir() else ():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if state.get("status") in ("starting", "running"):
            for p in (state.get("out_dir"), (state.get("config") or {}).get("data")):
                if p:
                    busy.add(Path(p).resolve())
    return busy


def _in_use(path: Path, busy: set[Path]) -> bool:
    path = path.resolve()
    return any(b == path or path in b.parents for b in busy)


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
    removed, busy = [], None
    for e in found:
        if total <= cap:
            break
        if e.path.resolve() in keep_set:
            continue
        busy = busy_paths() if busy is None else busy  # (read once, only when something is to go)
        if _in_use(e.path, busy):
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
