"""The native CPU path: a Llama-family model's whole forward pass in C (native/fornax_cpu.c), over the GGUF file's
own Q4_1 / Q8_0 (and Q4_0) blocks, one call per step.

Offered for a model loaded from a GGUF file whose matmuls are all in those types (SmolLM2's is Q4_1 with a Q8_0
output layer). The blocks are read as they are (no second rounding) and checked against the weights the model
holds, so a layout read wrong is refused instead of run. Embeddings, norms and rotary tables come from the PyTorch
model; the KV cache is float32 in C. Activations are quantized per block of 32 to int8 for each matmul, as
llama.cpp does for these types, so its fidelity is llama.cpp's (measured in docs/benchmarks.md).
"""
from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import budget, limits
from ..disk.caches import cache_root
from ..errors import FornaxError, GenerationError
from ..formats.gguf_blocks import QuantizedLinear, matching, quantized_linears
from ..models import family
from ..models.transformer import Transformer
from .eager import cache_length


# The last layer's matmuls take float activations (the dequantized weights times them, exact in fp32): as in the
# int4 ONNX export, that one layer buys most of the fidelity all of them would (docs/benchmarks.md).
FLOAT_LAYERS = 1


def native_folder() -> Path:
    return cache_root() / "native"


def compiler_present() -> bool:
    import native

    return native.compiler() is not None


def library():
    """The built native library (built now if needed); GenerationError saying why where it cannot be."""
    import native

    try:
        return native.load(native_folder())
    except native.NativeUnavailable as e:
        if limits.public_mode():  # the compiler's message names server paths: it goes to the server's log only
            print(f"fornax: the native CPU path is not available: {e}", file=sys.stderr)
            raise GenerationError("the native CPU path is not available here (its C build failed)") from e
        raise GenerationError(f"the native CPU path is not available here: {e}") from e


def packed(ql: QuantizedLinear) -> dict:
    import native

    if ql.bits == 4 and ql.offsets is not None and np.ndim(ql.zero_point) == 0 and ql.zero_point == 0:   # Q4_1
        return native.pack_q4_1(ql.q, ql.scales, ql.offsets)
    if ql.bits == 4 and ql.offsets is None and np.ndim(ql.zero_point) == 0 and ql.zero_point == 8:       # Q4_0
        if np.abs(ql.scales).max(initial=0) * 8 > FP16_MAX:
            raise GenerationError("the native CPU path reads Q4_0 blocks with scales up to 8188 only (their minimum "
                                  "-8 d is kept in fp16)")
        return native.pack_q4_1(ql.q, ql.scales, -8 * ql.scales)    # w = d * (q - 8) = d * q + (-8 d), exact in fp16
    if ql.bits == 8 and ql.offsets is None and np.ndim(ql.zero_point) == 0 and ql.zero_point == 128:     # Q8_0
        return native.pack_q8_0(ql.q.astype(np.int16) - 128, ql.scales)
    raise GenerationError("the native CPU path reads Q4_0, Q4_1 and Q8_0 blocks only")


FP16_MAX = 65504.0


def _floats(t: torch.Tensor | None) -> np.ndarray | None:
    """A float32 copy the C side may point into: never the tensor's own memory, which the model may replace (its
    rotary tables grow with a longer cache, training updates norms) while C still reads it."""
    return None if t is None else np.array(t.detach().float().cpu().numpy(), dtype=np.float32, order="C", copy=True)


def check_shapes(cfg) -> None:
    """Refuse, before anything is read, a model whose sizes fornax_cpu.c's buffers and blocks do not fit."""
    import native

    widths = {"the hidden size": cfg.d_model, "the FFN size": cfg.d_ff, "the heads' width": cfg.n_head * cfg.head_dim}
    for what, n in widths.items():
        if n % native.BLOCK or n // native.BLOCK > native.MAX_BLOCKS:
            raise GenerationError(f"the native CPU path needs {what} to be a multiple of {native.BLOCK} up to "
                                  f"{native.BLOCK * native.MAX_BLOCKS}, not {n}")
    if cfg.head_dim % 2 or cfg.n_head % cfg.n_kv_head:
        raise GenerationError(f"the native CPU path needs an even head width and whole groups of query heads, not "
                              f"{cfg.head_dim} and {cfg.n_head} / {cfg.n_kv_head}")


