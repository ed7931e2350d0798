"""What every op shares: the device check, launch sizes (one heuristic for all ops) and op registration.

Triton decides at decoration time whether a `@triton.jit` function runs compiled or in its CPU interpreter, so
`INTERPRET` is read once, when `kernels` is first imported: set `TRITON_INTERPRET=1` before that.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
NEEDS_CUDA = ("Triton kernels need a CUDA GPU; set TRITON_INTERPRET=1 to run them in Triton's interpreter "
              "on CPU tensors")
MAX_FUSED_BYTES = 65536  # one row must fit one program's registers / shared memory
SHARED_MEMORY_BYTES = 232448  # 227 KB: the most shared memory one block may have on an H100 / H200 (sm_90)


def check_device(*tensors: torch.Tensor | None) -> None:
    """Raise a plain RuntimeError when the kernels cannot run on these tensors here."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if INTERPRET:
        if any(t.device.type != "cpu" for t in tensors):
            raise RuntimeError("Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors only; "
                               "move the tensors to the CPU")
        return
    if not torch.cuda.is_available():
        raise RuntimeError(NEEDS_CUDA)
    if any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError("Triton kernels run on CUDA tensors; move the tensors to the GPU "
                           f"(got {sorted({str(t.device) for t in tensors})})")


def row_config(n_cols: int, element_size: int = 4) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for kernels where one program handles one row of `n_cols` elements."""
    block = triton.next_power_of_2(max(n_cols, 1))
    if block * element_size > MAX_FUSED_BYTES:
        raise RuntimeError(f"rows of {n_cols} elements are too long for one fused program "
                           f"(at most {MAX_FUSED_BYTES // element_size})")
    num_warps = 4
    if block >= 2048:
        num_warps = 8
    if block >= 8192:
        num_warps = 16
    if block >= 32768:
        num_warps = 32
    return block, num_warps


def chunk_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for kernels that loop over a long row (cross-entropy) in chunks."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), 4096 if not INTERPRET else 1024)
    return block, (8 if block >= 2048 else 4)


def elementwise_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for 2-D elementwise kernels tiled over (rows, column blocks)."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    return block, (4 if block <= 512 else 8)


def attention_config(head_dim: int, element_size: int = 2, backward: bool = False) -> dict:
    """Tiles for flash attention: BLOCK_M query rows x BLOCK_N keys, the head dim padded to BLOCK_D; smaller tiles
    and fewer pipeline stages as a row of the head widens (D * element size: 256 B for bf16 D=128, 512 B for fp32
    D=128 or bf16 D=256, 1 KB for fp32 D=256) so shared memory holds them (SHARED_MEMORY_BYTES; the AOT test
    tests/kernels/compile_for_gpu.py --wide reads what each build takes), and for the backward, which keeps four
    (BLOCK, BLOCK_D) tiles live."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if INTERPRET:  # fewer, larger tiles: the interpreter's cost is per tile, not per element
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
    row_bytes = block_d * element_size
    wide, widest = row_bytes > 256, row_bytes >= 1024
    warps = 8 if block_d >= 128 else 4
    if backward:
        return dict(BLOCK_M=32 if wide else 64, BLOCK_N=32 if wide else 64, BLOCK_D=block_d, num_warps=warps,
                    num_stages=1 if wide else 2)
    return dict(BLOCK_M=64 if wide else 128, BLOCK_N=32 if wide else 64, BLOCK_D=block_d, num_warps=warps,
                num_stages=1 if widest else 2 if wide else 3)


GRID_AXIS0_MAX, GRID_AXIS12_MAX = 2**31 - 1, 65535  # CUDA's launch limits on grid axes 0 and 1 / 2


def folded_grid(n_blocks: int, n_rows: int) -> tuple[int]:
    """A 1-D grid of n_blocks x n_rows programs (the kernel splits program_id(0) into row = pid // n_blocks and
    block = pid % n_blocks): axis 1 would cap batch x heads, or positions, at 65,535."""
    n = n_blocks * n_rows
    if n > GRID_AXIS0_MAX:
        raise RuntimeError(f"{n_rows} x {n_blocks} programs are more than one launch takes ({GRID_AXIS0_MAX})")
    return (n,)


def num_programs(n_rows: int) -> int:
    """Programs for row-reduction kernels that accumulate per-program partial sums (norm weight grads)."""
    if INTERPRET or not torch.cuda.is_available():
        return max(1, min(n_rows, 4))
    return max(1, min(n_rows, torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count * 2))


def register(name: str, fake):
    """Register `fn` as `fornax::name`: a `triton_op` on the GPU (torch.compile sees into its kernels), a
    `custom_op` with an explicit fake in the interpreter (where kernels are not JIT functions aot can trace)."""
    def wrap(fn):
        if INTERPRET:
            op = custom_op(f"fornax::{name}", mutates_args=())(fn)
            op.register_fake(fake)
        else:
            op = triton_op(f"fornax::{name}", mutates_args=())(fn)
        return op
    return wrap


def launch(kernel):
    """`kernel` ready for `[grid](...)`: wrapped for torch.compile when compiled, as is in the interpreter."""
    return kernel if INTERPRET else wrap_triton(kernel)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N) with a unit column stride (a view whenever possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """`PRECISION` for `dot`: fp32 stays fp32-exact ("ieee"; tf32 would lose ~1e-3); bf16/fp16 use the tensor cores.
    Triton 3.9's interpreter multiplies bf16 tiles wrongly (garbage of ~1e10), so there they are upcast: a bf16
    product is exact in fp32, which is what the GPU's fp32 accumulation computes too."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if INTERPRET else "default"


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation; PRECISION from `dot_precision`."""
    if PRECISION == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISION == "default":
        c = tl.dot(a, b)
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


DECODE_TILE_BYTES = 32768  # one (BLOCK_N, BLOCK_D) K or V tile of decode attention


def decode_config(cache_len: int, n_kv_programs: int, head_dim: int = 128, element_size: int = 2) -> dict:
    """BLOCK_N, SPLIT_LEN, NUM_SPLITS, num_warps, num_stages for split-K decode attention over a static cache of
    `cache_len` slots of `head_dim` elements of `element_size` bytes.

    The loop pipelines its K and V tiles through shared memory, (num_stages - 1) of each in flight, so BLOCK_N
    halves until one tile is at most DECODE_TILE_BYTES: 64 keys for bf16 up to D=256 and fp32 up to D=128
    (~140 KB at 3 stages, measured), 32 for fp32 at D=256 (64 keys there took ~276 KB, past Hopper's 227 KB).
    Enough splits to give every SM about two programs (B * Hk alone is far too few at batch 1), each split a
    multiple of BLOCK_N; the split count depends on the cache size only, so one decode step has one shape."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 32 if INTERPRET else 64
    while block_n > 16 and block_n * block_d * element_size > DECODE_TILE_BYTES:
        block_n //= 2
    if INTERPRET or not torch.cuda.is_available():
        target = 4
    else:
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        target = max(1, min(64, triton.cdiv(2 * sms, n_kv_programs)))
    split_len = triton.cdiv(triton.cdiv(cache_len, target), block_n) * block_n
    return dict(BLOCK_N=block_n, SPLIT_LEN=split_len, NUM_SPLITS=triton.cdiv(cache_len, split_len), num_warps=4,
                num_stages=1 if INTERPRET else 3)


def rows_per_program(block_size: int) -> int:
    """Rows one program of a row-wise kernel handles (a power of two). One on the GPU, where each row is already
    a full program's work; many in the interpreter, whose cost is per program and per op, not per element."""
    return max(1, min(64, 8192 // block_size)) if INTERPRET else 1
