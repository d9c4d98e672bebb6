/* MXFP4 on the CPU, reading the packed codes and scales directly (gptoss/native.py builds and loads this).

   blocks [rows, G, 16] uint8: two E2M1 codes per byte, the LOW nibble the earlier element;
   scales [rows, G] uint8: E8M0, the block's scale is 2^(s - 127). A weight is [out, in], in = 32 G.

   gptoss_mxfp4_dequant: rows -> dense bf16 or fp32, bit for bit what gptoss.mxfp4.dequantize makes
   (each value is an E2M1 number times a power of two: exact in fp32, and so in bf16).
   gptoss_mxfp4_linear: y [n, out] = x [n, in] W^T (+ bias) with W decoded block by block in registers,
   never stored; products and sums in fp32, one rounding to the output dtype at the end. Rows of x
   are taken up to 8 at a time, so each decoded block is used by all of them. Output rows are split
   between threads (OpenMP). AVX-512 where the compiler targets it, otherwise portable C. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

static const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float SCALE[256];
static void init_scales(void) {
    for (int s = 0; s < 256; s++) SCALE[s] = ldexpf(1.0f, s - 127);
}

int gptoss_mxfp4_simd(void) {
#ifdef __AVX512F__
    return 512;
#else
    return 0;
#endif
}

void gptoss_mxfp4_dequant(const uint8_t *blocks, const uint8_t *scales, int64_t rows, int64_t groups,
                          void *out, int out_bf16, int threads) {
    init_scales();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *b = blocks + (r * groups + g) * 16;
            const float s = SCALE[scales[r * groups + g]];
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
}

/* One output row o for R rows of x: xe/xo hold the even / odd elements of each row of x (H = in / 2
   floats each), so the low nibbles of a block meet xe and the high nibbles xo, 16 lanes at a time. */
#ifdef __AVX512F__
#define ROW_KERNEL(R)                                                                                      \
    static inline void row_kernel_##R(const uint8_t *b, const uint8_t *sc, int64_t G, const float *xe,   \
                                      const float *xo, int64_t H, float *sums) {                          \
        const __m512 lut = _mm512_loadu_ps(FP4);                                                          \
        const __m512i low = _mm512_set1_epi32(15);                                                        \
        __m512 acc[R];                                                                                    \
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                         \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + g * 16)));        \
            const __m512 s = _mm512_set1_ps(SCALE[sc[g]]);                                                \
            const __m512 wl = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(w, low), lut), s);     \
            const __m512 wh = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), lut), s);      \
            for (int r = 0; r < R; r++) {                                                                 \
                acc[r] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xe + r * H + g * 16), acc[r]);               \
                acc[r] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xo + r * H + g * 16), acc[r]);               \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < R; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);                               \
    }
#else
#define ROW_KERNEL(R)                                                                                      \
    static inline void row_kernel_##R(const uint8_t *b, const uint8_t *sc, int64_t G, const float *xe,   \
                                      const float *xo, int64_t H, float *sums) {                          \
        float acc[R][16];                                                                                 \
        memset(acc, 0, sizeof(acc));                                                                      \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            const float s = SCALE[sc[g]];                                                                 \
            float wl[16], wh[16];                                                                         \
            for (int i = 0; i < 16; i++) {                                                                \
                wl[i] = FP4[b[g * 16 + i] & 15] * s;                                                      \
                wh[i] = FP4[b[g * 16 + i] >> 4] * s;                                                      \
            }                                                                                             \
            for (int r = 0; r < R; r++)                                                                   \
                for (int i = 0; i < 16; i++)                                                              \
                    acc[r][i] += wl[i] * xe[r * H + g * 16 + i] + wh[i] * xo[r * H + g * 16 + i];          \
        }                                                                                                 \
        for (int r = 0; r < R; r++) {                                                                     \
            float t = 0.0f;                                                                               \
            for (int i = 0; i < 16; i++) t += acc[r][i];                                                  \
            sums[r] = t;                                                                                  \
        }                                                                                                 \
    }