def preparation_parts(cfg, dtype=torch.float32) -> dict[str, int]:
    """Bytes that preparing the native path adds beside the loaded model: the decoded blocks (codes 1 byte a
    weight, scales and minima fp32: ~1.25), the packed copy (~0.63) and the largest matrix's transients (its raw
    bytes decoded, interleaved, checked in row chunks: ~5 bytes a weight); a float copy of the weights where the
    model is not fp32."""
    params = budget.param_count(cfg)
    largest = max(cfg.vocab_size * cfg.d_model, 2 * cfg.d_ff * cfg.d_model,
                  (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim * cfg.d_model)
    parts = {"decoded blocks": int(1.25 * params), "packed blocks": int(0.63 * params), "transients": 5 * largest}
    if dtype != torch.float32:
        parts["float weights"] = 4 * params
    return parts


class NativeRunner:
    name = "native"

    def __init__(self, model: Transformer, gguf_path: Path, progress: Callable[[float, str], None] | None = None,
                 float_layers: int = FLOAT_LAYERS, interleaved: bool = True):
        cfg = model.config
        if not isinstance(model, Transformer) or not family(cfg).gguf_blocks:
            raise GenerationError(f"the native CPU path runs the Llama family only, not {family(cfg).described}")
        if model.tok_emb.weight.device.type != "cpu":
            raise GenerationError("the native CPU path runs on the CPU: load the model on the CPU")
        check_shapes(cfg)
        parts = preparation_parts(cfg, model.tok_emb.weight.dtype)
        budget.check_memory(sum(parts.values()), "preparing the native CPU path", parts)
        self.lib = library()
        if progress:
            progress(0.3, "native CPU path: reading the GGUF blocks")
        try:
            self._prepare(model, Path(gguf_path), float_layers, interleaved)
        except FornaxError:
            raise
        except (ValueError, OSError, MemoryError) as e:  # a truncated or changed file, rows not whole blocks
            raise GenerationError(f"the native CPU path could not read this GGUF file's blocks: "
                                  f"{type(e).__name__}") from e

    def _prepare(self, model: Transformer, gguf_path: Path, float_layers: int, interleaved: bool) -> None:
        import native

        cfg = model.config
        linears = quantized_linears(gguf_path, cfg)
        weights = {name: m.weight.detach().float().numpy() for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        missing = sorted(set(weights) - set(linears))
        if missing:
            raise GenerationError(f"the native CPU path needs every matmul in Q4_0, Q4_1 or Q8_0 blocks; "
                                  f"{missing[0]} is not" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if not matching(linears, weights):
            raise GenerationError("the GGUF blocks do not stand for the weights the model holds (a changed file?)")
        del weights
        self.model, self.config, self.device = model, cfg, torch.device("cpu")
        self._keep: list = []   # every array the C side points into
        blocks = model.blocks
        first_float = cfg.n_layer - max(0, float_layers)
        exact = lambda name: name.startswith("blocks.") and int(name.split(".")[1]) >= first_float  # noqa: E731
        mats = {}
        for name in list(linears):  # each matrix's decoded blocks dropped once packed
            mats[name] = self._matrix(linears.pop(name), getattr(_module(model, name), "bias", None), exact(name),
                                      interleaved)
        layers = (native.Layer * cfg.n_layer)()
        for i, block in enumerate(blocks):
            layers[i] = native.Layer(mats[f"blocks.{i}.attn.qkv"], mats[f"blocks.{i}.attn.proj"],
                                     mats[f"blocks.{i}.mlp.gate_up"], mats[f"blocks.{i}.mlp.down"],
                                     self._ptr(_floats(block.attn_norm.weight)), self._ptr(_floats(block.mlp_norm.weight)))
        self._layers = layers
        self.weight_bytes = sum(a.nbytes for a in self._keep)
        self._desc = native.ModelDesc(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff,
                                      cfg.vocab_size, 0, cfg.norm_eps, 0, None, None,
                                      self._ptr(_floats(model.norm.weight)), mats["lm_head"], layers)
        self._handle = None
        self._ropes: dict[int, tuple] = {}  # C model -> the rotary tables it points into, freed with it
        self._lock = threading.Lock()       # start / forward / free of the runner's own C model
        self.batch = 0

    def _ptr(self, a: np.ndarray) -> int:
        self._keep.append(a)
        return a.ctypes.data

    def _matrix(self, ql: QuantizedLinear, bias: torch.Tensor | None, float_acts: bool, interleaved: bool):
        import native

        p = packed(ql)
        if interleaved and not float_acts:  # float activations read the row-major blocks
            p = native.interleave(p)
        m = native.qmatrix(p, _floats(bias), float_acts)
        self._keep += [a for a in p.values() if isinstance(a, np.ndarray)]
        return m

    def _new(self, batch: int, cache_len: int):
        """A C model with a KV cache for (batch, cache_len), its rotary tables long enough."""
        import native

        try:
            cos, sin = self.model.rope_tables(cache_len)
        except ValueError as e:  # longer than the model's context
            raise GenerationError(str(e)) from e
        cos, sin = _floats(cos[:cache_len]), _floats(sin[:cache_len])
        if cos.shape != (cache_len, self.config.head_dim) or sin.shape != cos.shape:
            raise GenerationError(f"the rotary tables are {tuple(cos.shape)}, "
                                  f"not ({cache_len}, {self.config.head_dim})")
        desc = native.ModelDesc.from_buffer_copy(self._desc)  # one per C model: another thread may be making its own
        desc.rope_cos, desc.rope_sin, desc.rope_len = cos.ctypes.data, sin.ctypes.data, cos.shape[0]
        refused = self.lib.fx_check(ctypes.byref(desc))
        if refused:  # Python's checks let through something fornax_cpu.c cannot run (see fx_check's codes)
            raise GenerationError(f"the native CPU path refused this model's sizes (fx_check {refused})")
        handle = self.lib.fx_new(ctypes.byref(desc))
        if not handle:
            raise GenerationError("not enough memory for the native CPU path's model")
        self._ropes[handle] = (cos, sin)
        if self.lib.fx_start(handle, batch, cache_len) != 0:
            self._free(handle)
            raise GenerationError(f"not enough memory for the native KV cache of {batch} x {cache_len} positions")
        return handle

    def _free(self, handle) -> None:
        self.lib.fx_free(handle)
        self._ropes.pop(handle, None)

    def memory_plan(self, max_len: int) -> dict:
        return dict(cache_len=cache_length(max_len, self.config.max_seq_len), kv_dtype=torch.float32)

    def start(self, batch: int, max_len: int) -> None:
        with self._lock:
            self._free_own()
            self._handle = self._new(batch, cache_length(max_len, self.config.max_seq_len))
            self.batch = batch

    def _run(self, handle, ids: torch.Tensor, pos: int, all_logits: bool) -> torch.Tensor:
        B, T = ids.shape
        emb = np.ascontiguousarray(self.model.tok_emb.weight.detach()[ids.reshape(-1).cpu()].float().numpy())
        out = np.empty((B * T if all_logits else B, self.config.vocab_size), np.float32)
        rc = self.lib.fx_forward(handle, emb.ctypes.data, T, pos, int(all_logits), out.ctypes.data,
                                 torch.get_num_threads())
        if rc == -2:
            raise GenerationError("not enough memory for the native path's working buffers")
        if rc:
            raise GenerationError(f"the native forward pass refused positions {pos}..{pos + T} (cache too short?)")
        return torch.from_numpy(out)

    def forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        with self._lock:
            if self._handle is None or ids.shape[0] != self.batch:
                raise GenerationError("the native runner was not started for this batch")
            return self._run(self._handle, ids, pos, False)

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position of `ids` (B, T) with no cache of the runner's touched (its own, freed after)."""
        B, T = ids.shape
        handle = self._new(B, T)
        try:
            return self._run(handle, ids, 0, True).view(B, T, -1)
        finally:
            self._free(handle)

    def _free_own(self) -> None:
        if self._handle is not None:
            self._free(self._handle)
            self._handle = None

    def free(self) -> None:
        with self._lock:
            self._free_own()

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)
