"""MatMulNBits as our exports build it, one node at a time, against a float reference: onnxruntime#29853 reports
that MLAS' AVX2 single-row (M = 1) int8-activation kernel errs badly (~46 %) when a `zero_points` input is given,
on CPUs without AVX-512 — the decode step of our int4 graphs, every MatMulNBits of which has zero points.

The reference dequantizes each node's own inputs as the op's spec says, w = (q - zp) * scale per block along K
(zp = 2**(bits - 1) when the input is absent), independently of export/gguf_blocks.py's packing, and computes
x @ w in float64. The bound, per output element:

* accuracy_level 4 (int8 activations): MLAS quantizes each row of x per block of `block_size` to int8 with the
  scale s_b = max|x_b| / 127, so each activation moves by at most s_b / 2 and |y_n - ref_n| <= sum over blocks b
  of s_b / 2 * sum_{k in b} |w_kn|; the integer dot products are exact. A worst case, not a fit: 3-9 % of max |ref|
  at these sizes, measured errors 13-32 % of it, and the reported bug (46 % of the output) far outside.
* accuracy_level 1 (float activations, our last layers): float32 rounding only, <= 1e-4 * sum_k |x_k w_kn| (the
  K-term float32 accumulation bound K * 2**-24 is 1.5e-5 at K = 256; a factor ~7 for blocked sums and FMA order).

Each gets 0.1 % of itself and 1e-6 absolute for the float arithmetic of the scales. M = 1 (decode) and M = 4
(prompt) run the same rows of x, so they must also agree with each other row for row within that bound.

The AVX2 kernels are reached on an AVX-512 machine too: `_FAKE_AVX2` (built with gcc where there is one) turns on
Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID; the `cpuid_fault` flag) in a child process and answers each
CPUID with the AVX-512 / AMX (and for "avx2" AVX-VNNI) bits cleared, so MLAS dispatches as on a Haswell / Zen 2
("avx2") or an Alder Lake ("avx2-vnni"). Measured: docs/export.md ("MatMulNBits on AVX2 (onnxruntime#29853)");
`python -m tests.export.test_matmulnbits_rows` prints the table.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import export.gguf_blocks as gb

# (K, N): 3 / 5 / 8 blocks of 32 (odd counts pad each row's zero points to a byte), N = 203 leaves a tail of
# columns, (256, 96) is the issue's own failing case
SHAPES = ((96, 72), (160, 203), (256, 96))
ROWS = 4                                    # M of the prompt-like run; the decode-like one is M = 1, row by row
ROOT = Path(__file__).resolve().parents[2]


# --- graphs, built by the exporter's own code ---

def _random_blocks(kind: str, K: int, N: int, rng: np.random.Generator) -> gb.QuantizedLinear:
    """GGUF-like blocks: Q4_1 centred as the int4 export writes it (an integer zero point per block; its residual
    side product is a separate, exact MatMul, left out here), Q4_0 (zero point 8) or Q8_0 (128, the output layer)."""
    nblk = K // gb.BLOCK
    d = rng.uniform(0.005, 0.05, (N, nblk)).astype(np.float16).astype(np.float32)
    if kind == "q8_0":
        return gb.QuantizedLinear(rng.integers(0, 256, (N, K)).astype(np.uint8), d, 128, 8, None)
    q = rng.integers(0, 16, (N, K)).astype(np.uint8)
    if kind == "q4_0":
        return gb.QuantizedLinear(q, d, 8, 4, None)
    m = (-d * rng.uniform(0, 15, (N, nblk))).astype(np.float16).astype(np.float32)
    return dataclasses.replace(gb.centred(gb.QuantizedLinear(q, d, 0, 4, m)), offsets=None)


def _matmul_graph(K: int, N: int, nodes: list, inits: list) -> onnx.ModelProto:
    """x (1, M, K) -> y (1, M, N), as the decode graph feeds its matmuls (batch 1, M positions)."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "M", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "M", N])], inits)
    return helper.make_model(graph, ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def gguf_graph(kind: str, K: int, N: int, level: int, zero_points: bool, seed: int) -> onnx.ModelProto:
    """One MatMulNBits node exactly as gguf_blocks.transcode writes it (its `_nbits_nodes`); without the
    zero_points input only where the zero point is the op's default anyway (Q4_0, Q8_0)."""
    ql = _random_blocks(kind, K, N, np.random.default_rng(seed))
    model = _matmul_graph(K, N, [], [])
    nodes = gb._nbits_nodes(model.graph, helper.make_node("MatMul", ["x", "w"], ["y"]), ql, "w", level)
    assert len(nodes) == 1
    if not zero_points:
        assert np.all(ql.zero_point == 2 ** (ql.bits - 1))
        del nodes[0].input[3]
        keep = [t for t in model.graph.initializer if t.name != "w.zp"]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    model.graph.node.extend(nodes)
    return model


def quantizer_graph(quant: str, K: int, N: int, seed: int) -> onnx.ModelProto:
    """A float MatMul put through export.onnx_export.quantize, the int8 (8 bits, blocks of 16) and int4 (4 bits,
    blocks of 32) path of every non-GGUF source: asymmetric, accuracy_level 4."""
    from export.onnx_export import quantize

    w = np.random.default_rng(seed).normal(0, 0.05, (K, N)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(_matmul_graph(K, N, [helper.make_node("MatMul", ["x", "w"], ["y"])],
                                [numpy_helper.from_array(w, "w")]), f"{tmp}/fp32.onnx")
        quantize(Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx", quant)
        return onnx.load(f"{tmp}/q.onnx")


def configurations() -> list[tuple[str, int, int, Callable[[int], onnx.ModelProto]]]:
    """(name, K, N, seed -> graph) for every kind of MatMulNBits our exports write, at each of SHAPES."""
    out = []
    for K, N in SHAPES:
        g = lambda kind, level, zp, K=K, N=N: lambda seed: gguf_graph(kind, K, N, level, zp, seed)  # noqa: E731
        q = lambda quant, K=K, N=N: lambda seed: quantizer_graph(quant, K, N, seed)  # noqa: E731
        for level in (4, 1):  # int8 activations (every int4 layer but the last) / float ones (FLOAT_LAYERS)
            out += [(f"q4_1-centred L{level}", K, N, g("q4_1", level, True)),
                    (f"q4_0 L{level}", K, N, g("q4_0", level, True)),
                    (f"q4_0 L{level} no-zp", K, N, g("q4_0", level, False))]
        out += [("q8_0 L4", K, N, g("q8_0", 4, True)), ("q8_0 L4 no-zp", K, N, g("q8_0", 4, False)),
                ("quantizer-int8 L4", K, N, q("int8")), ("quantizer-int4 L4", K, N, q("int4"))]
    return out


# --- the reference ---

def spec_weights(model: onnx.ModelProto) -> tuple[np.ndarray, int, int]:
    """(K, N) float64 weights of the graph's one MatMulNBits node per the op's spec, its block size and
    accuracy_level. B is (N, blocks, block * bits / 8), element 2i in the low nibble for 4 bits; zero points
    (N, ceil(blocks * bits / 8)) packed the same way, each row padded to a byte; scales (N, blocks)."""
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attr = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    K, N, bits, bs = attr["K"], attr["N"], attr["bits"], attr["block_size"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nblk = -(-K // bs)
    B = inits[node.input[1]].reshape(N, nblk, -1)
    q = np.stack([B & 0x0F, B >> 4], axis=-1).reshape(N, nblk, bs) if bits == 4 else B
    scales = inits[node.input[2]].reshape(N, nblk).astype(np.float64)
    if len(node.input) > 3 and node.input[3]:
        zp = inits[node.input[3]].reshape(N, -1)
        zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(N, -1)[:, :nblk] if bits == 4 else zp
    else:
        zp = np.full((N, nblk), 2 ** (bits - 1))
    w = (q.astype(np.float64) - zp[..., None]) * scales[..., None]    # (N, blocks, bs)
    return w.reshape(N, K).T, bs, attr.get("accuracy_level", 0)


def bound(x: np.ndarray, w: np.ndarray, block: int, level: int) -> np.ndarray:
    """(M, N) worst-case error of each output element for x (M, K) @ w (K, N) (module docstring)."""
    M, K = x.shape
    if level == 4:
        half_step = np.abs(x).reshape(M, K // block, block).max(-1) / 127 / 2     # (M, blocks): s_b / 2
        b = half_step @ np.abs(w).reshape(K // block, block, -1).sum(1)           # (M, blocks) @ (blocks, N)
    else:
        b = 1e-4 * (np.abs(x) @ np.abs(w))
    return b * 1.001 + 1e-6


def measure(fake: str = "") -> dict:
    """Every configuration on onnxruntime's CPU provider with 2 intra-op threads: the worst error over the bound
    (<= 1 passes) at M = 1, at M = 4 and between them, and the worst error and bound relative to max |ref|."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.log_severity_level = 3
    out = {}
    for i, (name, K, N, build) in enumerate(configurations()):
        model = build(i)
        w, block, level = spec_weights(model)
        x = np.random.default_rng(100 + i).normal(0, 1, (ROWS, K)).astype(np.float32)
        x[:, 7] *= 8  # one outlier channel, as real activations have
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        y4 = sess.run(None, {"x": x[None]})[0][0].astype(np.float64)                              # (M, N)
        y1 = np.concatenate([sess.run(None, {"x": x[None, r:r + 1]})[0][0] for r in range(ROWS)])  # M = 1 each
        y1 = y1.astype(np.float64)
        ref, b = x.astype(np.float64) @ w, bound(x.astype(np.float64), w, block, level)
        scale = np.abs(ref).max()
        out[f"{name} K{K} N{N}"] = {
            "m1_over_bound": float((np.abs(y1 - ref) / b).max()),
            "m4_over_bound": float((np.abs(y4 - ref) / b).max()),
            "m1_vs_m4_over_bound": float((np.abs(y1 - y4) / b).max()),
            "m1_rel": float(np.abs(y1 - ref).max() / scale), "m4_rel": float(np.abs(y4 - ref).max() / scale),
            "bound_rel": float(b.max() / scale)}
    return {"cpu": fake or "native", "onnxruntime": ort.__version__, "cases": out}


def _check(run: dict) -> None:
    bad = {name: c for name, c in run["cases"].items()
           if max(c["m1_over_bound"], c["m4_over_bound"], c["m1_vs_m4_over_bound"]) > 1}
    assert not bad, f"MatMulNBits beyond the int8-activation bound on {run['cpu']} CPU: {json.dumps(bad, indent=1)}"


# --- emulating an AVX2-only CPU ---

_FAKE_AVX2 = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>
#define ARCH_SET_CPUID 0x1012
static struct sigaction previous;
static int keep_vnni, answered;
static void on_segv(int sig, siginfo_t *info, void *ctx) {
    greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (ip[0] != 0x0F || ip[1] != 0xA2) { sigaction(SIGSEGV, &previous, NULL); return; }  /* a real fault */
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {  /* AVX-512 F DQ IFMA PF ER CD BW VL, VBMI VBMI2 VNNI BITALG VPOPCNTDQ, AMX FP16 */
        b &= ~(1u << 16 | 1u << 17 | 1u << 21 | 1u << 26 | 1u << 27 | 1u << 28 | 1u << 30 | 1u << 31);
        c &= ~(1u << 1 | 1u << 6 | 1u << 11 | 1u << 12 | 1u << 14);
        d &= ~(1u << 2 | 1u << 3 | 1u << 8 | 1u << 22 | 1u << 23 | 1u << 24 | 1u << 25);
        answered++;
    } else if (leaf == 7 && sub == 1) {  /* AVX512_BF16, AVX-IFMA, AVX-VNNI-INT8/NE-CONVERT/INT16, AVX-VNNI */
        a &= ~(1u << 5 | 1u << 23 | (keep_vnni ? 0u : 1u << 4));
        d &= ~(1u << 4 | 1u << 5 | 1u << 10);
    }
    g[REG_RAX] = a; g[REG_RBX] = b; g[REG_RCX] = c; g[REG_RDX] = d; g[REG_RIP] += 2;
}
int fake_avx2(int vnni) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    keep_vnni = vnni;
    if (sigaction(SIGSEGV, &sa, &previous) != 0) return -1;
    return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
int fake_avx2_answered(void) { return answered; }
"""


def cpu_flags() -> set[str]:
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def fake_cpu_library(folder: Path) -> Path | None:
    """The CPUID shim as a shared library, or None where it cannot work (not x86-64 Linux, no gcc, no CPUID
    faulting)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64" or shutil.which("gcc") is None \
            or "cpuid_fault" not in cpu_flags():
        return None
    (folder / "fake_avx2.c").write_text(_FAKE_AVX2)
    so = folder / "fake_avx2.so"
    done = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(folder / "fake_avx2.c")],
                          capture_output=True, text=True)
    return so if done.returncode == 0 else None


def measure_as(fake: str, so: Path) -> dict:
    """`measure` in a child process whose CPUID says `fake` ("avx2" or "avx2-vnni"); `answered` counts the
    feature queries it answered once onnxruntime was imported (0 would mean MLAS never asked: no emulation)."""
    script = (f"import ctypes, json\n"
              f"lib = ctypes.CDLL({str(so)!r})\n"
              f"assert lib.fake_avx2({int(fake == 'avx2-vnni')}) == 0\n"
              f"from tests.export.test_matmulnbits_rows import measure\n"
              f"before = lib.fake_avx2_answered()\n"
              f"run = measure({fake!r})\n"
              f"print(json.dumps({{**run, 'answered': lib.fake_avx2_answered() - before}}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the tests ---

def test_matmulnbits_rows_on_this_cpu():
    """Every MatMulNBits our exports write, on this machine's own kernels (AVX-512 where it has it): within the
    int8-activation bound at M = 1 and M = 4, and M = 1 agreeing with M = 4 row for row."""
    _check(measure())


@pytest.mark.parametrize("fake", ["avx2", "avx2-vnni"])
def test_matmulnbits_rows_on_an_avx2_cpu(fake, tmp_path):
    """The same on MLAS' AVX2 kernels (onnxruntime#29853's M = 1 int8 kernel with zero points among them), reached
    by hiding AVX-512 (and AVX-VNNI) from CPUID; on an AVX2-only machine the test above already ran them."""
    flags = cpu_flags()
    if "avx512f" not in flags and (fake == "avx2-vnni" or "avx_vnni" not in flags):
        pytest.skip("hiding features would change nothing here: test_matmulnbits_rows_on_this_cpu ran these kernels")
    so = fake_cpu_library(tmp_path)
    if so is None:
        pytest.skip("no CPUID faulting here (needs x86-64 Linux with the cpuid_fault flag, and gcc)")
    run = measure_as(fake, so)
    assert run["answered"] > 0  # onnxruntime asked for its CPU's features and got the AVX2 answer
    _check(run)


if __name__ == "__main__":  # python -m tests.export.test_matmulnbits_rows: the table for docs/export.md
    with tempfile.TemporaryDirectory() as tmp:
        so = fake_cpu_library(Path(tmp))
        runs = [measure()] + ([measure_as(f, so) for f in ("avx2", "avx2-vnni")] if so else [])
    print("CPU flags:", " ".join(sorted(f for f in cpu_flags() if "avx" in f or "amx" in f or f == "cpuid_fault")))
    for run in runs:
        print(f"# {run['cpu']} (onnxruntime {run['onnxruntime']})  error / bound; error, bound / max |ref|")
        for name, c in run["cases"].items():
            print(f"{name:28s} M=1 {c['m1_over_bound']:.3f}  M=4 {c['m4_over_bound']:.3f}  "
                  f"M=1 vs M=4 {c['m1_vs_m4_over_bound']:.3f}   M=1 {c['m1_rel']:.2e}  M=4 {c['m4_rel']:.2e}  "
                  f"bound {c['bound_rel']:.2e}")
