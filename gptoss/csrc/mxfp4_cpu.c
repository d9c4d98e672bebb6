/* MXFP4 on the CPU, reading the packed codes and scales directly (gptoss/native.py builds and loads this).

   blocks [rows, G, 16] uint8: two E2M1 codes per byte, the LOW nibble the earlier element;
   scales [rows, G] uint8: E8M0, the block's scale is 2^(s - 127). A weight is [out, in], in = 32 G.

   gptoss_mxfp4_dequant: rows -> dense bf16 or fp32, bit for bit what gptoss.mxfp4.dequantize makes
   (each value is an E2M1 number times a power of two: exact in fp32, and so in bf16).
   gptoss_mxfp4_linear: y [n, out] = x [n, in] W^T (+ bias) with W decoded block by block in registers,
   never stored; products and sums in fp32, one rounding to the output dtype at the end. Rows of x
   are taken up to 8 at a time, so each decoded block is used by all of them. Output rows are split
   between threads (OpenMP). AVX-512 where the compiler targets it, otherwise portable C.
   gptoss_mxfp4_moe: a few tokens through a whole MoE layer (experts, SwiGLU, weighted sum) in one
   call, on the bf16 product (AVX512-BF16 only). gptoss_bf16_linear: a plain bf16 weight, read in place.
   gptoss_decode_attention: one new token's attention with sinks over the fp32 KV cache. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
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
/* bf16 rows of x, 64 bytes of codes (four blocks, 128 elements) per step. Read as 32 16-bit words,
   word w holds the codes of elements 4w .. 4w + 3 of the step, one per nibble; the word shifted right
   by 0, 4, 8 and 12 bits indexes (through its low 5 bits) a 32-entry table of the unscaled E2M1
   values in bf16, the 16 values twice, so the bits above each nibble do not matter: four vpermw give
   the step's 128 weights, element 4w + k in word w of the k-th vector. x is reordered to match once
   per call (`permute_x`), so four vdpbf16ps multiply them with x; each 32-bit lane m of their sums
   holds products of block m / 4 only, and one multiply by the vector of the four blocks' scales (a
   power of two each: exact) adds the step into the fp32 total. Per 128 weights: 3 shifts, 4
   permutes, 1 permute of the scales, and 4 dot products and 1 multiply-add per row of x. */
static const int32_t STEP_SCALE[4][16] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};

/* x [n, in] bf16 -> xp [n, P] with P = 128 * ceil(G / 4): step c's element 4w + k at 128 c + 32 k + w,
   zeros past `in` (so the padded blocks of the last step add nothing). */
static void permute_x(const uint16_t *x, int64_t n, int64_t in, int64_t P, uint16_t *xp) {
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < P / 128; c++)
            for (int k = 0; k < 4; k++)
                for (int w = 0; w < 32; w++) {
                    const int64_t e = 128 * c + 4 * w + k;
                    xp[r * P + 128 * c + 32 * k + w] = e < in ? x[r * in + e] : 0;
                }
}

/* 16 E8M0 bytes -> the fp32 powers of two 2^(s - 127): the byte shifted into the exponent field, and
   s = 0 (2^-127, below fp32's normal range) as its subnormal bit pattern. */
static inline __m512 scales16(const uint8_t *sc, int64_t count) {
    const __m512i s = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << count) - 1u), sc));
    const __m512i bits = _mm512_slli_epi32(s, 23);
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(bits, _mm512_testn_epi32_mask(s, s), _mm512_set1_epi32(0x00400000)));
}

