"""Give a loaded model an ONNX Runtime execution path, exporting it first (once; exports are cached).

The playground's backend selector and Export tab call this; `backend` never depends on `export`, so the runner is
handed to the model handle from here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from backend.handle import ModelHandle
from backend.runners.onnx import read_onnx_config
from backend.runners.onnx_encoder_lstm import onnx_runner

from .cache import cached_export
from .onnx_export import ExportError

# runner name -> quantisation; the names are what `handle.stream(backend=...)` takes
ONNX_BACKENDS = {"onnx-fp32": "none", "onnx-int8": "int8", "onnx-int4": "int4"}
PRECISIONS = {"fp32": "none", "int8": "int8", "int4": "int4"}


def precisions_for(quants) -> list[str]:
    """The precisions the Export tab offers for a model family's `quants` (encoders and LSTMs: fp32 and int8)."""
    return [p for p, quant in PRECISIONS.items() if quant in quants]


def runner_name(quant: str) -> str:
    return {q: name for name, q in ONNX_BACKENDS.items()}[quant]


def export_for(handle: ModelHandle, quant: str, progress: Callable[[float, str], None] | None = None) -> Path:
    """The cached export folder of the handle's model at `quant` (exported now if not cached)."""
    if handle.model is None:
        raise ExportError("this model was loaded from an ONNX export and already runs on ONNX Runtime; "
                          "load its original folder, GGUF file or Hub id to export it again")
    return cached_export(handle.source, quant, progress)


def attach_onnx(handle: ModelHandle, quant: str, progress: Callable[[float, str], None] | None = None) -> str:
    """Add the ONNX Runtime runner for `quant` to the handle (exporting on first use); returns its name."""
    name = runner_name(quant)
    if name not in handle.runners:
        folder = export_for(handle, quant, progress)
        handle.add_runner(name, onnx_runner(folder, read_onnx_config(folder), name=name))
    return name


def export_summary(folder: Path) -> dict:
    """What the export wrote about itself (fornax.json): sizes, export time, parity report."""
    try:
        return json.loads((Path(folder) / "fornax.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{folder} has no readable fornax.json: {e}") from e
