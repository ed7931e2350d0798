"""`python -m export --format hf --model SOURCE --out DIR`: a Hugging Face folder that `vllm serve DIR` and
`transformers` take as it is.

The folder: `model.safetensors` (bf16 by default, HF tensor names), `config.json` (`architectures`, `model_type`,
`torch_dtype`), `generation_config.json` (bos / eos ids), `tokenizer.json` + `tokenizer_config.json` (with the
chat template inside, where transformers and vLLM read it) and `chat_template.jinja` (the same template as a file,
which newer transformers and vLLM read first). Any source `backend.load` takes works (a GGUF file comes out
dequantized). Causal Transformers only (GPT-2 and Llama families: what vLLM serves); an encoder or the LSTM is a
plain error. Written into a temporary folder and renamed into place; a non-empty target is refused.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from backend import budget
from backend.disk.atomic import atomic_folder
from backend.errors import FornaxError
from backend.formats.hf import fornax_to_hf, write_hf_folder

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_hf(source: str, out: str | Path, dtype: str = "bfloat16", progress=None) -> dict:
    """Write the HF folder for `source` into `out`; returns {out, dtype, sizes_bytes, export_seconds}."""
    import backend

    if dtype not in DTYPES:
        raise FornaxError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FornaxError(f"{out.name} already exists and is not empty: pick a new folder")
    if progress:
        progress(0.05, "loading the model")
    handle = backend.load(source, dtype="float32", device="cpu")
    cfg = handle.config
    if handle.model is None or not handle.family.hf_export:
        what = "an ONNX export" if handle.model is None else f"{handle.family.described}"
        raise FornaxError(f"the HF export is for causal Transformers (GPT-2 and Llama families, what vLLM serves); "
                          f"this model is {what}")
    state = fornax_to_hf(handle.model.state_dict(), cfg)
    out_bytes = sum(t.numel() for t in state.values()) * DTYPES[dtype].itemsize
    budget.check_memory(out_bytes, "the HF export", {"the weights in " + dtype: out_bytes})
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}  # one copy in the target dtype
    if progress:
        progress(0.5, "writing model.safetensors")
    try:
        with atomic_folder(out) as tmp:
            write_hf_folder(tmp, cfg, handle.tokenizer, state, {"torch_dtype": dtype, "_name_or_path": cfg.name})
            if handle.tokenizer.chat_template:
                (tmp / "chat_template.jinja").write_text(handle.tokenizer.chat_template)
            _complete_generation_config(tmp / "generation_config.json")
    except FileExistsError:
        raise FornaxError(f"{out.name} already exists and is not empty: pick a new folder") from None
    except OSError as e:
        raise FornaxError(f"could not write the HF export to {out.name}: {e.strerror or type(e).__name__}") from None
    handle.free()
    if progress:
        progress(1.0, "done")
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    return dict(out=str(out), dtype=dtype, sizes_bytes=sizes, export_seconds=round(time.perf_counter() - t0, 2))


def _complete_generation_config(path: Path) -> None:
    """generation_config.json as transformers writes it: no null ids, and its version field."""
    gen = {k: v for k, v in json.loads(path.read_text()).items() if v not in (None, [])}
    eos = gen.get("eos_token_id")
    if isinstance(eos, list) and len(eos) == 1:
        gen["eos_token_id"] = eos[0]
    path.write_text(json.dumps({**gen, "_from_model_config": False}, indent=2))
