// Fornax's CPU decode path: a Llama-family forward pass over GGUF's own Q4_1 / Q8_0 blocks, in one call per step.
//
// Why a forward pass and not just a matmul: at SmolLM2-135M a decode step is ~200 matmuls and ~600 small
// operators; onnxruntime spends a quarter of its step between operators and another quarter on the side products
// that Q4_1's block minimum costs it (docs/benchmarks.md). Here one OpenMP parallel region runs the whole step, each
// stage split over the threads with one barrier after it.
//
// The matmul is llama.cpp's Q4_1 x Q8_1 dot: activations are quantized per block of 32 to int8 (scale dx, and the
// block's float sum sx), and a weight block w = dw * q + mw (q in 0..15) gives
//     sum_i w_i x_i  ~=  dw * dx * sum_i q_i qx_i  +  mw * sx
// so the minimum costs one multiply-add per block, nothing per weight. sx is the sum of the *quantized* block
// (dx * sum qx), as llama.cpp takes it: then the whole product is exactly sum_i w_i * (dx qx_i), the true weights
// times the quantized activations. The exact float sum looks closer but is not: it leaves the activations' rounding
// multiplied by dw * q = w - mw instead of w, up to twice the weight (KL 0.012 against 0.0031 on SmolLM2).
// Q8_0 (w = dw * q, q signed) is the same without mw.
//
// Built at first use by native/__init__.py with -march=native on the machine that runs it: the AVX-512 VNNI, AVX2
// and portable loops below are chosen by the compiler's own target macros.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define BLOCK 32

typedef struct {            // one weight matrix (rows = outputs, cols = inputs), as GGUF blocks of 32 inputs
    int32_t rows, cols;
    int32_t bits;           // 4: Q4_1 (codes: 16 bytes a block, input j in the low nibble of byte j, j+16 the high)
                            // 8: Q8_0 (codes: 32 signed bytes a block)
    int32_t float_acts;     // 1: multiply the dequantized weights by the float activations (slower, closer)
    int32_t interleaved;    // 1: groups of 8 rows interleaved (see matmul_interleaved), else row-major blocks
    int32_t pad;
    const uint8_t *codes;
    const uint16_t *scales; // (rows, cols / 32) fp16
    const uint16_t *mins;   // (rows, cols / 32) fp16, Q4_1 only; NULL for Q8_0
    const float *bias;      // (rows,) or NULL
} QMatrix;

typedef struct {            // rows of activations quantized per block of 32
    const float *f;         // the float rows they came from (row stride fstride), for float_acts matrices
    int fstride;
    int8_t *q;              // (rows, cols)
    float *d, *s;           // (rows, cols / 32): the block's scale, and the sum of its quantized values times it
} QActs;

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {                                            // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7F800000 | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

// ---- activations ----------------------------------------------------------------------------------------------

static void quantize_row(const float *x, int cols, int8_t *q, float *d, float *s) {
    for (int b = 0; b < cols / BLOCK; b++) {
        const float *xb = x + b * BLOCK;
        float amax = 0.f;
        for (int i = 0; i < BLOCK; i++) { float a = fabsf(xb[i]); amax = a > amax ? a : amax; }
        float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
        int sum = 0;
        for (int i = 0; i < BLOCK; i++) { q[b * BLOCK + i] = (int8_t)nearbyintf(xb[i] * inv); sum += q[b * BLOCK + i]; }
        d[b] = scale; s[b] = scale * (float)sum;
    }
}

void fx_quantize(const float *x, int rows, int cols, int8_t *q, float *d, float *s) {
    for (int r = 0; r < rows; r++)
        quantize_row(x + (size_t)r * cols, cols, q + (size_t)r * cols, d + (size_t)r * cols / BLOCK,
                     s + (size_t)r * cols / BLOCK);
}

// ---- the block dot products: up to 4 activation rows against one weight row -------------------------------------
//
// Per block the int8 dot product is scaled by dw * dx: those scales (and the minima's term) are worked out for the
// whole row first, so the block loop is load, unpack, dot, convert, multiply-add. `nr` is a constant in each
// instantiation below, so the accumulators stay in registers.

#define TILE 4
#define MAX_BLOCKS 1024     // rows of up to 32768 inputs (checked by fx_matmul, fx_check and the Python side)

#if defined(__AVX2__)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i dot_u8s8(__m256i u, __m256i s) {   // 8 int32 lanes: sums of u * s over groups of 4 bytes
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));  // |u| <= 128, |s| <= 127: no saturation
#endif
}

