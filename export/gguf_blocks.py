"""int4 straight from a GGUF file's own quantized blocks, instead of quantizing its dequantized weights again.

A model that came from a GGUF file is already quantized: re-quantizing its dequantized weights adds a second
rounding on top of the first. On SmolLM2 (Q4_1) onnxruntime's 4-bit quantizer kept 71 % top-1 agreement with the
model it started from. Q4_1 stores each block of 32 weights as w = d * q + m (q in 0..15); MatMulNBits computes
s * (q - z) with an integer zero point z, which cannot hold an arbitrary float minimum m. So each block is centred
(`centred`): z = round(-m / d), and the residual r = m + d * z (|r| <= d / 2) goes into a small side product, exactly:

    x @ W = MatMulNBits(x; q, scale d, zero point z)  +  blocksum(x) @ R      (R[b, n] = r of block b, row n)

where blocksum(x) sums each block of 32 inputs: for SmolLM2 a (1, 18) @ (18, N) product per matmul, against
(1, 576) @ (576, N) for the weights. Q4_0 (w = d * (q - 8)) and Q8_0 (w = d * q) need no side product.
(A float zero point z = -m / d, which the op's spec allows, is exact with no side product, but onnxruntime 1.31's
CPU kernel then dequantizes the whole matrix on every call: ~40x slower per matmul.)
Other GGUF types return None and the caller falls back to onnxruntime's quantizer.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from backend.formats.gguf_blocks import (BLOCK, QuantizedLinear, decode_blocks, dequantize, matching,  # noqa: F401
                                         quantized_linears, stack, unpermute)


def gguf_of(source: str, folder: Path) -> Path | None:
    """The GGUF file behind `source` (resolved to the converted `folder`), if it came from one and still exists."""
    from backend.loading import default_gguf_path

    if source == "default":
        return default_gguf_path()
    if str(source).lower().endswith(".gguf") and Path(source).expanduser().is_file():
        return Path(source).expanduser()
    try:  # e.g. a converted folder passed directly: backend/formats/gguf.py notes where it came from
        path = Path(json.loads((Path(folder) / "source.json").read_text())["gguf"])
    except (OSError, ValueError, KeyError):
        return None
    return path if path.is_file() else None


def centred(ql: QuantizedLinear) -> QuantizedLinear:
    """Q4_1 (w = d * q + m) as w = d * (q - z) + r with the integer zero point z = round(-m / d) per block and the
    residual r = m + d * z, |r| <= d / 2 where 0 <= -m / d <= 15. Same weights; what changes is the error of
    MatMulNBits' int8 activations, which multiplies the kernel's own part of the weights: d * (q - z), about w,
    where with z = 0 it was d * q = w - m, up to twice as large as any weight of the block (4x the KL on SmolLM2).
    llama.cpp's Q4_1 x Q8_1 dot product has the same error as the centred form."""
    if ql.offsets is None or ql.bits != 4:
        return ql
    d, m = ql.scales, ql.offsets                                             # (N, K / 32)
    with np.errstate(divide="ignore", invalid="ignore"):                    # d = 0: z = 0, r = m
        z = np.where(np.isfinite(m / d), np.rint(-m / d), 0)
    z = np.clip(z, 0, 2**ql.bits - 1).astype(np.uint8)
    residual = (m + d * z).astype(np.float32)                               # d * z is exact: f16 d times z <= 15
    return QuantizedLinear(ql.q, d, z, ql.bits, residual if residual.any() else None)


def pack(ql: QuantizedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits inputs: B (N, K/32, 32*bits/8) uint8, scales (N*K/32,), zero points (packed like B)."""
    N, K = ql.q.shape
    blocks = ql.q.reshape(N, K // BLOCK, BLOCK)
    nblk = K // BLOCK
    zp = np.broadcast_to(np.asarray(ql.zero_point, dtype=np.uint8), (N, nblk))
    if ql.bits == 4:
        B = (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)    # element 2i low nibble, 2i+1 high
        zp = np.pad(zp, ((0, 0), (0, nblk % 2)))                               # rows of zero points pad to bytes
        zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    else:
        B = blocks.astype(np.uint8)
        zp = np.ascontiguousarray(zp)
    return B, ql.scales.reshape(-1).astype(np.float32), zp.reshape(-1)


def transcode(model_path: Path, out_path: Path, linears: dict[str, QuantizedLinear], weights: dict[str, np.ndarray],
              accuracy_level=4) -> int:
    """Replace every MatMul whose weight is one of `weights` (our Linear name -> (out, in) float array) by the
    GGUF blocks of that Linear. Returns how many were replaced; the others stay as they are."""
    model = onnx.load(str(model_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    by_shape: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        if name in linears:
            by_shape.setdefault(tuple(w.T.shape), []).append(name)
    nodes, replaced, used = [], 0, set()
    for node in graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        match = None
        if init is not None and tuple(init.dims) in by_shape:
            value = numpy_helper.to_array(init)
            match = next((n for n in by_shape[tuple(init.dims)] if n not in used and np.array_equal(value, weights[n].T)),
                         None)
        if match is None:
            nodes.append(node)
            continue
        used.add(match)
        level = accuracy_level(match) if callable(accuracy_level) else accuracy_level
        nodes.extend(_nbits_nodes(graph, node, linears[match], match, level))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    live = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out_path))
    return replaced


def _nbits_nodes(graph, node, ql: QuantizedLinear, name: str, accuracy_level: int) -> list:
    N, K = ql.q.shape
    B, scales, zp = pack(ql)
    tag = name.replace(".", "_")
    for arr, suffix in ((B, "B"), (scales, "scales"), (zp, "zp")):
        graph.initializer.append(numpy_helper.from_array(arr, f"{tag}.{suffix}"))
    x, y = node.input[0], node.output[0]
    main = y if ql.offsets is None else f"{tag}.nbits_out"
    out = [helper.make_node("MatMulNBits", [x, f"{tag}.B", f"{tag}.scales", f"{tag}.zp"], [main],
                            name=f"{tag}/MatMulNBits", domain="com.microsoft", K=K, N=N, bits=ql.bits,
                            block_size=BLOCK, accuracy_level=accuracy_level)]
    if ql.offsets is not None:  # + blocksum(x) @ R, the blocks' residual offsets (one MatMul by a (K, K / 32)
        # indicator instead of Reshape + ReduceSum: fewer nodes, but measured no faster)
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, K // BLOCK, BLOCK], np.int64),
                                                         f"{tag}.block_shape"))
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{tag}.last_axis"))
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(ql.offsets.T), f"{tag}.offsets"))
        out += [helper.make_node("Reshape", [x, f"{tag}.block_shape"], [f"{tag}.x_blocks"], name=f"{tag}/Reshape"),
                helper.make_node("ReduceSum", [f"{tag}.x_blocks", f"{tag}.last_axis"], [f"{tag}.x_sums"],
                                 name=f"{tag}/ReduceSum", keepdims=0),
                helper.make_node("MatMul", [f"{tag}.x_sums", f"{tag}.offsets"], [f"{tag}.offset_out"],
                                 name=f"{tag}/MatMulOffsets"),
                helper.make_node("Add", [main, f"{tag}.offset_out"], [y], name=f"{tag}/Add")]
    return out
