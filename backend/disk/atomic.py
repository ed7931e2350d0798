"""Folders that appear whole or not at all: written into a hidden temporary sibling, then renamed into place.

Used by every writer of a folder a reader must trust: checkpoints, saved models, GGUF conversions, ONNX exports.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_folder(target: str | os.PathLike, replace: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yield a new temporary folder beside `target`; when the block ends without an error, fsync what was written
    and rename the folder to `target`. An error (or Ctrl-C) inside the block removes the temporary folder and leaves
    `target` as it was.

    `target` may be absent or an empty folder. If it holds anything, `replace=False` raises FileExistsError (nothing
    is lost: the new folder is removed); `replace=True` moves the old folder aside, renames the new one into place
    and only then deletes the old one — a crash between the two renames leaves both on disk, never neither.
    `mode` sets the new folder's permissions (the temporary folder starts private, 0o700)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if mode is not None:
            tmp.chmod(mode)
        yield tmp
        fsync_tree(tmp)  # the data must reach the disk before the rename that makes it visible
        _rename_into_place(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)  # the rename itself


def _rename_into_place(tmp: Path, target: Path, replace: bool) -> None:
    try:
        os.replace(tmp, target)  # succeeds when target is absent or an empty folder
        return
    except OSError:
        if not (target.exists() or target.is_symlink()):
            raise
        if not replace:
            raise FileExistsError(f"{target} already exists and is not empty") from None
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)  # aside, inside a private folder: one rmtree removes it later
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / target.name, target)  # put the old one back
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder (so their entries are on disk too)."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir() and not path.is_symlink():
            fsync_dir(path)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
