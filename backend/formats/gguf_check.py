"""A bounded walk over a GGUF file's header, key/values and tensor table, before the `gguf` package reads it.

`gguf.GGUFReader` trusts every count the file declares: an array declared 2^62 items long in a 49-byte file makes
it loop past the end, building ~1 KB of Python objects per item. This walk reads only lengths, never values it
does not need, and checks each declared count x item size against the bytes left in the file and against the
caps of `backend.limits` (string and array lengths, vocabulary, token length, merges, metadata bytes, tensors,
parameters), so a hostile file is refused in milliseconds with a message that names the offending field.

Layout (GGUF v2/v3, little-endian): b"GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv x (string key,
u32 type, value), then n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset), padding
to `general.alignment` (32), tensor data. A string is u64 length + UTF-8 bytes; an array is u32 item type + u64
count + items.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .. import limits
from ..errors import ModelLoadError

# GGUF value type -> fixed size in bytes (STRING = 8 and ARRAY = 9 are variable).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
MAX_TENSORS = 1 << 16        # llama.cpp models have a few thousand
MAX_DIMS = 4                 # GGML_MAX_DIMS
MAX_NAME_BYTES = 1024        # keys and tensor names (llama.cpp: 64 for tensor names)
MAX_ARRAY_DEPTH = 2          # an array of arrays at most
DEQUANTIZED_BYTES = 4        # every tensor is converted to fp32 (backend/formats/gguf.py)
# Keys whose arrays are one entry per vocabulary token / per merge.
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
_MERGES_KEY = "tokenizer.ggml.merges"


@dataclass
class GGUFSummary:
    version: int
    n_tensors: int
    n_kv: int
    metadata_bytes: int      # header + key/values + tensor table
    data_offset: int         # where tensor data starts
    n_params: int            # elements over all tensors
    largest_tensor: int = 0  # elements of the largest tensor


class _Walker:
    """Reads little-endian values from a file, never past its end."""

    def __init__(self, f, size: int, name: str):
        self.f, self.size, self.name = f, size, name
        self.pos = 0

    def fail(self, message: str):
        raise ModelLoadError(f"{self.name} is not a valid GGUF file: {message}")

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} needs {n:,} bytes at offset {self.pos:,} but the file has {self.size - self.pos:,} "
                      f"left (truncated, or a count that lies)")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.f.read(n)
        self.pos += n
        return data

    def skip(self, n: int, what: str):
        self.need(n, what)
        self.pos += n
        self.f.seek(self.pos)

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.read(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.read(8, what))[0]

    def string_length(self, what: str, cap: int) -> int:
        n = self.u64(f"the length of {what}")
        if n > cap:
            self.fail(f"{what} is declared {n:,} bytes long (at most {cap:,} allowed)")
        self.need(n, what)
        return n

    def string(self, what: str, cap: int) -> str:
        raw = self.read(self.string_length(what, cap), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")


def check_gguf(path: str | Path, caps: limits.Limits | None = None) -> GGUFSummary:
    """Walk a GGUF file's metadata and tensor table with every declared size bounded; raise ModelLoadError (or
    limits.LimitError for a cap) naming the first problem. Reads O(metadata) bytes, allocates O(1) per item."""
    path = Path(path)
    caps = caps or limits.current()
    size = path.stat().st_size
    with open(path, "rb") as f:
        w = _Walker(f, size, path.name)
        magic = w.read(4, "the magic number") if size >= 4 else w.fail(f"it is only {size} bytes long")
        if magic != b"GGUF":
            w.fail(f"its first bytes are {magic!r}, not b'GGUF'")
        version = w.u32("the version")
        if version not in (2, 3):
            w.fail(f"version {version} is not supported (GGUF v2 and v3 are)")
        n_tensors, n_kv = w.u64("the tensor count"), w.u64("the key/value count")
        if n_tensors > MAX_TENSORS:
            w.fail(f"it declares {n_tensors:,} tensors (at most {MAX_TENSORS:,} allowed)")
        # Each key/value takes at least 8 (key length) + 1 + 4 (type) + 1 bytes; each tensor at least 8 + 1 + 4
        # + 8 + 4 + 8: a count the remaining bytes cannot hold is refused before any loop runs.
        w.need(n_kv * 14 + n_tensors * 33, f"{n_kv:,} key/values and {n_tensors:,} tensors")
        alignment, array_items = 32, 0
        for i in range(n_kv):
            key = w.string(f"key {i}", MAX_NAME_BYTES)
            vtype = w.u32(f"the type of {key}")
            if key == "general.alignment" and vtype in _INT_FORMATS:
                fmt = _INT_FORMATS[vtype]
                alignment = struct.unpack(fmt, w.read(struct.calcsize(fmt), key))[0]
                if alignment < 1 or alignment & (alignment - 1) or alignment > 1 << 16:
                    w.fail(f"general.alignment = {alignment} is not a power of two up to 65536")
                continue
            array_items += _skip_value(w, key, vtype, caps, depth=0)
            if array_items > caps.max_gguf_array_items:
                limits.check(array_items, caps.max_gguf_array_items, f"{path.name}: the number of metadata array items")
            if w.pos > caps.max_gguf_metadata_bytes:
                limits.check(w.pos, caps.max_gguf_metadata_bytes, f"{path.name}: the GGUF metadata size (bytes)")
        tensors, n_params = [], 0
        names = set()
        for i in range(n_tensors):
            name = w.string(f"the name of tensor {i}", MAX_NAME_BYTES)
            if name in names:
                w.fail(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = w.u32(f"the rank of tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                w.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [w.u64(f"a dimension of tensor {name}") for _ in range(n_dims)]
            ggml_type, offset = w.u32(f"the type of tensor {name}"), w.u64(f"the offset of tensor {name}")
            n = 1
            for d in dims:
                if d < 1 or d > 1 << 40:
                    w.fail(f"tensor {name} has a dimension of {d:,}")
                n *= d
            if n > caps.max_model_params:
                limits.check(n, caps.max_model_params, f"{path.name}: tensor {name}'s element count")
            n_params += n
            tensors.append((name, dims, ggml_type, offset, n))
        limits.check(n_params, caps.max_model_params, f"{path.name}: the number of parameters")
        # every tensor becomes fp32 when dequantized: a compact quant type (IQ1_S: 1.56 bits a weight) makes a
        # small file a large model, so the bytes it will have are capped, not the bytes it has
        limits.check(n_params * DEQUANTIZED_BYTES, caps.max_model_bytes,
                     f"{path.name}: the weights' size once dequantized to fp32 (bytes)")
        metadata_bytes = w.pos
        data_offset = -(-metadata_bytes // alignment) * alignment
        for name, dims, ggml_type, offset, n in tensors:
            n_bytes = _tensor_bytes(w, name, dims, ggml_type, n)
            if offset % alignment:
                w.fail(f"tensor {name}'s offset {offset:,} is not a multiple of the alignment {alignment}")
            end = data_offset + offset + n_bytes
            if end > size:
                w.fail(f"tensor {name} is truncated: it needs bytes up to {end:,} but the file has {size:,}")
    largest = max((n for *_, n in tensors), default=0)
    return GGUFSummary(version, n_tensors, n_kv, metadata_bytes, data_offset, n_params, largest)


def _skip_value(w: _Walker, key: str, vtype: int, caps: limits.Limits, depth: int) -> int:
    """Step over one value; returns the number of array items it held (what gguf's reader makes objects of)."""
    if vtype in _FIXED:
        w.skip(_FIXED[vtype], key)
        return 0
    if vtype == _STRING:
        w.skip(w.string_length(key, caps.max_gguf_metadata_bytes), key)
        return 0
    if vtype != _ARRAY:
        w.fail(f"{key} has an unknown value type {vtype}")
    if depth >= MAX_ARRAY_DEPTH:
        w.fail(f"{key} nests arrays deeper than {MAX_ARRAY_DEPTH}")
    itype, count = w.u32(f"the item type of {key}"), w.u64(f"the length of {key}")
    if key in _VOCAB_KEYS:
        limits.check(count, caps.max_vocab, f"{w.name}: the vocabulary size ({key})")
    elif key == _MERGES_KEY:
        limits.check(count, caps.max_merges, f"{w.name}: the number of BPE merges ({key})")
    limits.check(count, caps.max_gguf_array_items, f"{w.name}: the length of the array {key}")
    if itype in _FIXED:
        w.skip(count * _FIXED[itype], f"the {count:,} items of {key}")
        return count
    # Variable-size items: each takes at least 8 bytes (a string's length; an array's type + length is 12).
    w.need(count * 8, f"the {count:,} items of {key}")
    items = count
    for j in range(count):
        if itype == _STRING:
            cap = caps.max_token_bytes if key == "tokenizer.ggml.tokens" else caps.max_gguf_metadata_bytes
            what = f"token {j}" if key == "tokenizer.ggml.tokens" else f"item {j} of {key}"
            w.skip(w.string_length(what, cap), what)
        else:
            items += _skip_value(w, f"{key}[{j}]", itype, caps, depth + 1)
    return items


def _tensor_bytes(w: _Walker, name: str, dims: list[int], ggml_type: int, n: int) -> int:
    import gguf

    try:
        block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        w.fail(f"tensor {name} has an unknown tensor type {ggml_type}")
    if dims[0] % block:
        w.fail(f"tensor {name}'s first dimension {dims[0]} is not a multiple of its type's block size {block}")
    return n // block * type_bytes


def check_hf_shapes(state: dict, cfg) -> None:
    """Every tensor of an HF-named state dict has the shape `cfg` implies (and none is missing or extra), checked
    on shape-only "meta" tensors: a GGUF whose vocabulary or widths disagree with its tensors is refused before
    the converted fp32 copy is written."""
    import torch

    from .hf import hf_to_fornax
    from ..models.transformer import Transformer

    meta = {k: torch.empty(tuple(v.shape), device="meta") for k, v in state.items()}
    ours = hf_to_fornax(meta, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, p in model.state_dict().items():
        if tuple(ours[name].shape) != tuple(p.shape):
            raise ModelLoadError(f"tensor {name} has shape {tuple(ours[name].shape)} but the config implies "
                                 f"{tuple(p.shape)} (vocabulary {cfg.vocab_size}, width {cfg.d_model})")
