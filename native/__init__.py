"""Fornax's native CPU code: fornax_cpu.c, a Llama-family forward pass over GGUF's Q4_1 / Q8_0 blocks.

Built at first use by the C compiler that is here (`cc`, else `gcc`), with -march=native for the machine it runs on,
into a folder the caller names (the backend gives its cache); a build is keyed by the source, the compiler and the
CPU's flags, so a new machine or a changed source builds again (~2 s). No compiler, or a failed build: `load` raises
NativeUnavailable saying why, and the backend keeps its other paths. Depends on the standard library and numpy only.

    python -m native          # build here and say what was built, or why not
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("fornax_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]
BLOCK = 32
MAX_BLOCKS = 1024   # fornax_cpu.c's: a matrix of at most 32768 inputs
_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL] = {}


class NativeUnavailable(RuntimeError):
    """The native library cannot be built or loaded here (the message says why)."""


class QMatrix(ctypes.Structure):
    """One weight matrix as GGUF blocks (fornax_cpu.c's QMatrix)."""
    _fields_ = [("rows", ctypes.c_int32), ("cols", ctypes.c_int32), ("bits", ctypes.c_int32), ("float_acts", ctypes.c_int32),
                ("interleaved", ctypes.c_int32), ("pad", ctypes.c_int32), ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("qkv", QMatrix), ("proj", QMatrix), ("gate_up", QMatrix), ("down", QMatrix),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p)]