#define ROW_KERNEL_BF16(R)                                                                                 \
    static inline void row_kernel_bf16_##R(const uint8_t *b, const uint8_t *sc, int64_t G,                 \
                                           const uint16_t *xp, int64_t P, float *sums) {                  \
        const __m512 lut = _mm512_loadu_ps(FP4);                                                          \
        const __m256i half = (__m256i)_mm512_cvtneps_pbh(lut);                                            \
        const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);                  \
        const __m512 zero = _mm512_setzero_ps();                                                          \
        __m512 acc[R];                                                                                    \
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                         \
        for (int64_t g0 = 0; g0 < G; g0 += 16) {                                                          \
            const int64_t left = G - g0 < 16 ? G - g0 : 16;                                               \
            const __m512 s16 = scales16(sc + g0, left);                                                   \
            for (int64_t q = 0; 4 * q < left; q++) {                                                      \
                const int64_t blocks = left - 4 * q < 4 ? left - 4 * q : 4;                               \
                const uint8_t *at = b + (g0 + 4 * q) * 16;                                                \
                const __m512i v = blocks == 4 ? _mm512_loadu_si512(at)                                    \
                    : _mm512_maskz_loadu_epi8((__mmask64)((1ull << (16 * blocks)) - 1ull), at);           \
                const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(v, table);                          \
                const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);    \
                const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table);    \
                const __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table);   \
                const __m512 s = _mm512_permutexvar_ps(_mm512_loadu_si512(STEP_SCALE[q]), s16);            \
                const uint16_t *xc = xp + (g0 + 4 * q) * 32;                                              \
                for (int r = 0; r < R; r++) {                                                             \
                    const uint16_t *xr = xc + r * P;                                                      \
                    __m512 t = _mm512_dpbf16_ps(zero, w0, (__m512bh)_mm512_loadu_si512(xr));              \
                    t = _mm512_dpbf16_ps(t, w1, (__m512bh)_mm512_loadu_si512(xr + 32));                   \
                    t = _mm512_dpbf16_ps(t, w2, (__m512bh)_mm512_loadu_si512(xr + 64));                   \
                    t = _mm512_dpbf16_ps(t, w3, (__m512bh)_mm512_loadu_si512(xr + 96));                   \
                    acc[r] = _mm512_fmadd_ps(t, s, acc[r]);                                               \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < R; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);                              \
    }
ROW_KERNEL_BF16(1)
ROW_KERNEL_BF16(2)
ROW_KERNEL_BF16(4)
ROW_KERNEL_BF16(8)

/* One weight row against R (1, 2, 4 or 8) reordered rows of x. */
static inline void rows_bf16(int R, const uint8_t *b, const uint8_t *sc, int64_t G, const uint16_t *xp, int64_t P,
                             float *sums) {
    if (R == 8) row_kernel_bf16_8(b, sc, G, xp, P, sums);
    else if (R == 4) row_kernel_bf16_4(b, sc, G, xp, P, sums);
    else if (R == 2) row_kernel_bf16_2(b, sc, G, xp, P, sums);
    else row_kernel_bf16_1(b, sc, G, xp, P, sums);
}
#endif

/* How many of `left` rows of x the next kernel call takes: 8, 4, 2 or 1. */
static inline int take_rows(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

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
        const int64_t P = 128 * ((G + 3) / 4);
        uint16_t *xp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n * P + 1));
        if (xp == NULL) return -1;
        permute_x((const uint16_t *)x, n, in, P, xp);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o = 0; o < out; o++) {
            const uint8_t *b = blocks + o * G * 16, *sc = scales + o * G;
            const float add = bias == NULL ? 0.0f : bf16_to_f32(((const uint16_t *)bias)[o]);
            float sums[8];
            for (int64_t r0 = 0; r0 < n;) {
                const int64_t left = n - r0;
                const int R = take_rows(left);
                const uint16_t *xr = xp + r0 * P;
                rows_bf16(R, b, sc, G, xr, P, sums);
                for (int r = 0; r < R; r++) ((uint16_t *)y)[(r0 + r) * out + o] = f32_to_bf16(sums[r] + add);
                r0 += R;
            }
        }
        free(xp);
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
            const int R = take_rows(left);
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

/* bf16 rounding of each step of gptoss.model.swiglu as torch runs it on bf16 tensors (every operation
   computes in fp32 and rounds its result): the gate clamped from above, the linear part on both sides,
   gate * sigmoid(alpha * gate) * (linear + 1). NaN stays NaN through the clamps, as in torch. */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline float swiglu_bf16(float gate, float lin, float alpha, float limit) {
    gate = gate > limit ? limit : gate;
    lin = lin > limit ? limit : lin < -limit ? -limit : lin;
    const float a = round_bf16(alpha * gate);
    const float sig = round_bf16(1.0f / (1.0f + expf(-a)));
    const float gs = round_bf16(gate * sig);
    return round_bf16(gs * round_bf16(lin + 1.0f));
}

/* The mixture of experts of a few tokens, MXFP4 experts, bf16 activations, in one call (gptoss.cpu
   MXFP4Experts, decoding): the twin of gptoss.model.experts_forward. x [T, D]; ids [T, k] and weights
   [T, k] fp32 from the router; gate_up codes [E, 2I, D/32, 16] + scales [E, 2I, D/32] + bias [E, 2I];
   down codes [E, D, I/32, 16] + scales [E, D, I/32] + bias [E, D]; out [T, D]. The (token, slot) pairs
   are grouped by expert; gate_up rows go out in pairs (gate 2i, linear 2i + 1), so each thread makes
   its own SwiGLU outputs, written straight into the order the down product reads; then down; then
   per token the weighted outputs summed in fp32 in slot order and rounded once. Two barriers in all,
   where a torch loop launches a few dozen operations and two parallel regions per expert. Returns 0;
   -1 where this build has no bf16 dot product, D or I is not a multiple of 32, an id is out of range,
   or scratch memory could not be allocated. */
