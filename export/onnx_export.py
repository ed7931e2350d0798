"""Export any model `backend.load` accepts as one ONNX graph — a causal LM with KV cache (interface: export/graph.py),
an encoder in optimum's layout (encoder_graph.py), the LSTM with its state (lstm_graph.py) — then quantise it."""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from backend import budget, limits
from backend.disk.atomic import atomic_folder
from backend.models import family
from backend.models.config import ModelConfig
from backend.errors import FornaxError
from backend.formats.hf import write_hf_folder
from backend.loading import build_model, read_hf_config, read_weights, resolve
from backend.runners.onnx import LOGITS_TO_KEEP, io_names
from backend.formats.tokenizer import Tokenizer

from .gqa_graph import GqaGraph
from .graph import GraphWrapper

QUANTS = ("none", "int8", "int4")  # every family offers a subset (Family.quants: encoders and the LSTM, no int4)
EXPORT_VERSION = 6  # bump when graphs change, so cached exports are made again
OPSET = 17
MODEL_FILE = "model.onnx"
PROTOBUF_LIMIT = 2 * 1024**3  # weights beyond this go to external data files
# int4 from GGUF blocks: the last layers run MatMulNBits with float activations (accuracy_level 1): one buys most of
# the fidelity that all of them would, for a few % of decode speed; the 8-bit output layer keeps int8 activations
# (float ones are far slower). Measured in docs/export.md ("float layers").
FLOAT_LAYERS = 1


class ExportError(FornaxError):
    """The export could not be written or checked."""


def quants_for(name: str) -> tuple[str, ...]:
    """The quantisations `export` offers for a model family (by its name, as `ModelHandle.info()` gives it)."""
    return family(name).quants


def check_quant(name: str, quant: str) -> None:
    if quant not in quants_for(name):
        raise ExportError(f"{quant!r} is not offered for {family(name).described}; choose one of "
                          f"{', '.join(quants_for(name))}")


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} is not an empty folder: choose a new folder (nothing was written)")
    parent = out.parent if not out.exists() else out
    parent.mkdir(parents=True, exist_ok=True) if not parent.exists() else None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{parent} is not writable")


def export_fp32(model, path: Path) -> None:
    """torch.onnx.export (TorchScript exporter) with dynamic batch and sequence axes."""
    cfg: ModelConfig = model.config
    graph_kind = family(cfg).export_graph
    if graph_kind in ("encoder", "lstm"):
        return _export_other(model, path)
    inputs, outputs = io_names(cfg.n_layer)
    B, S, P = 2, 3, 4  # example sizes; every axis below is dynamic
    example = [torch.randint(0, cfg.vocab_size, (B, S)), torch.ones(B, P + S, dtype=torch.long),
               torch.arange(P, P + S).expand(B, S).contiguous()]
    example += [torch.zeros(B, cfg.n_kv_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    example.append(torch.zeros(1, dtype=torch.long))  # logits_to_keep
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in inputs[3:]})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in outputs[1:]})
    graph = GqaGraph(model) if graph_kind == "gqa" else GraphWrapper(model)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape branches are constant with a mask
            torch.onnx.export(graph, tuple(example), str(path), input_names=[*inputs, LOGITS_TO_KEEP],
                              output_names=outputs, dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True,
                              dynamo=False, external_data=_needs_external_data(model))
    except OSError:
        raise
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for this model: {type(e).__name__}: {e}") from e
    _finish_graph(path, packed_qkv=graph_kind == "gqa")


def _finish_graph(path: Path, packed_qkv: bool) -> None:
    """Give logits_to_keep its default (an initializer of the same name: callers that do not know the input —
    optimum, onnxruntime-genai, older Fornax — need not feed it) and, for GroupQueryAttention graphs, feed the
    packed Q|K|V projection to attention directly."""
    import onnx
    from onnx import numpy_helper

    from .gqa_graph import pack_qkv

    model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, dtype=np.int64), LOGITS_TO_KEEP))
    if packed_qkv:
        pack_qkv(model.graph)
    onnx.save(model, str(path))


def _export_other(model, path: Path) -> None:
    """An encoder (optimum's layout) or the LSTM (state in and out) as one graph."""
    from .encoder_graph import export_encoder
    from .lstm_graph import export_lstm

    if _needs_external_data(model):
        raise ExportError("encoders and LSTMs over 2 GB are not exported (one protobuf file only)")
    try:
        (export_encoder if family(model).export_graph == "encoder" else export_lstm)(model, path, OPSET)
    except OSError:
        raise
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for this model: {type(e).__name__}: {e}") from e


def _needs_external_data(model) -> bool:
    return sum(p.numel() * p.element_size() for p in model.parameters()) > PROTOBUF_LIMIT * 0.9


def check_graph(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))  # path form: works with external data