class ModelDesc(ctypes.Structure):
    _fields_ = [("n_layer", ctypes.c_int32), ("dim", ctypes.c_int32), ("n_head", ctypes.c_int32),
                ("n_kv_head", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("ffn", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("rope_len", ctypes.c_int32), ("eps", ctypes.c_float),
                ("pad", ctypes.c_int32), ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("lm_head", QMatrix), ("layers", ctypes.POINTER(Layer))]


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key(cc: str, flags: list[str]) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(), _cpu_flags().encode(),
                 platform.machine().encode()):
        h.update(part)
    return h.hexdigest()[:16]


def build(folder: str | os.PathLike, flags: list[str] | None = None) -> Path:
    """The shared library for this source, compiler, flags and CPU under `folder`, compiled now if missing."""
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler here (cc or gcc): the native CPU path needs one to build")
    flags = list(FLAGS if flags is None else flags)
    try:
        key = build_key(cc, flags)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"the C compiler {cc} does not run: {e}") from e
    lib = Path(folder) / key / "libfornax_cpu.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".tmp-") as tmp:   # atomic: a killed build leaves no lib
        out = Path(tmp) / lib.name
        try:
            run = subprocess.run([cc, *flags, "-o", str(out), str(SOURCE), "-lm"], capture_output=True, text=True,
                                 timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            raise NativeUnavailable(f"building {SOURCE.name} failed: {e}") from e
        if run.returncode != 0:
            raise NativeUnavailable(f"building {SOURCE.name} with {cc} failed: {run.stderr.strip()[-800:]}")
        os.replace(out, lib)
    return lib


def load(folder: str | os.PathLike, flags: list[str] | None = None) -> ctypes.CDLL:
    """The built library, loaded once per process (and per set of flags)."""
    with _lock:
        path = build(folder, flags)
        if path not in _loaded:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise NativeUnavailable(f"loading {path.name} failed: {e}") from e
            P, I = ctypes.c_void_p, ctypes.c_int
            lib.fx_new.restype, lib.fx_new.argtypes = P, [ctypes.POINTER(ModelDesc)]
            lib.fx_check.restype, lib.fx_check.argtypes = I, [ctypes.POINTER(ModelDesc)]
            lib.fx_free.restype, lib.fx_free.argtypes = None, [P]
            lib.fx_start.restype, lib.fx_start.argtypes = I, [P, I, I]
            lib.fx_forward.restype, lib.fx_forward.argtypes = I, [P, P, I, I, I, P, I]
            lib.fx_matmul.restype, lib.fx_matmul.argtypes = I, [ctypes.POINTER(QMatrix), P, I, P, I]
            lib.fx_exp_row.restype, lib.fx_exp_row.argtypes = ctypes.c_float, [P, ctypes.c_float, P, I]
            lib.fx_swiglu_row.restype, lib.fx_swiglu_row.argtypes = None, [P, P, I]
            _loaded[path] = lib
        return _loaded[path]


# ---- GGUF blocks in the layout fornax_cpu.c reads -----------------------------------------------------------------

def pack_q4_1(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> dict[str, np.ndarray]:
    """Q4_1 as codes (N, K) in 0..15, scales and minima (N, K / 32) (fp16 values): 16 bytes a block, input j of the
    block in the low nibble of byte j and input j + 16 in the high one (GGUF's own order)."""
    N, K = codes.shape
    blocks = codes.reshape(N, K // BLOCK, BLOCK).astype(np.uint8)
    packed = blocks[..., :16] | (blocks[..., 16:] << 4)
    return {"bits": 4, "codes": np.ascontiguousarray(packed.reshape(N, -1)),
            "scales": np.ascontiguousarray(scales, dtype=np.float16), "mins": np.ascontiguousarray(mins, dtype=np.float16)}


def pack_q8_0(codes: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
    """Q8_0 as signed codes (N, K) in -127..127 and scales (N, K / 32)."""
    return {"bits": 8, "codes": np.ascontiguousarray(codes, dtype=np.int8),
            "scales": np.ascontiguousarray(scales, dtype=np.float16), "mins": None}


GROUP = 8


def interleave(packed: dict) -> dict:
    """The same blocks in fornax_cpu.c's interleaved layout: groups of 8 rows (the last one padded with zero rows),
    each block's codes laid out so that lane j of an 8-lane dot product holds row j's codes for 4 inputs."""
    codes, scales, mins = packed["codes"], packed["scales"], packed["mins"]
    N, nb = scales.shape
    G = -(-N // GROUP)
    pad = lambda a: np.concatenate([a, np.zeros((G * GROUP - N, *a.shape[1:]), a.dtype)]) if G * GROUP > N else a  # noqa: E731
    by_group = lambda a: np.ascontiguousarray(pad(a).reshape(G, GROUP, nb).transpose(0, 2, 1))  # (G, nb, 8)  # noqa: E731
    if packed["bits"] == 4:
        nib = pad(codes).reshape(G, GROUP, nb, 16)                       # byte j: input j low, input j + 16 high
        lo, hi = nib & 0x0F, nib >> 4                                    # inputs 0..15, 16..31 of each block
        chunk = lambda q: q.reshape(G, GROUP, nb, 4, 4).transpose(0, 2, 3, 1, 4)  # (G, nb, chunk c, row j, 4)  # noqa: E731
        out = (chunk(lo) | (chunk(hi) << 4)).astype(np.uint8)
    else:
        q = pad(codes).reshape(G, GROUP, nb, 8, 4)                       # (G, row, block, chunk k, 4 inputs)
        out = q.transpose(0, 2, 3, 1, 4)
    return {"bits": packed["bits"], "interleaved": True, "rows": N, "codes": np.ascontiguousarray(out).reshape(G, -1),
            "scales": by_group(scales), "mins": None if mins is None else by_group(mins)}


def qmatrix(packed: dict, bias: np.ndarray | None = None, float_acts: bool = False) -> QMatrix:
    """The C view of `packed` (the arrays must outlive it: the caller keeps `packed`). float_acts: multiply the
    dequantized weights by float activations instead of int8 ones (exact in fp32, slower)."""
    inter = bool(packed.get("interleaved"))
    N = packed["rows"] if inter else packed["codes"].shape[0]
    K = packed["scales"].shape[1] * BLOCK
    if inter and float_acts:
        raise ValueError("float activations read the row-major layout: do not interleave that matrix")
    ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    if bias is not None:
        packed["bias"] = np.ascontiguousarray(bias, dtype=np.float32)
    return QMatrix(N, K, packed["bits"], int(float_acts), int(inter), 0, ptr(packed["codes"]), ptr(packed["scales"]), ptr(packed["mins"]),
                   ptr(packed.get("bias")))


def matmul(lib: ctypes.CDLL, packed: dict, x: np.ndarray, threads: int = 1, float_acts: bool = False) -> np.ndarray:
    """x (M, K) float32 @ W^T -> (M, N), with x quantized per block of 32 as the forward pass does."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    W = qmatrix(packed, float_acts=float_acts)
    if x.ndim != 2 or x.shape[1] != W.cols:
        raise ValueError(f"x must be (M, {W.cols}), not {x.shape}")
    y = np.empty((x.shape[0], W.rows), np.float32)
    rc = lib.fx_matmul(ctypes.byref(W), x.ctypes.data, x.shape[0], y.ctypes.data, threads)
    if rc:
        raise RuntimeError(f"fx_matmul failed ({rc})")
    return y
