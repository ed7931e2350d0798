"""The fastest execution path of a model that is at least as faithful as llama.cpp: the native CPU path (a model
from a GGUF file with Q4_0 / Q4_1 / Q8_0 blocks, where a C compiler is) when its KL against the eager fp32 model on
held-out text is within the bound, else an ONNX export whose parity report's KL is, int4 before int8.

The playground runs this in the background after start-up and opens its Backend selector on the result. Cached
exports are looked at first (instant); then the missing ones are exported and verified, in the same order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from backend.errors import FornaxError
from backend.handle import ModelHandle
from backend.runners import offered

from .attach import runner_name
from .cache import cached_export, export_folder, is_cached
from .verify import heldout_fidelity

# llama.cpp's own quantization of the default model keeps mean KL(fp32 || quantized) at about 0.003 on held-out text:
# an export no worse than that is as faithful as what people already run.
FAITHFUL_KL = 0.0030
FAST_QUANTS = ("native", "int4", "int8")  # fastest first (docs/benchmarks.md); "native" is a runner, not an export


def parity_kl(report: dict) -> float | None:
    """The KL a parity report gives against eager fp32: on held-out text where the report has it, else on the
    fixed text of export/verify.py; None for a report without one (an LSTM's)."""
    heldout = report.get("heldout")
    if isinstance(heldout, dict) and heldout.get("mean_kl") is not None:
        return float(heldout["mean_kl"])
    return float(report["mean_kl"]) if report.get("mean_kl") is not None else None


def read_parity(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "parity.json").read_text())
    except (OSError, ValueError):
        return None  # an export made with verify=False, or a damaged file: not known to be faithful


@dataclass
class FastPath:
    quant: str | None                    # "native", an export's quant, or None: none is faithful enough (or could be made)
    kl: float | None = None
    folder: Path | None = None
    rejected: dict[str, float] = field(default_factory=dict)   # runner name -> its KL, above the bound
    problems: dict[str, str] = field(default_factory=dict)     # runner name -> why it could not be made
    max_kl: float = FAITHFUL_KL

    @property
    def name(self) -> str | None:
        return ("native" if self.quant == "native" else runner_name(self.quant)) if self.quant else None

    def why_not(self) -> str:
        """Why no export was chosen, in plain words."""
        parts = [f"{n} KL {kl:.2g}" for n, kl in self.rejected.items()]
        parts += [f"{n}: {why}" for n, why in self.problems.items()]
        return (f"no export is as faithful as llama.cpp (KL ≤ {self.max_kl:g}): " + "; ".join(parts)) if parts \
            else "nothing to try"


def fastest_faithful(handle: ModelHandle, max_kl: float = FAITHFUL_KL, quants: tuple[str, ...] = FAST_QUANTS,
                     progress: Callable[[str], None] | None = None) -> FastPath:
    """The first of `quants` whose export's parity KL is ≤ `max_kl`, a cached export before a new one. Exports
    what is missing (verified, into the export cache); attaches nothing: the caller does, once it knows the model
    it was for is still the one loaded."""
    say = progress or (lambda message: None)
    result = FastPath(None, max_kl=max_kl)
    if handle.model is None:
        result.problems["onnx"] = "the model was loaded from an ONNX export: it runs on ONNX Runtime already"
        return result
    if not handle.family.generates:
        result.problems["onnx"] = f"{handle.family.described} does not generate"
        return result
    if "native" in quants and offered("native", handle.gguf_path, handle.family) and handle.device.type == "cpu":
        say("preparing native (checking it against eager on held-out text)")
        try:
            kl = heldout_fidelity(handle.model, handle.runner("native"), handle.tokenizer)["mean_kl"]
        except FornaxError as e:  # e.g. a GGUF whose matmuls are in other types
            result.problems["native"] = str(e)
        else:
            if kl <= max_kl:
                result.quant, result.kl = "native", kl
                return result
            result.rejected["native"] = kl
    quants = tuple(q for q in quants if q in handle.family.quants)  # an LSTM has no int4
    cached = [q for q in quants if is_cached(handle.source, q)]
    for quant in cached + [q for q in quants if q not in cached]:
        name = runner_name(quant)
        if quant in cached:
            folder = export_folder(handle.source, quant)
            say(f"checking the cached {name} export")
        else:
            say(f"preparing {name} (exporting and checking it against eager)")
            try:
                folder = cached_export(handle.source, quant)
            except FornaxError as e:  # e.g. over this deployment's export size cap
                result.problems[name] = str(e)
                continue
        report = read_parity(folder)
        kl = parity_kl(report) if report is not None else None
        if kl is None:
            result.problems[name] = "its parity report gives no KL against eager"
            continue
        if kl <= max_kl:
            result.quant, result.kl, result.folder = quant, kl, folder
            return result
        result.rejected[name] = kl
    return result
