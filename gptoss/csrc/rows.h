/* One MXFP4 weight row against R rows of x (R = 1, 2, 4 or 8: each decoded block is used by all of
   them), fp32 sums into sums[0 .. R-1]. Shared by linear.c and moe.c. Each kernel is an always-inline
   function of R, called through a switch on R with a literal, so every R gets its own unrolled body. */

#ifndef GPTOSS_ROWS_H
#define GPTOSS_ROWS_H

#include "native.h"

/* fp32 rows: xe / xo hold the even / odd elements of each row of x (H = in / 2 floats each), so the low
   nibbles of a block meet xe and the high nibbles xo, 16 lanes at a time. */
ALWAYS_INLINE void row_f32(const int R, const uint8_t *b, const uint8_t *sc, int64_t G, const float *xe,
                           const float *xo, int64_t H, float *sums) {
#ifdef __AVX512F__
    const __m512 lut = _mm512_loadu_ps(FP4);
    const __m512i low = _mm512_set1_epi32(15);
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + g * 16)));
        const __m512 s = _mm512_set1_ps(e8m0(sc[g]));
        const __m512 wl = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(w, low), lut), s);
        const __m512 wh = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), lut), s);
        for (int r = 0; r < R; r++) {
            acc[r] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xe + r * H + g * 16), acc[r]);
            acc[r] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xo + r * H + g * 16), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
#else
    float acc[8][16];
    memset(acc, 0, sizeof(acc));
    for (int64_t g = 0; g < G; g++) {
        const float s = e8m0(sc[g]);
        float wl[16], wh[16];
        for (int i = 0; i < 16; i++) {
            wl[i] = FP4[b[g * 16 + i] & 15] * s;
            wh[i] = FP4[b[g * 16 + i] >> 4] * s;
        }
        for (int r = 0; r < R; r++)
            for (int i = 0; i < 16; i++) acc[r][i] += wl[i] * xe[r * H + g * 16 + i] + wh[i] * xo[r * H + g * 16 + i];
    }
    for (int r = 0; r < R; r++) {
        float t = 0.0f;
        for (int i = 0; i < 16; i++) t += acc[r][i];
        sums[r] = t;
    }
#endif
}

static inline void rows_f32(int R, const uint8_t *b, const uint8_t *sc, int64_t G, const float *xe, const float *xo,
                            int64_t H, float *sums) {
    switch (R) {
    case 8: row_f32(8, b, sc, G, xe, xo, H, sums); break;
    case 4: row_f32(4, b, sc, G, xe, xo, H, sums); break;
    case 2: row_f32(2, b, sc, G, xe, xo, H, sums); break;
    default: row_f32(1, b, sc, G, xe, xo, H, sums); break;
    }
}

#ifdef HAVE_BF16_DOT
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

/* 16 E8M0 bytes -> the fp32 powers of two, as e8m0() makes them, 16 lanes at a time. */
ALWAYS_INLINE __m512 scales16(const uint8_t *sc, int64_t count) {
    const __m512i s = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << count) - 1u), sc));
    const __m512i bits = _mm512_slli_epi32(s, 23);
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(bits, _mm512_testn_epi32_mask(s, s), _mm512_set1_epi32(0x00400000)));
}

ALWAYS_INLINE void row_bf16(const int R, const uint8_t *b, const uint8_t *sc, int64_t G, const uint16_t *xp, int64_t P,
                            float *sums) {
    const __m512 lut = _mm512_loadu_ps(FP4);
    const __m256i half = (__m256i)_mm512_cvtneps_pbh(lut);
    const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
    const __m512 zero = _mm512_setzero_ps();
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        const int64_t left = G - g0 < 16 ? G - g0 : 16;
        const __m512 s16 = scales16(sc + g0, left);
        for (int64_t q = 0; 4 * q < left; q++) {
            const int64_t blocks = left - 4 * q < 4 ? left - 4 * q : 4;
            const uint8_t *at = b + (g0 + 4 * q) * 16;
            const __m512i v = blocks == 4 ? _mm512_loadu_si512(at)
                                          : _mm512_maskz_loadu_epi8((__mmask64)((1ull << (16 * blocks)) - 1ull), at);
            const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(v, table);
            const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
            const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table);
            const __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table);
            const __m512 s = _mm512_permutexvar_ps(_mm512_loadu_si512(STEP_SCALE[q]), s16);
            const uint16_t *xc = xp + (g0 + 4 * q) * 32;
            for (int r = 0; r < R; r++) {
                const uint16_t *xr = xc + r * P;
                __m512 t = _mm512_dpbf16_ps(zero, w0, (__m512bh)_mm512_loadu_si512(xr));
                t = _mm512_dpbf16_ps(t, w1, (__m512bh)_mm512_loadu_si512(xr + 32));
                t = _mm512_dpbf16_ps(t, w2, (__m512bh)_mm512_loadu_si512(xr + 64));
                t = _mm512_dpbf16_ps(t, w3, (__m512bh)_mm512_loadu_si512(xr + 96));
                acc[r] = _mm512_fmadd_ps(t, s, acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

static inline void rows_bf16(int R, const uint8_t *b, const uint8_t *sc, int64_t G, const uint16_t *xp, int64_t P,
                             float *sums) {
    switch (R) {
    case 8: row_bf16(8, b, sc, G, xp, P, sums); break;
    case 4: row_bf16(4, b, sc, G, xp, P, sums); break;
    case 2: row_bf16(2, b, sc, G, xp, P, sums); break;
    default: row_bf16(1, b, sc, G, xp, P, sums); break;
    }
}
#endif

/* x [n, in] bf16 -> xp [n, P] with P = 128 * ceil(G / 4): step c's element 4w + k at 128 c + 32 k + w,
   zeros past `in` (so the padded blocks of the last step add nothing). The order row_bf16 reads. */
static inline void permute_x(const uint16_t *x, int64_t n, int64_t in, int64_t P, uint16_t *xp) {
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < P / 128; c++)
            for (int k = 0; k < 4; k++)
                for (int w = 0; w < 32; w++) {
                    const int64_t e = 128 * c + 4 * w + k;
                    xp[r * P + 128 * c + 32 * k + w] = e < in ? x[r * in + e] : 0;
                }
}

#endif