static inline __m256i dot_acc_u8s8(__m256i acc, __m256i u, __m256i s) {   // acc + dot_u8s8(u, s)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, dot_u8s8(u, s));
#endif
}

static inline __m256i weights_q4(const uint8_t *codes) {  // 16 bytes -> 32 codes in input order
    __m128i raw = _mm_loadu_si128((const __m128i *)codes);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}
#endif

// scale[r][b] = dw[b] * dx[r][b], and minterm[r] = sum_b mw[b] * sx[r][b]
static inline void row_scales(const QMatrix *W, int n, const QActs *A, int row0, int nr, float scale[][MAX_BLOCKS],
                              float *minterm) {
    const int nb = W->cols / BLOCK;
    const uint16_t *wd = W->scales + (size_t)n * nb, *wm = W->mins ? W->mins + (size_t)n * nb : NULL;
    for (int r = 0; r < nr; r++) {
        const float *xd = A->d + (size_t)(row0 + r) * nb, *xs = A->s + (size_t)(row0 + r) * nb;
        int b = 0;
        float m = 0.f;
#if defined(__F16C__) && defined(__AVX2__)
        __m256 macc = _mm256_setzero_ps();
        for (; b + 8 <= nb; b += 8) {
            _mm256_storeu_ps(scale[r] + b, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b))),
                                                         _mm256_loadu_ps(xd + b)));
            if (wm) macc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b))),
                                           _mm256_loadu_ps(xs + b), macc);
        }
        m = hsum256(macc);
#endif
        for (; b < nb; b++) {
            scale[r][b] = fp16_to_fp32(wd[b]) * xd[b];
            if (wm) m += fp16_to_fp32(wm[b]) * xs[b];
        }
        minterm[r] = m;
    }
}

static inline __attribute__((always_inline)) void dot_rows_n(const QMatrix *W, int n, const QActs *A, int row0,
                                                              const int nr, float *out) {
    const int nb = W->cols / BLOCK;
    float scale[TILE][MAX_BLOCKS], minterm[TILE];
    row_scales(W, n, A, row0, nr, scale, minterm);
    const int8_t *xq = A->q + (size_t)row0 * W->cols;
#if defined(__AVX2__)
    __m256 acc[TILE];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    if (W->bits == 4 && nr == 1) {   // one row: four chains of multiply-adds, not one
        const uint8_t *codes = W->codes + (size_t)n * nb * 16;
        __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int b = 0;
        for (; b + 4 <= nb; b += 4) {
#define STEP(acc, k) acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(weights_q4(codes + (b + k) * 16), \
                         _mm256_loadu_si256((const __m256i *)(xq + (b + k) * BLOCK)))), \
                         _mm256_broadcast_ss(&scale[0][b + k]), acc)
            STEP(acc[0], 0); STEP(a1, 1); STEP(a2, 2); STEP(a3, 3);
        }
        for (; b < nb; b++) STEP(acc[0], 0);
#undef STEP
        acc[0] = _mm256_add_ps(_mm256_add_ps(acc[0], a1), _mm256_add_ps(a2, a3));
    } else if (W->bits == 4) {
        const uint8_t *codes = W->codes + (size_t)n * nb * 16;
        for (int b = 0; b < nb; b++) {
            const __m256i w = weights_q4(codes + b * 16);
            for (int r = 0; r < nr; r++) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)r * W->cols + b * BLOCK));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(w, x)), _mm256_broadcast_ss(&scale[r][b]), acc[r]);
            }
        }
    } else if (nr == 1) {
        const uint8_t *codes = W->codes + (size_t)n * nb * 32;
        __m256 a1 = _mm256_setzero_ps();
        int b = 0;
#define STEP(acc, k) do { const __m256i w = _mm256_loadu_si256((const __m256i *)(codes + (b + k) * 32)); \
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8( \
                  _mm256_loadu_si256((const __m256i *)(xq + (b + k) * BLOCK)), w))), \
                  _mm256_broadcast_ss(&scale[0][b + k]), acc); } while (0)
        for (; b + 2 <= nb; b += 2) { STEP(acc[0], 0); STEP(a1, 1); }
        for (; b < nb; b++) STEP(acc[0], 0);
