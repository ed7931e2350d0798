"""python -m native [FOLDER]: build the native library now (into FOLDER; default the folder the backend uses,
$FORNAX_CACHE/native or ~/.cache/fornax/native) and say what was built, or why it cannot be."""
import os
import sys
from pathlib import Path

from . import NativeUnavailable, build, compiler

# the backend's cache root (backend/disk/caches.py), spelled out here: native imports nothing of the backend
root = os.environ.get("FORNAX_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                      "fornax")
folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(root) / "native"
try:
    lib = build(folder)
except NativeUnavailable as e:
    print(f"native: {e}")
    sys.exit(1)
print(f"native: {lib} ({lib.stat().st_size:,} bytes), built by {compiler()} for this CPU (-march=native)")