int gptoss_mxfp4_moe(const uint16_t *x, int64_t T, int64_t D, int64_t k, const int64_t *ids, const float *weights,
                     int64_t E, int64_t I, const uint8_t *b1, const uint8_t *s1, const uint16_t *bias1,
                     const uint8_t *b2, const uint8_t *s2, const uint16_t *bias2, float alpha, float limit,
                     uint16_t *out, int threads) {
#ifdef HAVE_BF16_DOT
    if (D % 32 != 0 || I % 32 != 0 || T < 1 || k < 1) return -1;
    const int64_t n = T * k, G1 = D / 32, G2 = I / 32;
    const int64_t P1 = 128 * ((G1 + 3) / 4), P2 = 128 * ((G2 + 3) / 4);
    for (int64_t p = 0; p < n; p++)
        if (ids[p] < 0 || ids[p] >= E) return -1;
    /* pairs sorted by expert (ascending), token order within one: row r of the sorted list is pair[r] */
    int64_t *pair = (int64_t *)malloc(sizeof(int64_t) * (size_t)(3 * n + 2 * E + 1));
    uint16_t *xp = (uint16_t *)calloc((size_t)(n * (P1 + P2)), sizeof(uint16_t));
    float *y = (float *)malloc(sizeof(float) * (size_t)(n * D));
    if (pair == NULL || xp == NULL || y == NULL) {
        free(pair); free(xp); free(y);
        return -1;
    }
    int64_t *row_of = pair + n, *first = pair + 2 * n, *count = first + E, *runs = count + E;
    memset(count, 0, sizeof(int64_t) * (size_t)E);
    for (int64_t p = 0; p < n; p++) count[ids[p]]++;
    int64_t used = 0;
    for (int64_t e = 0, at = 0; e < E; e++) {
        first[e] = at;
        at += count[e];
        if (count[e] > 0) runs[used++] = e;
        count[e] = 0;
    }
    for (int64_t p = 0; p < n; p++) {
        const int64_t e = ids[p], r = first[e] + count[e]++;
        pair[r] = p;
        row_of[p] = r;
    }
    uint16_t *act = xp + n * P1; /* SwiGLU outputs, [n, P2], in the order the down product reads */
    for (int64_t r = 0; r < n; r++) permute_x(x + (pair[r] / k) * D, 1, D, P1, xp + r * P1);
#pragma omp parallel num_threads(threads)
    {
        float sums[2][8];
#pragma omp for schedule(guided, 64)
        for (int64_t job = 0; job < used * I; job++) {
            const int64_t e = runs[job / I], i = job % I, rows = count[e];
            for (int64_t r0 = 0; r0 < rows;) {
                const int64_t left = rows - r0;
                const int R = take_rows(left);
                const uint16_t *xr = xp + (first[e] + r0) * P1;
                for (int h = 0; h < 2; h++) {
                    const int64_t o = e * 2 * I + 2 * i + h;
                    const uint8_t *b = b1 + o * G1 * 16, *sc = s1 + o * G1;
                    rows_bf16(R, b, sc, G1, xr, P1, sums[h]);
                    const float add = bf16_to_f32(bias1[o]);
                    for (int r = 0; r < R; r++) sums[h][r] = round_bf16(sums[h][r] + add);
                }
                /* element i of the down product's input sits where permute_x puts it */
                const int64_t at = 128 * (i / 128) + 32 * (i % 4) + (i % 128) / 4;
                for (int r = 0; r < R; r++)
                    act[(first[e] + r0 + r) * P2 + at] = f32_to_bf16(swiglu_bf16(sums[0][r], sums[1][r], alpha, limit));
                r0 += R;
            }
        }
#pragma omp for schedule(guided, 64)
        for (int64_t job = 0; job < used * D; job++) {
            const int64_t e = runs[job / D], d = job % D, rows = count[e];
            const int64_t o = e * D + d;
            const uint8_t *b = b2 + o * G2 * 16, *sc = s2 + o * G2;
            const float add = bf16_to_f32(bias2[o]);
            for (int64_t r0 = 0; r0 < rows;) {
                const int64_t left = rows - r0;
                const int R = take_rows(left);
                const uint16_t *ar = act + (first[e] + r0) * P2;
                rows_bf16(R, b, sc, G2, ar, P2, sums[0]);
                for (int r = 0; r < R; r++) y[(first[e] + r0 + r) * D + d] = round_bf16(sums[0][r] + add);
                r0 += R;
            }
        }
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++)
            for (int64_t t = 0; t < T; t++) {
                float total = 0.0f;
                for (int64_t s = 0; s < k; s++) {
                    const float weighted = y[row_of[t * k + s] * D + d] * weights[t * k + s];
                    total += weighted;
                }
                out[t * D + d] = f32_to_bf16(total);
            }
    }
    free(pair); free(xp); free(y);
    return 0;