#undef STEP
        acc[0] = _mm256_add_ps(acc[0], a1);
    } else {
        const uint8_t *codes = W->codes + (size_t)n * nb * 32;
        for (int b = 0; b < nb; b++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(codes + b * 32)), wabs = _mm256_sign_epi8(w, w);
            for (int r = 0; r < nr; r++) {   // |w| as unsigned, its sign moved onto x
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)r * W->cols + b * BLOCK));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(wabs, _mm256_sign_epi8(x, w))),
                                         _mm256_broadcast_ss(&scale[r][b]), acc[r]);
            }
        }
    }
    for (int r = 0; r < nr; r++) out[r] = hsum256(acc[r]) + minterm[r];
#else
    float acc[TILE] = {0};
    for (int b = 0; b < nb; b++) {
        int8_t w[BLOCK];
        if (W->bits == 4) {
            const uint8_t *raw = W->codes + ((size_t)n * nb + b) * 16;
            for (int j = 0; j < 16; j++) { w[j] = raw[j] & 0x0F; w[j + 16] = raw[j] >> 4; }
        } else {
            memcpy(w, W->codes + ((size_t)n * nb + b) * 32, BLOCK);
        }
        for (int r = 0; r < nr; r++) {
            const int8_t *x = xq + (size_t)r * W->cols + b * BLOCK;
            int32_t dot = 0;
            for (int j = 0; j < BLOCK; j++) dot += (int32_t)w[j] * x[j];
            acc[r] += scale[r][b] * (float)dot;
        }
    }
    for (int r = 0; r < nr; r++) out[r] = acc[r] + minterm[r];
#endif
}

// The same product with the weights dequantized (w = dw * q + mw) against the float activations: exact in fp32.
static void dot_rows_float(const QMatrix *W, int n, const QActs *A, int row0, int nr, float *out) {
    const int nb = W->cols / BLOCK;
    const uint16_t *wd = W->scales + (size_t)n * nb, *wm = W->mins ? W->mins + (size_t)n * nb : NULL;
    for (int r = 0; r < nr; r++) {
        const float *x = A->f + (size_t)(row0 + r) * A->fstride;
#if defined(__AVX2__)
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int b = 0; b < nb; b++) {
            const __m256 vd = _mm256_set1_ps(fp16_to_fp32(wd[b])), vm = _mm256_set1_ps(wm ? fp16_to_fp32(wm[b]) : 0.f);
            __m256i q[4];
            if (W->bits == 4) {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(W->codes + ((size_t)n * nb + b) * 16));
                const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
                q[0] = _mm256_cvtepu8_epi32(lo); q[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
                q[2] = _mm256_cvtepu8_epi32(hi); q[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
            } else {
                const uint8_t *raw = W->codes + ((size_t)n * nb + b) * 32;
                for (int k = 0; k < 4; k++) q[k] = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(raw + 8 * k)));
            }
            for (int k = 0; k < 4; k++)
                acc[k] = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(q[k]), vd, vm),
                                         _mm256_loadu_ps(x + b * BLOCK + 8 * k), acc[k]);
        }
        const float total = hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#else
        float total = 0.f;
        for (int b = 0; b < nb; b++) {
            float w[BLOCK];
            const float dw = fp16_to_fp32(wd[b]), mw = wm ? fp16_to_fp32(wm[b]) : 0.f;
            if (W->bits == 4) {
                const uint8_t *raw = W->codes + ((size_t)n * nb + b) * 16;
                for (int j = 0; j < 16; j++) { w[j] = dw * (raw[j] & 0x0F) + mw; w[j + 16] = dw * (raw[j] >> 4) + mw; }
            } else {
                const int8_t *raw = (const int8_t *)W->codes + ((size_t)n * nb + b) * 32;
                for (int j = 0; j < BLOCK; j++) w[j] = dw * raw[j];
            }
            for (int j = 0; j < BLOCK; j++) total += w[j] * x[b * BLOCK + j];
        }
#endif
        out[r] = total;
    }
}

static void dot_rows(const QMatrix *W, int n, const QActs *A, int row0, int nr, float *out) {
    if (W->float_acts) { dot_rows_float(W, n, A, row0, nr, out); return; }
    switch (nr) {   // one instantiation per tile height
        case 1: dot_rows_n(W, n, A, row0, 1, out); break;
        case 2: dot_rows_n(W, n, A, row0, 2, out); break;
        case 3: dot_rows_n(W, n, A, row0, 3, out); break;
        default: dot_rows_n(W, n, A, row0, 4, out); break;
    }
}

