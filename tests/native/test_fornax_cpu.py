"""native/fornax_cpu.c's block matmul against a float64 reference, in each of its three builds (the AVX-512 VNNI
or AVX2 loops -march=native picks here, AVX2 alone, and the portable C), at odd shapes, M = 1 to 5, 1 and 2 threads."""
import numpy as np
import pytest

import native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")

BUILDS = {"native": None,
          "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"],
          "portable": ["-O3", "-march=x86-64", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]}
SHAPES = [(1, 37, 576), (1, 64, 1536), (2, 33, 96), (4, 37, 96), (5, 130, 576), (1, 7, 32), (3, 8, 1536)]


@pytest.fixture(scope="module", params=list(BUILDS))
def lib(request, tmp_path_factory):
    return native.load(tmp_path_factory.getbasetemp() / "native-builds", BUILDS[request.param])


def q4_1(rng, N, K):
    codes = rng.integers(0, 16, (N, K))
    d = rng.uniform(1e-3, 2e-2, (N, K // 32)).astype(np.float16)
    m = (-rng.uniform(0, 0.15, (N, K // 32))).astype(np.float16)
    w = d.astype(np.float64).repeat(32, 1) * codes + m.astype(np.float64).repeat(32, 1)
    return native.pack_q4_1(codes, d, m), codes, d, m, w


def q8_0(rng, N, K):
    codes = rng.integers(-127, 128, (N, K))
    d = rng.uniform(1e-3, 2e-2, (N, K // 32)).astype(np.float16)
    return native.pack_q8_0(codes, d), codes, d, None, d.astype(np.float64).repeat(32, 1) * codes


def q8_activations(x):
    """llama.cpp's Q8_1 of x, in float64: scale amax / 127 per block of 32, values rounded to the nearest int."""
    M, K = x.shape
    xb = x.reshape(M, K // 32, 32)
    dx = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(dx > 0, np.float32(1) / np.where(dx > 0, dx, 1), 0).astype(np.float32)
    return np.rint(xb * inv[..., None]).astype(np.float64), dx.astype(np.float64)


def reference(x, codes, d, m):
    """sum over blocks of dw * dx * (q . qx) + mw * dx * sum(qx), in float64: the product the kernel computes."""
    qx, dx = q8_activations(x)
    c = codes.reshape(codes.shape[0], -1, 32).astype(np.float64)
    y = (np.einsum("mbk,nbk->mnb", qx, c) * d.astype(np.float64)[None] * dx[:, None]).sum(-1)
    if m is not None:
        y += (m.astype(np.float64)[None] * (dx * qx.sum(-1))[:, None]).sum(-1)
    return y


@pytest.mark.parametrize("layout", ["row-major", "interleaved"])
@pytest.mark.parametrize("kind", [q4_1, q8_0])
@pytest.mark.parametrize("M,N,K", SHAPES + [(9, 16, 64)])
def test_block_matmul_is_the_q8_product_exactly(lib, kind, M, N, K, layout):
    rng = np.random.default_rng(M * 1000 + N + K)
    packed, codes, d, m, w = kind(rng, N, K)
    if layout == "interleaved":   # groups of 8 rows; N = 37, 33, 130, 7 leave a padded last group
        packed = native.interleave(packed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    want = reference(x, codes, d, m)
    for threads in (1, 2):
        got = native.matmul(lib, packed, x, threads)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    # and what that product is worth: the float product, to the activations' rounding (~1 / 254 of a block's max)
    exact = x.astype(np.float64) @ w.T
    assert np.abs(got - exact).max() < 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("kind", [q4_1, q8_0])
@pytest.mark.parametrize("M,N,K", SHAPES[:5])
def test_float_activations_are_the_float_product(lib, kind, M, N, K):
    rng = np.random.default_rng(M + N + K)
    packed, _, _, _, w = kind(rng, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    got = native.matmul(lib, packed, x, 2, float_acts=True)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T, rtol=0, atol=1e-5 * np.abs(x @ w.T).max())


def test_the_block_minimum_uses_the_quantized_sum(lib):
    # sum_i (dw q_i + mw) * dx qx_i: with the exact float sum of x in the minimum's term instead, the result would
    # drift from the quantized product by mw * (sum x - dx sum qx) per block; a block whose minimum dominates shows it
    rng = np.random.default_rng(7)
    codes = np.zeros((4, 64), np.int64)
    d = np.full((4, 2), 1e-3, np.float16)
    m = np.full((4, 2), -1.0, np.float16)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    got = native.matmul(lib, native.pack_q4_1(codes, d, m), x, 1)
    qx, dx = q8_activations(x)
    np.testing.assert_allclose(got, np.full((1, 4), -(dx * qx.sum(-1)).sum()), rtol=1e-6)


def test_a_bad_matrix_is_refused(lib):
    rng = np.random.default_rng(0)
    packed = q4_1(rng, 4, 64)[0]
    with pytest.raises(ValueError, match="must be"):
        native.matmul(lib, packed, np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="row-major"):
        native.matmul(lib, native.interleave(packed), np.zeros((1, 64), np.float32), float_acts=True)


def test_the_interleaved_layout_puts_row_j_in_lane_j():
    codes = (np.arange(16 * 32).reshape(16, 32) // 32 + np.arange(32)[None] * 0) % 16   # row n: every code n
    p = native.interleave(native.pack_q4_1(codes, np.ones((16, 1), np.float16), np.zeros((16, 1), np.float16)))
    chunk = p["codes"][1, :32]                       # group 1 (rows 8..15), block 0, chunk 0
    assert [int(chunk[4 * j]) & 0x0F for j in range(8)] == list(range(8, 16))
    assert p["scales"].shape == (2, 1, 8)


def test_no_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native.NativeUnavailable, match="does not run|failed"):
        native.build(tmp_path)
    monkeypatch.delenv("CC")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        native.build(tmp_path)


def test_a_build_is_reused_and_keyed_by_its_flags(tmp_path):
    first = native.build(tmp_path)
    assert native.build(tmp_path) == first
    other = native.build(tmp_path, BUILDS["portable"])
    assert other != first and other.is_file()
    assert not list(tmp_path.glob("*/.tmp-*"))


def test_exp_and_swiglu_rows_match_numpy(lib):
    # softmax's e^(x - max) and SiLU's e^-x, over the range they see (and past it: clamped, never inf or nan)
    x = np.concatenate([np.linspace(-100, 0, 997), np.linspace(-20, 20, 1003)]).astype(np.float32)
    y = np.empty_like(x)
    total = lib.fx_exp_row(x.ctypes.data, 0.0, y.ctypes.data, x.size)
    want = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-37)
    assert total == pytest.approx(want.sum(), rel=1e-6)
    g, u = np.linspace(-120, 120, 1001).astype(np.float32), np.linspace(2, -2, 1001).astype(np.float32)
    want = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
    lib.fx_swiglu_row(g.ctypes.data, u.ctypes.data, g.size)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, want, rtol=2e-6, atol=1e-30)
