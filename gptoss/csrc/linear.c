/* MXFP4 and bf16 weights against rows of x (see native.h for the formats).

   gptoss_mxfp4_dequant: rows -> dense bf16 or fp32, bit for bit what gptoss.mxfp4.dequantize makes
   (each value is an E2M1 number times a power of two: exact in fp32, and so in bf16).
   gptoss_mxfp4_linear: y [n, out] = x [n, in] W^T (+ bias) with W decoded block by block in registers,
   never stored; products and sums in fp32, one rounding to the output dtype at the end. Rows of x are
   taken up to 8 at a time (rows.h). Output rows are split between threads (OpenMP). AVX-512 where the
   compiler targets it, otherwise portable C.
   gptoss_bf16_linear: a plain bf16 weight read in place (AVX512-BF16 only). */

#include "rows.h"

/* What this build has: the vector width of the MXFP4 products (512 or 0, portable C) and the bf16
   pair products (1 or 0). */
int gptoss_mxfp4_simd(void) {
#ifdef __AVX512F__
    return 512;
#else
    return 0;
#endif
}

int gptoss_mxfp4_bf16_dot(void) {
#ifdef HAVE_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

int gptoss_mxfp4_dequant(const uint8_t *blocks, const uint8_t *scales, int64_t rows, int64_t groups, void *out,
                         int out_bf16, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *b = blocks + (r * groups + g) * 16;
            const float s = e8m0(scales[r * groups + g]);
            const int64_t at = (r * groups + g) * 32;
            for (int i = 0; i < 16; i++) {
                const float lo = FP4[b[i] & 15] * s, hi = FP4[b[i] >> 4] * s;
                if (out_bf16) {
                    ((uint16_t *)out)[at + 2 * i] = f32_to_bf16(lo);
                    ((uint16_t *)out)[at + 2 * i + 1] = f32_to_bf16(hi);
                } else {
                    ((float *)out)[at + 2 * i] = lo;
                    ((float *)out)[at + 2 * i + 1] = hi;
                }
            }
        }
    }
    return GPTOSS_OK;
}

#ifdef HAVE_BF16_DOT
/* A plain bf16 weight row [in] (in a multiple of 32) against R bf16 rows, U independent accumulators
   per row: for the few-row products of decoding, where a BLAS first reorders the whole weight. */
ALWAYS_INLINE void row_dense(const int R, const int U, const uint16_t *w, int64_t in, const uint16_t *x, float *sums) {
    __m512 acc[4];
    for (int a = 0; a < R * U; a++) acc[a] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < in; k0 += 32 * U) {
        for (int u = 0; u < U && k0 + 32 * u < in; u++) {
            const int64_t k = k0 + 32 * u;
            const __m512bh wk = (__m512bh)_mm512_loadu_si512(w + k);
            for (int r = 0; r < R; r++)
                acc[r * U + u] = _mm512_dpbf16_ps(acc[r * U + u], wk, (__m512bh)_mm512_loadu_si512(x + r * in + k));
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 t = acc[r * U];
        for (int u = 1; u < U; u++) t = _mm512_add_ps(t, acc[r * U + u]);
        sums[r] = _mm512_reduce_add_ps(t);
    }
}
#endif

/* y [n, out] = x [n, in] w^T (+ bias), all bf16, fp32 sums. */
int gptoss_bf16_linear(const uint16_t *x, int64_t n, int64_t in, const uint16_t *w, const uint16_t *bias, int64_t out,
                       uint16_t *y, int threads) {
#ifdef HAVE_BF16_DOT
    if (in % 32 != 0 || n < 1) return GPTOSS_BAD_SHAPE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint16_t *wo = w + o * in;
        const float add = bias == NULL ? 0.0f : bf16_to_f32(bias[o]);
        float sums[4];
        for (int64_t r0 = 0; r0 < n;) {
            const int64_t left = n - r0;
            const int R = left >= 4 ? 4 : left >= 2 ? 2 : 1;
            switch (R) {
            case 4: row_dense(4, 1, wo, in, x + r0 * in, sums); break;
            case 2: row_dense(2, 2, wo, in, x + r0 * in, sums); break;
            default: row_dense(1, 4, wo, in, x + r0 * in, sums); break;
            }
            for (int r = 0; r < R; r++) y[(r0 + r) * out + o] = f32_to_bf16(sums[r] + add);
            r0 += R;
        }
    }
    return GPTOSS_OK;
#else
    (void)x; (void)n; (void)in; (void)w; (void)bias; (void)out; (void)y; (void)threads;
    return GPTOSS_NO_KERNEL;
#endif
}

/* x [n, in] and bias [out] (NULL: none) in bf16 (x_bf16 = 1) or fp32; y [n, out] in the same dtype. */
int gptoss_mxfp4_linear(const void *x, int x_bf16, int64_t n, int64_t in, const uint8_t *blocks, const uint8_t *scales,
                        const void *bias, int64_t out, void *y, int threads) {
    if (in % 32 != 0) return GPTOSS_BAD_SHAPE;
    const int64_t G = in / 32, H = in / 2;
#ifdef HAVE_BF16_DOT
    if (x_bf16) {
        const int64_t P = 128 * ((G + 3) / 4);
        uint16_t *xp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n * P + 1));
        if (xp == NULL) return GPTOSS_NO_MEMORY;
        permute_x((const uint16_t *)x, n, in, P, xp);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o = 0; o < out; o++) {
            const uint8_t *b = blocks + o * G * 16, *sc = scales + o * G;
            const float add = bias == NULL ? 0.0f : bf16_to_f32(((const uint16_t *)bias)[o]);
            float sums[8];
            for (int64_t r0 = 0; r0 < n;) {
                const int R = take_rows(n - r0);
                rows_bf16(R, b, sc, G, xp + r0 * P, P, sums);
                for (int r = 0; r < R; r++) ((uint16_t *)y)[(r0 + r) * out + o] = f32_to_bf16(sums[r] + add);
                r0 += R;
            }
        }
        free(xp);
        return GPTOSS_OK;
    }
#endif
    float *xe = (float *)malloc(sizeof(float) * (size_t)(2 * n * H + 1));
    if (xe == NULL) return GPTOSS_NO_MEMORY;
    float *xo = xe + n * H;
    for (int64_t r = 0; r < n; r++)
        for (int64_t j = 0; j < H; j++) {
            const int64_t a = r * in + 2 * j;
            xe[r * H + j] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[a]) : ((const float *)x)[a];
            xo[r * H + j] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[a + 1]) : ((const float *)x)[a + 1];
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *b = blocks + o * G * 16, *sc = scales + o * G;
        const float add = bias == NULL ? 0.0f : x_bf16 ? bf16_to_f32(((const uint16_t *)bias)[o]) : ((const float *)bias)[o];
        float sums[8];
        for (int64_t r0 = 0; r0 < n;) {
            const int R = take_rows(n - r0);
            rows_f32(R, b, sc, G, xe + r0 * H, xo + r0 * H, H, sums);
            for (int r = 0; r < R; r++) {
                const float v = sums[r] + add;
                if (x_bf16) ((uint16_t *)y)[(r0 + r) * out + o] = f32_to_bf16(v);
                else ((float *)y)[(r0 + r) * out + o] = v;
            }
            r0 += R;
        }
    }
    free(xe);
    return GPTOSS_OK;
}