#endif
ROW_KERNEL(1)
ROW_KERNEL(2)
ROW_KERNEL(4)
ROW_KERNEL(8)

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_BF16_DOT 1
/* bf16 rows of x, in their own order (no split into even and odd elements): per block, the 16 E2M1
   values times the block's scale become a 16-entry bf16 table (exact: a power of two times an E2M1
   value), each byte's two codes index it into one 32-bit lane holding its element pair, and
   vdpbf16ps multiplies pairs with the matching pair of x and adds both products into fp32 lanes.
   AFTER (a constant, for one row): building each block's scaled table costs more than the product,
   so one unscaled table serves every block and the block's scale (a power of two: exact) multiplies
   its fp32 dot product instead: 0.34 against 0.40 ms for a 5760 x 2880 expert at one row on a 2-core
   AVX-512 VM; with more rows the extra multiply per row loses. */
#define ROW_KERNEL_BF16(R, U, AFTER)                                                                       \
    static inline void row_kernel_bf16_##R(const uint8_t *b, const uint8_t *sc, int64_t G,                 \
                                           const uint16_t *x, int64_t in, float *sums) {                  \
        const __m512 lut = _mm512_loadu_ps(FP4);                                                          \
        const __m512i unscaled = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(lut));                \
        const __m512 zero = _mm512_setzero_ps();                                                          \
        const __m512i nibbles = _mm512_set1_epi32(0x000f000f);                                            \
        __m512 acc[R * U]; /* U independent sums per row: a dot product's latency is hidden behind U */   \
        for (int a = 0; a < R * U; a++) acc[a] = _mm512_setzero_ps();                                     \
        for (int64_t g0 = 0; g0 < G; g0 += U) {                                                           \
            for (int u = 0; u < U && g0 + u < G; u++) {                                                   \
                const int64_t g = g0 + u;                                                                 \
                const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + g * 16)));    \
                /* word 2i: the low code of byte i, word 2i + 1: its high code */                          \
                const __m512i idx = _mm512_ternarylogic_epi32(w, _mm512_slli_epi32(w, 12), nibbles, 0xa8); \
                const __m512 s = _mm512_set1_ps(SCALE[sc[g]]);                                            \
                const __m512i table = AFTER ? unscaled                                                    \
                    : _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(lut, s)));         \
                const __m512bh wp = (__m512bh)_mm512_permutexvar_epi16(idx, table);                       \
                for (int r = 0; r < R; r++) {                                                             \
                    const __m512bh xr = (__m512bh)_mm512_loadu_si512(x + r * in + g * 32);                \
                    acc[r * U + u] = AFTER ? _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, wp, xr), s, acc[r * U + u]) \
                                           : _mm512_dpbf16_ps(acc[r * U + u], wp, xr);                    \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < R; r++) {                                                                     \
            __m512 t = acc[r * U];                                                                        \
            for (int u = 1; u < U; u++) t = _mm512_add_ps(t, acc[r * U + u]);                              \
            sums[r] = _mm512_reduce_add_ps(t);                                                            \
        }                                                                                                 \
    }
ROW_KERNEL_BF16(1, 4, 1)
ROW_KERNEL_BF16(2, 4, 0)
ROW_KERNEL_BF16(4, 2, 0)
ROW_KERNEL_BF16(8, 1, 0)
#endif