// ---- the interleaved layout: eight weight rows a group, one multiply-add chain for all eight -----------------------
//
// The row-major loops above need a horizontal sum per row and pay the per-block scaling once per row. Here a group
// of 8 output rows stores each block's codes so that one 8-lane dot product instruction covers all eight rows: lane
// j holds row j's codes for 4 consecutive inputs, and those 4 inputs of the activation are broadcast to every lane.
// Per group and block: 4-bit, 4 chunks of 32 bytes (chunk c: low nibbles = inputs 4c..4c+3, high nibbles = inputs
// 16+4c..16+4c+3, row j in bytes 4j..4j+3); 8-bit, 8 chunks (chunk k = inputs 4k..4k+3, signed). Scales and minima
// are (groups, blocks, 8) fp16. Rows past the matrix's last are zero padding, never written out.

#define GROUP 8

// out[r * GROUP + j] = row (g * 8 + j) . activation row (row0 + r), for r < nr
static inline __attribute__((always_inline)) void group_rows_n(const QMatrix *W, int g, const QActs *A, int row0,
                                                                const int nr, float *out) {
    const int nb = W->cols / BLOCK;
    const size_t chunk_bytes = W->bits == 4 ? 128 : 256;
    const uint8_t *codes = W->codes + (size_t)g * nb * chunk_bytes;
    const uint16_t *wd = W->scales + (size_t)g * nb * GROUP, *wm = W->mins ? W->mins + (size_t)g * nb * GROUP : NULL;
#if defined(__AVX2__) && defined(__F16C__)
    __m256 acc[TILE];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *cb = codes + (size_t)b * chunk_bytes;
        __m256i w[8];
        if (W->bits == 4) {
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(cb + 32 * c));
                w[c] = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
                w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
            }
        } else {
            for (int k = 0; k < 8; k++) w[k] = _mm256_loadu_si256((const __m256i *)(cb + 32 * k));
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + (size_t)b * GROUP)));
        const __m256 mw = wm ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + (size_t)b * GROUP)))
                             : _mm256_setzero_ps();
        for (int r = 0; r < nr; r++) {
            const size_t row = (size_t)(row0 + r);
            const int8_t *x = A->q + row * W->cols + b * BLOCK;
            __m256i p = _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) {   // inputs 4k..4k+3 of the block: k < 4 low nibbles of chunk k, else high
                int32_t four;
                memcpy(&four, x + 4 * k, 4);
                const __m256i xb = _mm256_set1_epi32(four);
                const __m256i wk = w[k];
                if (W->bits == 4) p = dot_acc_u8s8(p, wk, xb);
                else p = dot_acc_u8s8(p, _mm256_sign_epi8(wk, wk), _mm256_sign_epi8(xb, wk));
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_set1_ps(A->d[row * nb + b])), acc[r]);
            if (wm) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(A->s[row * nb + b]), acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) _mm256_storeu_ps(out + r * GROUP, acc[r]);
#else
    for (int r = 0; r < nr; r++) {
        const size_t row = (size_t)(row0 + r);
        for (int j = 0; j < GROUP; j++) {
            float total = 0.f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *cb = codes + (size_t)b * chunk_bytes;
                const int8_t *x = A->q + row * W->cols + b * BLOCK;
                int32_t dot = 0;
                for (int k = 0; k < 8; k++)
                    for (int t = 0; t < 4; t++) {
                        int code;
                        if (W->bits == 4) {
                            const uint8_t byte = cb[32 * (k & 3) + 4 * j + t];
                            code = k < 4 ? (byte & 0x0F) : (byte >> 4);
                        } else {
                            code = (int8_t)cb[32 * k + 4 * j + t];
                        }
                        dot += code * x[4 * k + t];
                    }
                total += fp16_to_fp32(wd[(size_t)b * GROUP + j]) * A->d[row * nb + b] * (float)dot;
                if (wm) total += fp16_to_fp32(wm[(size_t)b * GROUP + j]) * A->s[row * nb + b];
            }
            out[r * GROUP + j] = total;
        }
    }
#endif
}

static void group_rows(const QMatrix *W, int g, const QActs *A, int row0, int nr, float *out) {
    switch (nr) {
        case 1: group_rows_n(W, g, A, row0, 1, out); break;
        case 2: group_rows_n(W, g, A, row0, 2, out); break;
        case 3: group_rows_n(W, g, A, row0, 3, out); break;
        default: group_rows_n(W, g, A, row0, 4, out); break;
    }
}