#else
    (void)x; (void)T; (void)D; (void)k; (void)ids; (void)weights; (void)E; (void)I; (void)b1; (void)s1;
    (void)bias1; (void)b2; (void)s2; (void)bias2; (void)alpha; (void)limit; (void)out; (void)threads;
    return -1;
#endif
}

/* One new token's attention for every head (decoding), the twin of gptoss.model.attention_with_sinks
   at T = 1: q [B, K, G, Dh] (bf16 or fp32, rotated), keys and values fp32 [B, S, K, Dh] with element
   (b, j, h, d) at b * sb + h * sk + j * Dh + d (the KV cache's own layout), key positions at
   k_pos[b * pb + j] (negative: padding), q_pos [B]. The query is scaled by 1/sqrt(Dh) (rounded to fp32 as
   torch does), a key is seen when q_pos - window < its position <= q_pos (window < 0: no window), the
   head's sink joins the softmax as one more logit with no value; all in fp32, the output rounded once
   to q's dtype. Heads are split between threads. */
int gptoss_decode_attention(const void *q, int q_bf16, int64_t B, int64_t K, int64_t G, int64_t Dh, const float *k,
                            const float *v, int64_t S, int64_t sb, int64_t sk, const int64_t *k_pos, int64_t pb,
                            const int64_t *q_pos, const float *sinks, int64_t window, void *out, int threads) {
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(threads * (S + 2 * Dh) + 1));
    if (scratch == NULL) return -1;
    const float scale = (float)sqrt((double)Dh);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t head = 0; head < B * K * G; head++) {
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        float *p = scratch + thread * (S + 2 * Dh), *qs = p + S, *acc = qs + Dh;
        const int64_t b = head / (K * G), h = (head / G) % K;
        for (int64_t d = 0; d < Dh; d++) {
            const float x = q_bf16 ? bf16_to_f32(((const uint16_t *)q)[head * Dh + d]) : ((const float *)q)[head * Dh + d];
            qs[d] = x / scale;
        }
        const int64_t now = q_pos[b], oldest = window < 0 ? -1 : (now - window < -1 ? -1 : now - window);
        const float sink = sinks[head % (K * G)];
        float top = sink;
        for (int64_t j = 0; j < S; j++) {
            const int64_t at = k_pos[b * pb + j];
            if (at <= oldest || at > now) {
                p[j] = -INFINITY;
                continue;
            }
            const float *kj = k + b * sb + h * sk + j * Dh;
            float part[16] = {0};
            int64_t d = 0;
            for (; d + 16 <= Dh; d += 16)
                for (int i = 0; i < 16; i++) part[i] += qs[d + i] * kj[d + i];
            float s = 0.0f;
            for (; d < Dh; d++) s += qs[d] * kj[d];
            for (int i = 0; i < 16; i++) s += part[i];
            p[j] = s;
            if (s > top) top = s;
        }
        float total = expf(sink - top);
        for (int64_t j = 0; j < S; j++) {
            p[j] = p[j] == -INFINITY ? 0.0f : expf(p[j] - top);
            total += p[j];
        }
        for (int64_t d = 0; d < Dh; d++) acc[d] = 0.0f;
        for (int64_t j = 0; j < S; j++) {
            const float w = p[j] / total, *vj = v + b * sb + h * sk + j * Dh;
            for (int64_t d = 0; d < Dh; d++) acc[d] += w * vj[d];
        }
        for (int64_t d = 0; d < Dh; d++) {
            if (q_bf16) ((uint16_t *)out)[head * Dh + d] = f32_to_bf16(acc[d]);
            else ((float *)out)[head * Dh + d] = acc[d];
        }
    }
    free(scratch);
    return 0;
}
