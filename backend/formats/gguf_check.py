"""A bounded walk over a GGUF file's header, key/values and tensor table: the one reader of a GGUF's metadata.

`gguf.GGUFReader` trusts every count the file declares: an array declared 2^62 items long in a 49-byte file makes
it loop past the end, building ~1 KB of Python objects per item. This walk checks each declared count x item size
against the bytes left in the file and against the caps of `backend.limits` (string and array lengths, vocabulary,
token length, merges, metadata bytes, tensors, parameters) before it reads a value, so a hostile file is refused in
milliseconds with a message that names the offending field. `check_gguf` only steps over the values;
`read_gguf_layout` keeps them (as `ReaderField.contents()` gives them) and the tensor table, so the conversion
(backend/formats/gguf.py) needs no second walk.

Layout (GGUF v2/v3, little-endian): b"GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv x (string key,
u32 type, value), then n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset), padding
to `general.alignment` (32), tensor data. A string is u64 length + UTF-8 bytes; an array is u32 item type + u64
count + items.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import limits
from ..errors import ModelLoadError

# GGUF value type -> fixed size in bytes (STRING = 8 and ARRAY = 9 are variable).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_SCALAR_FORMATS = {**_INT_FORMATS, 6: "<f", 7: "<?", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                 12: "<f8"}
_U64 = struct.Struct("<Q")
MAX_TENSORS = 1 << 16        # llama.cpp models have a few thousand
MAX_DIMS = 4                 # GGML_MAX_DIMS
MAX_NAME_BYTES = 1024        # keys and tensor names (llama.cpp: 64 for tensor names)
MAX_ARRAY_DEPTH = 2          # an array of arrays at most
DEQUANTIZED_BYTES = 4        # every tensor is converted to fp32 (backend/formats/gguf.py)
# Keys whose arrays are one entry per vocabulary token / per merge.
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
_MERGES_KEY = "tokenizer.ggml.merges"
_UNDECODABLE = object()      # a value that is not UTF-8: left out of the metadata, as gguf's reader leaves it


@dataclass
class GGUFSummary:
    version: int
    n_tensors: int
    n_kv: int
    metadata_bytes: int      # header + key/values + tensor table
    data_offset: int         # where tensor data starts
    n_params: int            # elements over all tensors
    largest_tensor: int = 0  # elements of the largest tensor


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table, checked: its bytes lie inside the file."""
    name: str
    dims: tuple[int, ...]    # GGUF order, innermost first (numpy's shape is the reverse)
    ggml_type: int
    offset: int              # from the start of the file
    n_elements: int
    n_bytes: int


@dataclass
class GGUFLayout:
    """What `read_gguf_layout` read: the summary, the metadata values and the tensor table."""
    summary: GGUFSummary
    meta: dict = field(default_factory=dict)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    alignment: int = 32


class _Walker:
    """Reads little-endian values from a file's bytes (a read-only mmap), never past its end."""

    def __init__(self, buf, size: int, name: str):
        self.buf, self.size, self.name = buf, size, name
        self.pos = 0

    def fail(self, message: str):
        raise ModelLoadError(f"{self.name} is not a valid GGUF file: {message}")

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} needs {n:,} bytes at offset {self.pos:,} but the file has {self.size - self.pos:,} "
                      f"left (truncated, or a count that lies)")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def skip(self, n: int, what: str):
        self.need(n, what)
        self.pos += n

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
    return _walk(Path(path), caps or limits.current(), keep=False).summary


def read_gguf_layout(path: str | Path, caps: limits.Limits | None = None) -> GGUFLayout:
    """`check_gguf`'s walk (the same checks, the same errors), keeping the metadata values and the tensor table.
    The values are those gguf's `GGUFReader` gives (`ReaderField.contents()`, plus its GGUF.version /
    GGUF.tensor_count / GGUF.kv_count fields), each array decoded in bulk; a string value that is not UTF-8 is left
    out, as there."""
    return _walk(Path(path), caps or limits.current(), keep=True)


def _walk(path: Path, caps: limits.Limits, keep: bool) -> GGUFLayout:
    size = path.stat().st_size
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    try:
        return _walk_bytes(_Walker(buf, size, path.name), caps, keep)
    finally:
        if size:
            try:
                buf.close()
            except BufferError:  # a view still alive (an error's traceback): the mmap goes with it
                pass