static void matmul_interleaved(const QMatrix *W, const QActs *A, int rows, float *y, int ldy, int accumulate) {
    const int groups = (W->rows + GROUP - 1) / GROUP;
    #pragma omp for schedule(static)
    for (int g = 0; g < groups; g++) {
        const int valid = W->rows - g * GROUP < GROUP ? W->rows - g * GROUP : GROUP;
        for (int r0 = 0; r0 < rows; r0 += TILE) {
            const int nr = rows - r0 < TILE ? rows - r0 : TILE;
            float out[TILE * GROUP];
            group_rows(W, g, A, r0, nr, out);
            for (int r = 0; r < nr; r++)
                for (int j = 0; j < valid; j++) {
                    const int n = g * GROUP + j;
                    float *dst = y + (size_t)(r0 + r) * ldy + n;
                    const float v = out[r * GROUP + j] + (W->bias ? W->bias[n] : 0.f);
                    *dst = accumulate ? *dst + v : v;
                }
        }
    }
}

// y (rows x W->rows, row stride ldy) = A @ W^T (+ bias); accumulate: y += instead. Call inside a parallel region.
static void matmul_in_region(const QMatrix *W, const QActs *A, int rows, float *y, int ldy, int accumulate) {
    if (W->interleaved && !W->float_acts) { matmul_interleaved(W, A, rows, y, ldy, accumulate); return; }
    #pragma omp for schedule(static)
    for (int n = 0; n < W->rows; n++) {
        const float bias = W->bias ? W->bias[n] : 0.f;
        for (int r0 = 0; r0 < rows; r0 += TILE) {
            const int nr = rows - r0 < TILE ? rows - r0 : TILE;
            float out[TILE];
            dot_rows(W, n, A, r0, nr, out);
            for (int r = 0; r < nr; r++) {
                float *dst = y + (size_t)(r0 + r) * ldy + n;
                *dst = accumulate ? *dst + out[r] + bias : out[r] + bias;
            }
        }
    }
}

// The matmul on its own (tests, benchmarks): x (rows, W->cols) float -> y (rows, W->rows).
int fx_matmul(const QMatrix *W, const float *x, int rows, float *y, int threads) {
    if (W->cols % BLOCK || W->cols / BLOCK > MAX_BLOCKS || (W->bits != 4 && W->bits != 8)) return -1;
    const int nb = W->cols / BLOCK;
    QActs A = {x, W->cols, malloc((size_t)rows * W->cols), malloc(sizeof(float) * rows * nb),
               malloc(sizeof(float) * rows * nb)};
    if (!A.q || !A.d || !A.s) { free(A.q); free(A.d); free(A.s); return -2; }
    fx_quantize(x, rows, W->cols, A.q, A.d, A.s);
    #pragma omp parallel num_threads(threads)
    matmul_in_region(W, &A, rows, y, W->rows, 0);
    free(A.q); free(A.d); free(A.s);
    return 0;
}

// ---- exp over a row: softmax and SiLU call it ~40 000 times a step, and a 512-token prompt millions of times --------

#if defined(__AVX2__)
// e^x for 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7,
// about expf's), 2^n put into the exponent bits. Arguments are clamped to [-87.33, 88]: below, the result is tiny; above, 2^127-ish.
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);     // ln2 in two parts: exact n * hi
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// y[i] = e^(x[i] - shift); returns the sum of y
static float exp_row(const float *x, float shift, float *y, int n) {
    int i = 0;
    float sum = 0.f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(shift)));
        _mm256_storeu_ps(y + i, v);
        acc = _mm256_add_ps(acc, v);
    }
    sum = hsum256(acc);
#endif
    for (; i < n; i++) { y[i] = expf(x[i] - shift); sum += y[i]; }
    return sum;
}

// g[i] = silu(g[i]) * u[i]
static void swiglu_row(float *g, const float *u, int n) {
    int i = 0;
#if defined(__AVX2__)
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        const __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f),
                                         exp256(_mm256_sub_ps(_mm256_setzero_ps(), v))));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(v, sig), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

// The two on their own, for the tests.
float fx_exp_row(const float *x, float shift, float *y, int n) { return exp_row(x, shift, y, n); }
void fx_swiglu_row(float *g, const float *u, int n) { swiglu_row(g, u, n); }

// ---- the model --------------------------------------------------------------------------------------------------

typedef struct {
    QMatrix qkv, proj, gate_up, down;
    const float *attn_norm, *mlp_norm;
} Layer;

typedef struct {
    int32_t n_layer, dim, n_head, n_kv_head, head_dim, ffn, vocab, rope_len;
    float eps;
    int32_t pad;
    const float *rope_cos, *rope_sin;   // (rope_len, head_dim): HF's tables, halves repeated
    const float *final_norm;
    QMatrix lm_head;
    Layer *layers;                      // n_layer of them
} ModelDesc;

