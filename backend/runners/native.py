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
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..disk.caches import cache_root
from ..errors import GenerationError
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
        raise GenerationError(f"the native CPU path is not available here: {e}") from e


def packed(ql: QuantizedLinear) -> dict:
    import native

    if ql.bits == 4 and ql.offsets is not None and np.ndim(ql.zero_point) == 0 and ql.zero_point == 0:   # Q4_1
        return native.pack_q4_1(ql.q, ql.scales, ql.offsets)
    if ql.bits == 4 and ql.offsets is None and np.ndim(ql.zero_point) == 0 and ql.zero_point == 8:       # Q4_0
        return native.pack_q4_1(ql.q, ql.scales, -8 * ql.scales)    # w = d * (q - 8) = d * q + (-8 d), exact in fp16
    if ql.bits == 8 and ql.offsets is None and np.ndim(ql.zero_point) == 0 and ql.zero_point == 128:     # Q8_0
        return native.pack_q8_0(ql.q.astype(np.int16) - 128, ql.scales)
    raise GenerationError("the native CPU path reads Q4_0, Q4_1 and Q8_0 blocks only")


def _floats(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype=np.float32)


class NativeRunner:
    name = "native"

    def __init__(self, model: Transformer, gguf_path: Path, progress: Callable[[float, str], None] | None = None,
                 float_layers: int = FLOAT_LAYERS, interleaved: bool = True):
        import native

        cfg = model.config
        if not isinstance(model, Transformer) or not family(cfg).gguf_blocks:
            raise GenerationError(f"the native CPU path runs the Llama family only, not {family(cfg).described}")
        if model.tok_emb.weight.device.type != "cpu":
            raise GenerationError("the native CPU path runs on the CPU: load the model on the CPU")
        self.lib = library()
        if progress:
            progress(0.3, "native CPU path: reading the GGUF blocks")
        linears = quantized_linears(Path(gguf_path), cfg)
        weights = {name: m.weight.detach().float().numpy() for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        missing = sorted(set(weights) - set(linears))
        if missing:
            raise GenerationError(f"the native CPU path needs every matmul in Q4_0, Q4_1 or Q8_0 blocks; "
                                  f"{missing[0]} is not" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if not matching(linears, weights):
            raise GenerationError("the GGUF blocks do not stand for the weights the model holds (a changed file?)")
        self.model, self.config, self.device = model, cfg, torch.device("cpu")
        self._keep: list = []   # every array the C side points into
        blocks = model.blocks
        first_float = cfg.n_layer - max(0, float_layers)
        exact = lambda name: name.startswith("blocks.") and int(name.split(".")[1]) >= first_float  # noqa: E731
        mats = {name: self._matrix(linears[name], getattr(_module(model, name), "bias", None), exact(name),
                                   interleaved) for name in weights}
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
        self._full = None
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
        cos, sin = self.model.rope_tables(cache_len)
        cos, sin = _floats(cos), _floats(sin)
        desc = self._desc
        desc.rope_cos, desc.rope_sin, desc.rope_len = cos.ctypes.data, sin.ctypes.data, cos.shape[0]
        self._keep_rope = getattr(self, "_keep_rope", []) + [cos, sin]
        handle = self.lib.fx_new(ctypes.byref(desc))
        if not handle or self.lib.fx_start(handle, batch, cache_len) != 0:
            if handle:
                self.lib.fx_free(handle)
            raise GenerationError(f"not enough memory for the native KV cache of {batch} x {cache_len} positions")
        return handle

    def memory_plan(self, max_len: int) -> dict:
        return dict(cache_len=cache_length(max_len, self.config.max_seq_len), kv_dtype=torch.float32)

    def start(self, batch: int, max_len: int) -> None:
        self.free()
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
            self.lib.fx_free(handle)

    def free(self) -> None:
        if self._handle is not None:
            self.lib.fx_free(self._handle)
            self._handle = None
            self._keep_rope = []

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)
