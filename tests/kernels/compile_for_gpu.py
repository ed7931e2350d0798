"""Compile every kernel ahead of time for an H100 (sm_90) with Triton's bundled ptxas: no GPU needed.

The interpreter runs kernels as plain Python, so a construct the compiler rejects (or a type error only the real
code generator sees) would pass the interpreted tests; this catches it on a CPU-only machine. Run as a script
without TRITON_INTERPRET (test_gpu_compile.py does); prints one line per kernel and exits 1 on any failure.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels  # noqa: E402,F401
from kernels.utils import attention_config  # noqa: E402

M = {name: sys.modules[f"kernels.{name}"] for name in (
    "rms_norm", "layer_norm", "rotary", "swiglu", "gelu", "attention", "decode_attention", "cross_entropy")}
P, F, I = "*bf16", "*fp32", "i32"


def case(module, kernel, types, constexprs, num_warps=4, num_stages=3):
    fn = getattr(M[module], kernel)
    names = [n for n in fn.arg_names if n not in constexprs]
    assert len(names) == len(types), (kernel, names)
    signature = dict(zip(names, types)) | {n: "constexpr" for n in constexprs}
    return kernel, fn, signature, constexprs, dict(num_warps=num_warps, num_stages=num_stages)


def attn(cfg):
    return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}, dict(num_warps=cfg["num_warps"],
                                                                        num_stages=cfg["num_stages"])


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
    strides = [I] * 9
    for dtype, D in (("bf16", 128),) if quick else (("bf16", 128), ("bf16", 64), ("fp32", 64)):
        ptr = f"*{dtype}"
        prec = "ieee" if dtype == "fp32" else "default"
        consts, opts = attn(attention_config(D, 4 if dtype == "fp32" else 2))
        yield case("attention", "_attn_fwd_kernel", [ptr] * 4 + [F] + strides + [I] * 5 + ["fp32"],
                   dict(CAUSAL=True, DOT_PRECISION=prec, **consts), **opts)
        consts, opts = attn(attention_config(D, 4 if dtype == "fp32" else 2, backward=True))
        yield case("attention", "_attn_bwd_dkdv_kernel", [ptr] * 4 + [F, F, ptr, ptr] + strides + [I] * 6 +
                   ["fp32", "fp32"], dict(CAUSAL=True, DOT_PRECISION=prec, **consts), **opts)
        yield case("attention", "_attn_bwd_dq_kernel", [ptr] * 4 + [F, F, ptr] + strides + [I] * 5 +
                   ["fp32", "fp32"], dict(CAUSAL=True, DOT_PRECISION=prec, **consts), **opts)
    yield case("decode_attention", "_decode_partial_kernel", [P, P, P, "*i32", F, F] + [I] * 11 + ["fp32", I, I],
               dict(DOT_PRECISION="default", BLOCK_G=16, BLOCK_N=64, BLOCK_D=128))
    yield case("decode_attention", "_decode_combine_kernel", [F, F, P, I, I], dict(BLOCK_S=64, BLOCK_D=128))
    yield case("cross_entropy", "_ce_fwd_kernel", [P, "*i64", F, F] + [I] * 4, dict(BLOCK_SIZE=4096, **one),
               num_warps=8)
    yield case("cross_entropy", "_ce_grad_kernel", [P, "*i64", F, P, F] + [I] * 5, dict(BLOCK_SIZE=4096, **one),
               num_warps=8)


def main() -> int:
    """`--quick`: every kernel once, attention in bf16 at head dim 128 only (the fp32 variants compile slowly)."""
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, fn, signature, constexprs, options in cases("--quick" in sys.argv):
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
            print(f"ok   {name} {constexprs} cubin {len(compiled.asm['cubin'])} B, shared {compiled.metadata.shared} B")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAIL {name} {constexprs}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