typedef struct {
    ModelDesc m;
    int batch, cache_len;
    int cache_pad;                      // cache_len rounded up to whole blocks of 8 positions
    float *k_cache;                     // (n_layer, batch, n_kv_head, cache_pad / 8, head_dim, 8): keys transposed
                                        // in blocks of 8 positions, so 8 scores are 8 lanes of multiply-adds
    float *v_cache;                     // (n_layer, batch, n_kv_head, cache_pad, head_dim)
    int cap_rows, cap_threads;          // scratch sized for cap_rows rows of the widest matrix
    float *x, *h, *att, *xf, *scores;   // residual, matmul outputs, attention output, normed rows, softmax rows
    QActs a;
} Model;

static int matrix_ok(const QMatrix *W, int rows, int cols) {
    return W->rows == rows && W->cols == cols && cols > 0 && rows > 0 && cols % BLOCK == 0 &&
           cols / BLOCK <= MAX_BLOCKS && (W->bits == 4 || W->bits == 8) && W->codes && W->scales &&
           (W->bits == 8 || W->mins) && !(W->interleaved && W->float_acts);
}

// 0 when the description is one fx_forward can run within its buffers, else a code saying what is not:
// -1 the model's sizes, -2 a missing table, -(10 + layer) a matrix of that layer (-9: the output layer).
int fx_check(const ModelDesc *d) {
    const int nh = d->n_head, nkv = d->n_kv_head, hd = d->head_dim;
    if (d->n_layer < 1 || d->dim < 1 || d->ffn < 1 || d->vocab < 1 || nh < 1 || nkv < 1 || nh % nkv ||
        hd < 2 || hd % 2 || d->rope_len < 1 || d->dim % BLOCK || d->ffn % BLOCK || (nh * hd) % BLOCK) return -1;
    if (!d->rope_cos || !d->rope_sin || !d->final_norm || !d->layers) return -2;
    if (!matrix_ok(&d->lm_head, d->vocab, d->dim)) return -9;
    for (int l = 0; l < d->n_layer; l++) {
        const Layer *L = &d->layers[l];
        if (!matrix_ok(&L->qkv, (nh + 2 * nkv) * hd, d->dim) || !matrix_ok(&L->proj, d->dim, nh * hd) ||
            !matrix_ok(&L->gate_up, 2 * d->ffn, d->dim) || !matrix_ok(&L->down, d->dim, d->ffn) ||
            !L->attn_norm || !L->mlp_norm) return -(10 + l);
    }
    return 0;
}

// A model over `desc` (copied: the caller's struct may go; the arrays it points into must outlive the model), or
// NULL when fx_check refuses it or the memory is not there.
Model *fx_new(const ModelDesc *desc) {
    if (fx_check(desc)) return NULL;
    Model *m = calloc(1, sizeof(Model));
    if (!m) return NULL;
    m->m = *desc;
    return m;
}

static void free_scratch(Model *m) {
    free(m->x); free(m->h); free(m->att); free(m->xf); free(m->scores); free(m->a.q); free(m->a.d); free(m->a.s);
    m->x = m->h = m->att = m->xf = m->scores = NULL; m->a.q = NULL; m->a.d = m->a.s = NULL; m->cap_rows = 0;
    m->cap_threads = 0;
}

void fx_free(Model *m) {
    if (!m) return;
    free(m->k_cache); free(m->v_cache); free_scratch(m); free(m);
}

// A zeroed KV cache for (batch, cache_len); 0, or -2 when the memory is not there.
int fx_start(Model *m, int batch, int cache_len) {
    free(m->k_cache); free(m->v_cache); m->k_cache = m->v_cache = NULL;
    free_scratch(m);                    // the softmax rows are cache_pad long: sized again by the next forward
    if (batch < 1 || cache_len < 1) return -1;
    m->cache_pad = (cache_len + 7) / 8 * 8;
    const size_t n = (size_t)m->m.n_layer * batch * m->m.n_kv_head * m->cache_pad * m->m.head_dim;
    m->k_cache = calloc(n, sizeof(float)); m->v_cache = calloc(n, sizeof(float));
    m->batch = batch; m->cache_len = cache_len;
    if (!m->k_cache || !m->v_cache) { free(m->k_cache); free(m->v_cache); m->k_cache = m->v_cache = NULL; return -2; }
    return 0;
}

