"""An export folder packed as one .zip to download."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+|\.{2,}")  # anything but a plain name character; any ".."


def safe_name(name: str) -> str:
    """`name` as one plain path component: letters, digits, '.', '_' and '-' only, no '..', not hidden."""
    return _UNSAFE.sub("_", name).lstrip("._-") or "export"


def zip_export(folder: str | Path, dest_dir: str | Path, stem: str | None = None) -> Path:
    """`folder`'s own files as `dest_dir/<stem>.zip`, each stored as `<stem>/<file name>` (made once; an existing
    zip is returned as is). Only regular files directly in `folder` go in: no links (they could point anywhere on
    the server), no subfolders, no names with separators or `..`. Stored, not deflated: ONNX weights barely
    compress and deflating hundreds of MB takes long."""
    folder, stem = Path(folder), safe_name(stem or Path(folder).name)
    out = Path(dest_dir) / f"{stem}.zip"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.is_symlink():
                z.write(f, f"{stem}/{safe_name(f.name)}")
    partial.replace(out)  # a zip cut short never has the final name
    return out