int gptoss_mxfp4_bf16_dot(void) {
#ifdef HAVE_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

#ifdef HAVE_BF16_DOT
/* A plain bf16 weight [out, in] (in a multiple of 32) against up to R bf16 rows, read as stored: for
   the few-row products of decoding, where a BLAS first reorders the whole weight on every call. */
#define ROW_KERNEL_DENSE(R, U)                                                                              \
    static inline void row_kernel_dense_##R(const uint16_t *w, int64_t in, const uint16_t *x, float *sums) { \
        __m512 acc[R * U];                                                                                \
        for (int a = 0; a < R * U; a++) acc[a] = _mm512_setzero_ps();                                     \
        for (int64_t k0 = 0; k0 < in; k0 += 32 * U) {                                                     \
            for (int u = 0; u < U && k0 + 32 * u < in; u++) {                                             \
                const int64_t k = k0 + 32 * u;                                                            \
                const __m512bh wk = (__m512bh)_mm512_loadu_si512(w + k);                                   \
                for (int r = 0; r < R; r++)                                                               \
                    acc[r * U + u] = _mm512_dpbf16_ps(acc[r * U + u], wk, (__m512bh)_mm512_loadu_si512(x + r * in + k)); \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < R; r++) {                                                                     \
            __m512 t = acc[r * U];                                                                        \
            for (int u = 1; u < U; u++) t = _mm512_add_ps(t, acc[r * U + u]);                              \
            sums[r] = _mm512_reduce_add_ps(t);                                                            \
        }                                                                                                 \
    }
ROW_KERNEL_DENSE(1, 4)
ROW_KERNEL_DENSE(2, 2)
ROW_KERNEL_DENSE(4, 1)
#endif

/* y [n, out] = x [n, in] w^T (+ bias), all bf16, fp32 sums; -1 where this build has no bf16 dot
   product (the caller then uses torch) or in is not a multiple of 32. */
int gptoss_bf16_linear(const uint16_t *x, int64_t n, int64_t in, const uint16_t *w, const uint16_t *bias,
                       int64_t out, uint16_t *y, int threads) {
#ifdef HAVE_BF16_DOT
    if (in % 32 != 0) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint16_t *wo = w + o * in;
        const float add = bias == NULL ? 0.0f : bf16_to_f32(bias[o]);
        float sums[4];
        for (int64_t r0 = 0; r0 < n;) {
            const int64_t left = n - r0;
            const int R = left >= 4 ? 4 : left >= 2 ? 2 : 1;
            if (R == 4) row_kernel_dense_4(wo, in, x + r0 * in, sums);
            else if (R == 2) row_kernel_dense_2(wo, in, x + r0 * in, sums);
            else row_kernel_dense_1(wo, in, x + r0 * in, sums);
            for (int r = 0; r < R; r++) y[(r0 + r) * out + o] = f32_to_bf16(sums[r] + add);
            r0 += R;
        }
    }
    return 0;
#else
    (void)x; (void)n; (void)in; (void)w; (void)bias; (void)out; (void)y; (void)threads;
    return -1;
#endif
}

/* x [n, in] and bias [out] (NULL: none) in bf16 (x_bf16 = 1) or fp32; y [n, out] in the same dtype.
   Returns 0, or -1 when the scratch memory could not be allocated. */
int gptoss_mxfp4_linear(const void *x, int x_bf16, int64_t n, int64_t in, const uint8_t *blocks,
                        const uint8_t *scales, const void *bias, int64_t out, void *y, int threads) {
    init_scales();
    const int64_t G = in / 32, H = in / 2;
#ifdef HAVE_BF16_DOT
    if (x_bf16) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o = 0; o < out; o++) {
            const uint8_t *b = blocks + o * G * 16, *sc = scales + o * G;
            const float add = bias == NULL ? 0.0f : bf16_to_f32(((const uint16_t *)bias)[o]);
            float sums[8];
            for (int64_t r0 = 0; r0 < n;) {
                const int64_t left = n - r0;
                const int R = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
                const uint16_t *xr = (const uint16_t *)x + r0 * in;
                if (R == 8) row_kernel_bf16_8(b, sc, G, xr, in, sums);
                else if (R == 4) row_kernel_bf16_4(b, sc, G, xr, in, sums);
                else if (R == 2) row_kernel_bf16_2(b, sc, G, xr, in, sums);
                else row_kernel_bf16_1(b, sc, G, xr, in, sums);
                for (int r = 0; r < R; r++) ((uint16_t *)y)[(r0 + r) * out + o] = f32_to_bf16(sums[r] + add);
                r0 += R;
            }
        }
        return 0;
    }
#endif
    float *xe = (float *)malloc(sizeof(float) * (size_t)(2 * n * H + 1));
    if (xe == NULL) return -1;
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
            const int64_t left = n - r0;
            const int R = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            const float *e = xe + r0 * H, *d = xo + r0 * H;
            if (R == 8) row_kernel_8(b, sc, G, e, d, H, sums);
            else if (R == 4) row_kernel_4(b, sc, G, e, d, H, sums);
            else if (R == 2) row_kernel_2(b, sc, G, e, d, H, sums);
            else row_kernel_1(b, sc, G, e, d, H, sums);
            for (int r = 0; r < R; r++) {
                const float v = sums[r] + add;
                if (x_bf16) ((uint16_t *)y)[(r0 + r) * out + o] = f32_to_bf16(v);
                else ((float *)y)[(r0 + r) * out + o] = v;
            }
            r0 += R;
        }
    }
    free(xe);
    return 0;
}