static int reserve(Model *m, int rows, int threads) {
    const ModelDesc *d = &m->m;
    const int qkv = (d->n_head + 2 * d->n_kv_head) * d->head_dim;
    int cols = 2 * d->ffn > qkv ? 2 * d->ffn : qkv;   // the widest matmul output kept here (the logits go to `out`)
    cols = cols > d->dim ? cols : d->dim;
    if (rows <= m->cap_rows && threads <= m->cap_threads) return 0;
    free_scratch(m);
    m->x = malloc(sizeof(float) * rows * d->dim);
    m->h = malloc(sizeof(float) * rows * cols);
    m->att = malloc(sizeof(float) * rows * d->n_head * d->head_dim);
    m->xf = malloc(sizeof(float) * rows * d->dim);
    m->scores = malloc(sizeof(float) * threads * m->cache_pad);
    m->a.q = malloc((size_t)rows * cols);
    m->a.d = malloc(sizeof(float) * rows * cols / BLOCK);
    m->a.s = malloc(sizeof(float) * rows * cols / BLOCK);
    if (!m->x || !m->h || !m->att || !m->xf || !m->scores || !m->a.q || !m->a.d || !m->a.s) { free_scratch(m); return -2; }
    m->cap_rows = rows; m->cap_threads = threads;
    return 0;
}

static void rms_quantize_rows(const float *x, int rows, int dim, const float *w, float eps, QActs *a, float *tmp) {
    #pragma omp single
    { a->f = tmp; a->fstride = dim; }
    #pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int i = 0; i < dim; i++) ss += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(ss / dim + eps);
        float *t = tmp + (size_t)r * dim;
        for (int i = 0; i < dim; i++) t[i] = xr[i] * inv * w[i];
        quantize_row(t, dim, a->q + (size_t)r * dim, a->d + (size_t)r * dim / BLOCK, a->s + (size_t)r * dim / BLOCK);
    }
}

