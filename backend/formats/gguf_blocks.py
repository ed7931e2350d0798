"""The quantized blocks of a GGUF file's matmul weights, named as our Linears (the Llama family), read as they are.

Q4_0, Q4_1 and Q8_0 blocks of 32 inputs become codes, scales and offsets (`QuantizedLinear`); llama.cpp's permuted
Q/K rows are put back in HF's order and Q/K/V and gate/up stacked, as the loader does for the float weights.
`matching` checks that the blocks stand for exactly the weights a loaded model holds. Two users: the int4 ONNX
export (export/gguf_blocks.py re-packs them for MatMulNBits) and the native CPU path (runners/native.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models import family
from ..models.config import ModelConfig
from .gguf import unpermute_rope

BLOCK = 32


@dataclass
class QuantizedLinear:
    q: np.ndarray                 # (N, K) uint8 codes, 0..2**bits - 1
    scales: np.ndarray            # (N, K / 32) float32
    zero_point: int | np.ndarray  # the same for every block (0, 8 or 128), or (N, K / 32) uint8 per block
    bits: int
    offsets: np.ndarray | None    # (N, K / 32) float32 block minima (Q4_1), else None


def decode_blocks(raw: np.ndarray, kind: str) -> QuantizedLinear | None:
    """One GGUF weight (rows, bytes per row) of type Q4_0 / Q4_1 / Q8_0 as codes, scales and offsets."""
    rows = raw.shape[0]
    if kind == "Q4_0":     # 18 bytes: d f16, 16 bytes of nibbles; element j low nibble of byte j, 16 + j high
        b = raw.reshape(rows, -1, 18)
        d, m, nib = b[..., :2], None, b[..., 2:]
    elif kind == "Q4_1":   # 20 bytes: d f16, m f16, 16 bytes of nibbles
        b = raw.reshape(rows, -1, 20)
        d, m, nib = b[..., :2], b[..., 2:4], b[..., 4:]
    elif kind == "Q8_0":   # 34 bytes: d f16, 32 int8
        b = raw.reshape(rows, -1, 34)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = (b[..., 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return QuantizedLinear(q.reshape(rows, -1), d, 128, 8, None)
    else:
        return None
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).reshape(rows, -1)  # (rows, K) in element order
    scales = d.copy().view(np.float16)[..., 0].astype(np.float32)
    offsets = None if m is None else m.copy().view(np.float16)[..., 0].astype(np.float32)
    return QuantizedLinear(q, scales, 8 if m is None else 0, 4, offsets)


def stack(parts: list[QuantizedLinear]) -> QuantizedLinear | None:
    """Weights fused along the output dimension (QKV, gate+up): blocks run along the input, so rows just stack."""
    if any(p is None for p in parts) or len({(p.bits, p.zero_point, p.offsets is None) for p in parts}) != 1:
        return None
    cat = lambda xs: np.concatenate(xs, axis=0)  # noqa: E731
    return QuantizedLinear(cat([p.q for p in parts]), cat([p.scales for p in parts]), parts[0].zero_point,
                           parts[0].bits, None if parts[0].offsets is None else cat([p.offsets for p in parts]))


def unpermute(ql: QuantizedLinear, n_head: int) -> QuantizedLinear:
    """llama.cpp stores Q/K rows permuted for its rotary layout; reorder rows as the converter does."""
    f = lambda a: None if a is None else np.ascontiguousarray(unpermute_rope(a, n_head))  # noqa: E731
    return QuantizedLinear(f(ql.q), f(ql.scales), ql.zero_point, ql.bits, f(ql.offsets))


def quantized_linears(gguf_path: Path, cfg: ModelConfig) -> dict[str, QuantizedLinear]:
    """Our Linear names (blocks.3.attn.qkv, ..., lm_head) -> their GGUF blocks, for the Llama family."""
    import gguf

    if not family(cfg).gguf_blocks:
        return {}
    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    tensors = {t.name: t for t in reader.tensors}
    get = lambda name: decode_blocks(np.asarray(tensors[name].data), tensors[name].tensor_type.name) \
        if name in tensors else None  # noqa: E731
    out = {}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        q, k = get(p + "attn_q.weight"), get(p + "attn_k.weight")
        if q is not None and k is not None and arch == "llama":  # llama.cpp permutes Llama's Q/K only (not Qwen2's)
            q, k = unpermute(q, cfg.n_head), unpermute(k, cfg.n_kv_head)
        out[f"blocks.{i}.attn.qkv"] = stack([q, k, get(p + "attn_v.weight")])
        out[f"blocks.{i}.attn.proj"] = get(p + "attn_output.weight")
        out[f"blocks.{i}.mlp.gate_up"] = stack([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")])
        out[f"blocks.{i}.mlp.down"] = get(p + "ffn_down.weight")
    out["lm_head"] = get("output.weight") if "output.weight" in tensors else get("token_embd.weight")
    return {k: v for k, v in out.items() if v is not None}


def dequantize(ql: QuantizedLinear) -> np.ndarray:
    """The (N, K) float weights the blocks stand for."""
    N, K = ql.q.shape
    zp = np.asarray(ql.zero_point, dtype=np.float32)
    zp = zp[..., None] if zp.ndim else zp
    w = (ql.q.reshape(N, K // BLOCK, BLOCK).astype(np.float32) - zp) * ql.scales[..., None]
    if ql.offsets is not None:
        w = w + ql.offsets[..., None]
    return w.reshape(N, K)


def matching(linears: dict[str, QuantizedLinear], weights: dict[str, np.ndarray]) -> bool:
    """Do the blocks stand for exactly the weights the model holds (same rows, same order)? A check, so that a
    layout this file gets wrong falls back to the quantizer instead of exporting a scrambled model."""
    for name, w in weights.items():
        ql = linears.get(name)
        if ql is None or ql.q.shape != w.shape:
            return False
        tol = 1e-6 * max(1.0, float(np.abs(w).max()))
        for r in range(0, w.shape[0], MATCH_ROWS):  # in row chunks: a 150k-row output layer's float copies bounded
            if not np.allclose(dequantize(rows_of(ql, r, r + MATCH_ROWS)), w[r:r + MATCH_ROWS], rtol=0, atol=tol):
                return False
    return True


MATCH_ROWS = 4096


def rows_of(ql: QuantizedLinear, start: int, stop: int) -> QuantizedLinear:
    """Rows start..stop of `ql` (views, no copy)."""
    zp = ql.zero_point[start:stop] if np.ndim(ql.zero_point) else ql.zero_point
    return QuantizedLinear(ql.q[start:stop], ql.scales[start:stop], zp, ql.bits,
                           None if ql.offsets is None else ql.offsets[start:stop])