def _walk_bytes(w: _Walker, caps: limits.Limits, keep: bool) -> GGUFLayout:
    name_of_file, size = w.name, w.size
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
    meta = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv} if keep else {}
    alignment, array_items, keys = 32, 0, set()
    for i in range(n_kv):
        key = w.string(f"key {i}", MAX_NAME_BYTES)
        if key in keys:
            w.fail(f"key {key!r} appears twice")
        keys.add(key)
        vtype = w.u32(f"the type of {key}")
        if key == "general.alignment":
            if vtype != _UINT32:
                w.fail(f"general.alignment has value type {vtype}, not uint32 (4)")
            alignment = w.u32(key)
            if alignment < 1 or alignment & (alignment - 1) or alignment > 1 << 16:
                w.fail(f"general.alignment = {alignment} is not a power of two up to 65536")
            meta[key] = alignment
            continue
        items, value = _value(w, key, vtype, caps, 0, keep)
        array_items += items
        if keep and value is not _UNDECODABLE:
            meta[key] = value
        if array_items > caps.max_gguf_array_items:
            limits.check(array_items, caps.max_gguf_array_items, f"{name_of_file}: the number of metadata array items")
        if w.pos > caps.max_gguf_metadata_bytes:
            limits.check(w.pos, caps.max_gguf_metadata_bytes, f"{name_of_file}: the GGUF metadata size (bytes)")
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
            limits.check(n, caps.max_model_params, f"{name_of_file}: tensor {name}'s element count")
        n_params += n
        tensors.append((name, dims, ggml_type, offset, n))
    limits.check(n_params, caps.max_model_params, f"{name_of_file}: the number of parameters")
    # every tensor becomes fp32 when dequantized: a compact quant type (IQ1_S: 1.56 bits a weight) makes a
    # small file a large model, so the bytes it will have are capped, not the bytes it has
    limits.check(n_params * DEQUANTIZED_BYTES, caps.max_model_bytes,
                 f"{name_of_file}: the weights' size once dequantized to fp32 (bytes)")
    metadata_bytes = w.pos
    data_offset = -(-metadata_bytes // alignment) * alignment
    infos = []
    for name, dims, ggml_type, offset, n in tensors:
        n_bytes = _tensor_bytes(w, name, dims, ggml_type, n)
        if offset % alignment:
            w.fail(f"tensor {name}'s offset {offset:,} is not a multiple of the alignment {alignment}")
        end = data_offset + offset + n_bytes
        if end > size:
            w.fail(f"tensor {name} is truncated: it needs bytes up to {end:,} but the file has {size:,}")
        infos.append(GGUFTensorInfo(name, tuple(dims), ggml_type, data_offset + offset, n, n_bytes))
    largest = max((n for *_, n in tensors), default=0)
    summary = GGUFSummary(version, n_tensors, n_kv, metadata_bytes, data_offset, n_params, largest)
    return GGUFLayout(summary, meta, infos if keep else [], alignment)


def _value(w: _Walker, key: str, vtype: int, caps: limits.Limits, depth: int, keep: bool) -> tuple[int, object]:
    """Step over one value: (the number of array items it held, what gguf's reader makes objects of; its value
    when `keep`, else None)."""
    if vtype in _FIXED:
        if not keep:
            w.skip(_FIXED[vtype], key)
            return 0, None
        return 0, struct.unpack(_SCALAR_FORMATS[vtype], w.read(_FIXED[vtype], key))[0]
    if vtype == _STRING:
        n = w.string_length(key, caps.max_gguf_metadata_bytes)
        if not keep:
            w.skip(n, key)
            return 0, None
        return 0, _decode(w.read(n, key))
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
        start = w.pos
        w.skip(count * _FIXED[itype], f"the {count:,} items of {key}")
        return count, np.frombuffer(w.buf, _ARRAY_DTYPES[itype], count, start).tolist() if keep else None
    # Variable-size items: each takes at least 8 bytes (a string's length; an array's type + length is 12).
    w.need(count * 8, f"the {count:,} items of {key}")
    if itype == _STRING:
        return count, _strings(w, key, count, caps, keep)
    items, values = count, [] if keep else None
    for j in range(count):
        n, value = _value(w, f"{key}[{j}]", itype, caps, depth + 1, keep)
        items += n
        if keep and values is not _UNDECODABLE:  # gguf's reader flattens an array of arrays into one list
            if value is _UNDECODABLE:
                values = _UNDECODABLE
            else:
                values += value
    return items, values


def _strings(w: _Walker, key: str, count: int, caps: limits.Limits, keep: bool):
    """`count` strings (a vocabulary: ~50k-250k): their lengths read with one unpack each, the errors those of
    `_Walker.string_length` (raised by calling it where an item is bad); decoded once all are in bounds."""
    tokens = key == "tokenizer.ggml.tokens"
    cap = caps.max_token_bytes if tokens else caps.max_gguf_metadata_bytes
    buf, size, pos, unpack = w.buf, w.size, w.pos, _U64.unpack_from
    spans = [] if keep else None
    for j in range(count):
        n = unpack(buf, pos)[0] if pos + 8 <= size else -1
        if n < 0 or n > cap or pos + 8 + n > size:  # say what is wrong, naming the item
            w.pos = pos
            what = f"token {j}" if tokens else f"item {j} of {key}"
            w.skip(w.string_length(what, cap), what)
            w.fail(f"{what} is out of bounds")  # (not reached: string_length raised)
        if keep:
            spans.append(buf[pos + 8:pos + 8 + n])
        pos += 8 + n
    w.pos = pos
    if not keep:
        return None
    try:
        return [s.decode("utf-8") for s in spans]
    except UnicodeDecodeError:
        return _UNDECODABLE


def _decode(raw: bytes):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _UNDECODABLE


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
