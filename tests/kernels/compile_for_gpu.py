"""Compile every kernel ahead of time for an H100/H200 (sm_90) with Triton's bundled ptxas: no GPU needed.

The interpreter runs kernels as plain Python, so a construct the compiler rejects (or a type error only the real
code generator sees) would pass the interpreted tests; this catches it on a CPU-only machine. It also reads each
build's shared memory (`metadata.shared`) against Hopper's 227 KB per block: a launch past it fails with
OutOfResources, which only a real GPU (or this) sees. Run as a script without TRITON_INTERPRET
(test_gpu_compile.py does); prints one line per kernel and exits 1 on any failure.

    python tests/kernels/compile_for_gpu.py [--quick] [--wide]

`--quick`: every kernel once, attention in bf16 at head dim 128 only. `--wide`: the attention and decode kernels
only, with the configs the pickers choose for fp32 and bf16 at head dims 64, 128 and 256.
Pointers, strides and the head dim are compiled as multiples of 16 (what a launch on contiguous tensors
specialises to): that is what lets Triton pipeline loads through shared memory, the case that uses the most.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels  # noqa: E402,F401
from kernels.utils import SHARED_MEMORY_BYTES, attention_config, decode_config  # noqa: E402

M = {name: sys.modules[f"kernels.{name}"] for name in (
    "rms_norm", "layer_norm", "rotary", "swiglu", "gelu", "attention", "decode_attention", "cross_entropy")}
P, F, I = "*bf16", "*fp32", "i32"
ALIGNED_INTS = {"HEAD_DIM"}  # besides strides (names s*_*): ints a launch on contiguous tensors sees as 16k


def _aligned(name: str, ty: str) -> bool:
    return ty.startswith("*") or name in ALIGNED_INTS or (name.startswith("s") and "_" in name and ty == I)


def case(module, kernel, types, constexprs, num_warps=4, num_stages=3, label=""):
    fn = getattr(M[module], kernel)
    names = [n for n in fn.arg_names if n not in constexprs]
    assert len(names) == len(types), (kernel, names)
    signature = dict(zip(names, types)) | {n: "constexpr" for n in constexprs}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in zip(names, types) if _aligned(n, t)}
    return (f"{kernel} {label}".strip(), fn, signature, constexprs, attrs,
            dict(num_warps=num_warps, num_stages=num_stages))


def attn(cfg):
    return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}, dict(num_warps=cfg["num_warps"],
                                                                        num_stages=cfg["num_stages"])


def attention_cases(dtype: str, D: int):
    """The three flash-attention kernels and the two decode kernels with the configs the launchers pick."""
    ptr, size = f"*{dtype}", (4 if dtype == "fp32" else 2)
    prec = "ieee" if dtype == "fp32" else "default"
    strides = [I] * 9
    label = f"[{dtype} D={D}]"
    consts, opts = attn(attention_config(D, size))
    yield case("attention", "_attn_fwd_kernel", [ptr] * 4 + [F] + strides + [I] * 5 + ["fp32"],
               dict(CAUSAL=True, DOT_PRECISION=prec, **consts), label=label, **opts)
    consts, opts = attn(attention_config(D, size, backward=True))
    yield case("attention", "_attn_bwd_dkdv_kernel", [ptr] * 4 + [F, F, ptr, ptr] + strides + [I] * 6 +
               ["fp32", "fp32"], dict(CAUSAL=True, DOT_PRECISION=prec, **consts), label=label, **opts)
    yield case("attention", "_attn_bwd_dq_kernel", [ptr] * 4 + [F, F, ptr] + strides + [I] * 5 +
               ["fp32", "fp32"], dict(CAUSAL=True, DOT_PRECISION=prec, **consts), label=label, **opts)
    cfg = decode_config(32768, 8, D, size)
    block_d = max(16, triton.next_power_of_2(D))
    yield case("decode_attention", "_decode_partial_kernel", [ptr, ptr, ptr, "*i32", F, F] + [I] * 11 +
               ["fp32", I, I], dict(DOT_PRECISION=prec, BLOCK_G=16, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d),
               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], label=label)
    if dtype == "bf16":  # the combine kernel reads fp32 partials whatever the dtype: one build per head dim
        yield case("decode_attention", "_decode_combine_kernel", [F, F, ptr, I, I],
                   dict(BLOCK_S=64, BLOCK_D=block_d), label=label)


def cases(quick: bool):
    one = dict(BLOCK_ROWS=1)  # rows per program on the GPU (rows_per_program)
    yield case("rms_norm", "_rms_norm_fwd_kernel", [P] * 5 + [F] + [I] * 6 + ["fp32"],
               dict(HAS_RESIDUAL=True, BLOCK_SIZE=4096, **one), num_warps=8)
    yield case("rms_norm", "_rms_norm_bwd_kernel", [P, P, P, P, F, P, F] + [I] * 6,
               dict(HAS_DS=True, BLOCK_SIZE=1024, **one))
    yield case("layer_norm", "_layer_norm_fwd_kernel", [P] * 4 + [F, F] + [I] * 4 + ["fp32"],
               dict(HAS_BIAS=True, BLOCK_SIZE=1024, **one))
    yield case("layer_norm", "_layer_norm_bwd_kernel", [P, P, P, F, F, P, F, F] + [I] * 5,
               dict(BLOCK_SIZE=1024, **one))
    yield case("rotary", "_rotary_kernel", [P, P, F, F, P, P] + [I] * 12,
               dict(BACKWARD=True, BLOCK_T=1, BLOCK_H=32, BLOCK_HALF=64))
    yield case("swiglu", "_swiglu_fwd_kernel", [P, P, P] + [I] * 4, dict(BLOCK_SIZE=1024, **one), num_warps=8)
    yield case("swiglu", "_swiglu_bwd_kernel", [P] * 5 + [I] * 5, dict(BLOCK_SIZE=1024, **one), num_warps=8)
    yield case("gelu", "_gelu_tanh_kernel", [P, P, P] + [I] * 4, dict(BACKWARD=True, BLOCK_SIZE=1024, **one),
               num_warps=8)
    for dtype, D in (("bf16", 128),) if quick else (("bf16", 128), ("bf16", 64), ("fp32", 64)):
        yield from attention_cases(dtype, D)
    yield case("cross_entropy", "_ce_fwd_kernel", [P, "*i64", F, F] + [I] * 4, dict(BLOCK_SIZE=4096, **one),
               num_warps=8)
    yield case("cross_entropy", "_ce_grad_kernel", [P, "*i64", F, P, F] + [I] * 5, dict(BLOCK_SIZE=4096, **one),
               num_warps=8)


def wide_cases():
    for dtype in ("fp32", "bf16"):
        for D in (64, 128, 256):
            yield from attention_cases(dtype, D)


def compile_one(target, name, fn, signature, constexprs, attrs, options) -> tuple[bool, str]:
    """Compile one case: (fits, an `ok`/`FAIL` line with its shared memory); False on an error or shared memory past
    SHARED_MEMORY_BYTES."""
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    except Exception as e:  # noqa: BLE001
        return False, f"FAIL {name} {constexprs} {options}: {type(e).__name__}: {str(e)[:500]}"
    shared = compiled.metadata.shared
    fits = shared <= SHARED_MEMORY_BYTES
    return fits, (f"{'ok  ' if fits else 'FAIL'} {name} {constexprs} {options} cubin {len(compiled.asm['cubin'])} B, "
                  f"shared {shared} B" + ("" if fits else f" > {SHARED_MEMORY_BYTES} B (OutOfResources at launch)"))


def chosen_cases() -> list:
    return list(wide_cases() if "--wide" in sys.argv else cases("--quick" in sys.argv))


def compile_index(i: int) -> tuple[bool, str]:
    """One case in a worker process (forked: no CUDA here, nothing compiled yet)."""
    return compile_one(GPUTarget("cuda", 90, 32), *chosen_cases()[i])


def main() -> int:
    """Cases spread over the CPUs' worker processes (each compile is one CPU's work for seconds); lines in order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = len(chosen_cases())
    workers = max(1, min(n, len(os.sched_getaffinity(0))))
    failed = 0
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for ok, line in pool.map(compile_index, range(n)):
            print(line, flush=True)
            failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