def quantize(src: Path, dst: Path, quant: str) -> None:
    """Weight-only quantisation with onnxruntime's MatMulNBits quantizer: 8 bits in blocks of 16 or 4 bits in
    blocks of 32 along the input dimension, asymmetric, int8 activations inside the kernel (accuracy_level 4, the
    fast CPU path; the activations are quantized per block too, and that is what limits agreement: on SmolLM2 int8
    in blocks of 32 kept 94.5 % top-1, in blocks of 16 95.3 % and all 64 greedy tokens, ~20 % slower — int8 is the
    precise choice, int4 the fast one).

    Why not quantize_dynamic for int8: on SmolLM2 its per-tensor activation quantization kept only 61 % top-1
    agreement with fp32 (per-channel weights: 0 %), where 8-bit MatMulNBits keeps 95.3 % (export verify)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import logging

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # per-node INFO
    bits = {"int8": 8, "int4": 4}.get(quant)
    if bits is None:
        raise ExportError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANTS)}")
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=16 if bits == 8 else 32, is_symmetric=False,
                             accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=q.model.model.ByteSize() > PROTOBUF_LIMIT * 0.9)


def quantize_model(source: str, folder: Path, model, src: Path, dst: Path, quant: str,
                   float_layers: int = FLOAT_LAYERS) -> str:
    """int4 of a model that came from a GGUF file takes the file's own 4-bit blocks (exact; see gguf_blocks.py),
    centred on an integer zero point per block; its last `float_layers` layers keep float activations
    (accuracy_level 1), the rest and the 8-bit output layer use int8 activations (4). Anything else goes through
    onnxruntime's quantizer. Returns which way was taken."""
    if quant == "int4":
        from .gguf_blocks import centred, gguf_of, matching, quantized_linears, transcode

        path = gguf_of(source, folder)
        linears = quantized_linears(path, model.config) if path is not None else {}
        weights = {name: m.weight.detach().numpy() for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        if linears and set(weights) <= set(linears) and matching(linears, weights):
            first_float = model.config.n_layer - max(0, float_layers)
            level = lambda name: 1 if name.startswith("blocks.") and int(name.split(".")[1]) >= first_float \
                else 4  # noqa: E731
            if transcode(src, dst, {k: centred(v) for k, v in linears.items()}, weights, level) == len(weights):
                n = min(max(0, float_layers), model.config.n_layer)
                return (f"GGUF blocks of {path.name}, re-packed for MatMulNBits (no second rounding; float "
                        f"activations in the last {n} layer{'' if n == 1 else 's'})")
            dst.unlink(missing_ok=True)
    quantize(src, dst, quant)
    return "onnxruntime MatMulNBits quantizer, " + ("8-bit, blocks of 16" if quant == "int8" else "4-bit, blocks of 32")


def write_side_files(folder: Path, cfg: ModelConfig, tokenizer: Tokenizer, info: dict) -> None:
    """What a user needs to run the graph elsewhere: HF config, generation config, tokenizer, our own config."""
    fam = family(cfg)
    write_hf_folder(folder, cfg, tokenizer, None, {"use_cache": True} if fam.kv_cache == "positions" else {})
    if fam.export_graph == "encoder":
        from .encoder_graph import name_special_tokens

        name_special_tokens(folder, tokenizer)
    (folder / "fornax.json").write_text(json.dumps({"config": cfg.to_dict(), **info}, indent=2))


def export(source: str, out: str | os.PathLike, quant: str = "none", verify: bool = True,
           progress: Callable[[float, str], None] | None = None, float_layers: int = FLOAT_LAYERS) -> dict:
    """Export `source` to the folder `out` (must be new or empty). Returns a summary with sizes and the report."""
    if quant not in QUANTS:
        raise ExportError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANTS)}")
    out = Path(out).expanduser()
    check_out_dir(out)
    say = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    say(0.05, "loading the model")
    folder = resolve(source)
    cfg = read_hf_config(folder)
    check_quant(cfg.family, quant)
    # the export holds the weights ~5 times over (fp32 model, traced graph, serialized protos): capped per
    # deployment, and its estimated peak must fit the memory budget — both before a weight is read
    limits.check(cfg.n_params, limits.current().max_export_params, "the parameter count of the model to export")
    budget.check_export(cfg, quant)
    with _ONE_EXPORT_AT_A_TIME:  # two exports at once would need twice the budget
        return _export(source, folder, cfg, out, quant, verify, say, float_layers, t0)


_ONE_EXPORT_AT_A_TIME = threading.Lock()


def _export(source: str, folder: Path, cfg: ModelConfig, out: Path, quant: str, verify: bool, say: Callable,
            float_layers: int, t0: float) -> dict:
    tokenizer = Tokenizer.from_folder(folder)
    state = read_weights(folder)
    model = build_model(cfg, state, torch.float32, torch.device("cpu"), cpu_decode_layout=False)
    del state  # what the model does not hold of the files' tensors can go before tracing
    try:
        with atomic_folder(out, mode=0o755) as tmp:  # the folder appears whole or not at all
            say(0.2, "exporting the graph")
            fp32 = tmp / (MODEL_FILE if quant == "none" else "model_fp32.onnx")
            export_fp32(model, fp32)
            check_graph(fp32)
            sizes = {"fp32": _size(fp32)}
            method = None
            if quant != "none":
                say(0.5, f"quantising to {quant}")
                method = quantize_model(source, folder, model, fp32, tmp / MODEL_FILE, quant, float_layers)
                if family(cfg).export_graph == "lstm":  # MatMulNBits takes MatMuls only
                    method += " (the output layer; the LSTM node's own weights stay fp32)"
                check_graph(tmp / MODEL_FILE)
                sizes[quant] = _size(tmp / MODEL_FILE)
                for f in tmp.glob("model_fp32.onnx*"):
                    f.unlink()
            info = {"source": source, "quant": quant, "quant_method": method, "opset": OPSET,
                    "attention": "GroupQueryAttention" if family(cfg).export_graph == "gqa" else "generic",
                    "sizes_bytes": sizes,
                    "export_seconds": round(time.perf_counter() - t0, 1)}
            write_side_files(tmp, cfg, tokenizer, info)
            if verify:
                from .parity import verify_any
                from .verify import save_report

                say(0.8, "checking parity against the eager model")
                info["report"] = verify_any(tmp, model, tokenizer)
                save_report(tmp, info["report"])
                (tmp / "fornax.json").write_text(json.dumps({"config": cfg.to_dict(), **info}, indent=2))
    except OSError as e:
        raise ExportError(f"could not write the export to {out}: {e}") from e
    say(1.0, "done")
    return info


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