// rows of (T tokens x batch) at positions pos.. of each sequence; logits for the last token of each sequence
// (all_logits = 0: out is (batch, vocab)) or for every token (out is (batch * T, vocab)).
int fx_forward(Model *m, const float *embeddings, int T, int pos, int all_logits, float *out, int threads) {
    const ModelDesc *d = &m->m;
    const int B = m->batch, rows = B * T, nh = d->n_head, nkv = d->n_kv_head, hd = d->head_dim, half = hd / 2;
    const int qkv_cols = (nh + 2 * nkv) * hd, S = m->cache_len, Sp = m->cache_pad;
    if (!m->k_cache || pos < 0 || T < 1 || pos + T > S || pos + T > d->rope_len) return -1;
    if (threads < 1) threads = 1;
    if (reserve(m, rows, threads)) return -2;
    memcpy(m->x, embeddings, sizeof(float) * rows * d->dim);
    float *x = m->x, *h = m->h, *att = m->att;
    const float scale = 1.f / sqrtf((float)hd);
    const int out_rows = all_logits ? rows : B;

    #pragma omp parallel num_threads(threads)
    {
        float *scores = m->scores + (size_t)omp_get_thread_num() * Sp;
        for (int l = 0; l < d->n_layer; l++) {
            const Layer *L = &d->layers[l];
            float *kc = m->k_cache + (size_t)l * B * nkv * Sp * hd, *vc = m->v_cache + (size_t)l * B * nkv * Sp * hd;
            rms_quantize_rows(x, rows, d->dim, L->attn_norm, d->eps, &m->a, m->xf);
            matmul_in_region(&L->qkv, &m->a, rows, h, qkv_cols, 0);
            // rotary on q and k, then k and v into the cache
            #pragma omp for schedule(static)
            for (int i = 0; i < rows * (nh + nkv); i++) {
                const int r = i / (nh + nkv), head = i % (nh + nkv), t = r % T, b = r / T, p = pos + t;
                float *v = h + (size_t)r * qkv_cols + head * hd;
                const float *c = d->rope_cos + (size_t)p * hd, *s = d->rope_sin + (size_t)p * hd;
                for (int j = 0; j < half; j++) {
                    const float a = v[j], bb = v[j + half];
                    v[j] = a * c[j] - bb * s[j];
                    v[j + half] = bb * c[j + half] + a * s[j + half];
                }
                if (head >= nh) {
                    const int kh = head - nh;
                    const size_t head_at = ((size_t)b * nkv + kh) * Sp * hd;
                    float *kt = kc + head_at + (size_t)(p / 8) * hd * 8 + p % 8;
                    for (int e = 0; e < hd; e++) kt[(size_t)e * 8] = v[e];
                    memcpy(vc + head_at + (size_t)p * hd, h + (size_t)r * qkv_cols + (nh + nkv + kh) * hd,
                           sizeof(float) * hd);
                }
            }
            // causal attention: query t of sequence b sees positions 0 .. pos + t
            #pragma omp for schedule(static)
            for (int i = 0; i < rows * nh; i++) {
                const int r = i / nh, head = i % nh, t = r % T, b = r / T, kh = head / (nh / nkv), n = pos + t + 1;
                const float *q = h + (size_t)r * qkv_cols + head * hd;
                const float *K = kc + ((size_t)b * nkv + kh) * Sp * hd, *V = vc + ((size_t)b * nkv + kh) * Sp * hd;
                for (int blk = 0; blk < (n + 7) / 8; blk++) {       // 8 positions' scores at once
                    const float *kb = K + (size_t)blk * hd * 8;
#if defined(__AVX2__)
                    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                    int e = 0;
                    for (; e + 2 <= hd; e += 2) {
                        a0 = _mm256_fmadd_ps(_mm256_set1_ps(q[e]), _mm256_loadu_ps(kb + (size_t)e * 8), a0);
                        a1 = _mm256_fmadd_ps(_mm256_set1_ps(q[e + 1]), _mm256_loadu_ps(kb + (size_t)(e + 1) * 8), a1);
                    }
                    for (; e < hd; e++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(q[e]), _mm256_loadu_ps(kb + (size_t)e * 8), a0);
                    _mm256_storeu_ps(scores + blk * 8, _mm256_mul_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(scale)));
#else
                    for (int lane = 0; lane < 8; lane++) {
                        float dot = 0.f;
                        for (int e = 0; e < hd; e++) dot += q[e] * kb[(size_t)e * 8 + lane];
                        scores[blk * 8 + lane] = dot * scale;
                    }
#endif
                }
                float mx = -INFINITY;                               // positions >= n are past the causal edge
                for (int j = 0; j < n; j++) mx = scores[j] > mx ? scores[j] : mx;
                const float inv = 1.f / exp_row(scores, mx, scores, n);
                float *o = att + (size_t)r * nh * hd + head * hd;
                for (int e = 0; e < hd; e++) o[e] = 0.f;
                for (int j = 0; j < n; j++) {
                    const float p = scores[j] * inv;
                    #pragma omp simd
                    for (int e = 0; e < hd; e++) o[e] += p * V[(size_t)j * hd + e];
                }
            }
            #pragma omp single
            { m->a.f = att; m->a.fstride = nh * hd; }
            #pragma omp for schedule(static)
            for (int r = 0; r < rows; r++)
                quantize_row(att + (size_t)r * nh * hd, nh * hd, m->a.q + (size_t)r * nh * hd,
                             m->a.d + (size_t)r * nh * hd / BLOCK, m->a.s + (size_t)r * nh * hd / BLOCK);
            matmul_in_region(&L->proj, &m->a, rows, x, d->dim, 1);          // x += attention
            rms_quantize_rows(x, rows, d->dim, L->mlp_norm, d->eps, &m->a, m->xf);
            matmul_in_region(&L->gate_up, &m->a, rows, h, 2 * d->ffn, 0);
            #pragma omp single
            { m->a.f = h; m->a.fstride = 2 * d->ffn; }
            #pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {                                // silu(gate) * up, then quantized
                float *g = h + (size_t)r * 2 * d->ffn, *u = g + d->ffn;
                swiglu_row(g, u, d->ffn);
                quantize_row(g, d->ffn, m->a.q + (size_t)r * d->ffn, m->a.d + (size_t)r * d->ffn / BLOCK,
                             m->a.s + (size_t)r * d->ffn / BLOCK);
            }
            matmul_in_region(&L->down, &m->a, rows, x, d->dim, 1);          // x += mlp
        }
        // the output layer, on the rows asked for
        #pragma omp single
        {
            if (!all_logits)
                for (int b = 0; b < B; b++)
                    memmove(x + (size_t)b * d->dim, x + ((size_t)b * T + T - 1) * d->dim, sizeof(float) * d->dim);
        }
        rms_quantize_rows(x, out_rows, d->dim, d->final_norm, d->eps, &m->a, m->xf);
        matmul_in_region(&d->lm_head, &m->a, out_rows, out, d->vocab, 0);
    }
    return 0;
}
