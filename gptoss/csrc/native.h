/* The native CPU kernels of gptoss: what every file shares (gptoss/native.py builds the .c files of
   this folder into one library and calls it through ctypes).

   Files by job:
     linear.c     MXFP4 -> dense (dequant), y = x W^T with W read as MXFP4 (mxfp4_linear), and a plain
                  bf16 weight read in place (bf16_linear)
     moe.c        a few tokens through a whole MoE layer of MXFP4 experts in one call
     attention.c  one new token's attention with sinks over the fp32 KV cache
     rows.h       the row products linear.c and moe.c share (one weight row against 1-8 rows of x)
     layout.c     the argument structs' sizes and offsets, for the tests of the ctypes mirrors

   MXFP4: blocks [rows, G, 16] uint8, two E2M1 codes per byte, the LOW nibble the earlier element;
   scales [rows, G] uint8, E8M0, the block's scale 2^(s - 127). A weight is [out, in], in = 32 G.

   Every entry point returns a gptoss_status; the wide calls take one argument struct each, mirrored
   once as a ctypes.Structure in native.py (gptoss_layout lets the tests hold the two to each other). */

#ifndef GPTOSS_NATIVE_H
#define GPTOSS_NATIVE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_BF16_DOT 1 /* vdpbf16ps: the bf16 pair products of moe.c and the bf16 paths of linear.c */
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum gptoss_status {
    GPTOSS_OK = 0,
    GPTOSS_NO_KERNEL = 1,  /* this build has no kernel for the call (no AVX512-BF16): use torch */
    GPTOSS_BAD_SHAPE = 2,  /* a width that is not a multiple of 32, or an empty batch */
    GPTOSS_BAD_EXPERT = 3, /* a routed expert id outside 0 .. E - 1 */
    GPTOSS_NO_MEMORY = 4,  /* scratch memory could not be allocated */
};

/* gptoss_mxfp4_moe: x [T, D] bf16; ids [T, k] int64 and weights [T, k] fp32 from the router; gate_up
   codes [E, 2I, D/32, 16] + scales [E, 2I, D/32] + bias [E, 2I] bf16; down codes [E, D, I/32, 16] +
   scales [E, D, I/32] + bias [E, D] bf16; out [T, D] bf16. */
struct gptoss_moe_args {
    const uint16_t *x;
    const int64_t *ids;
    const float *weights;
    const uint8_t *gate_up_blocks, *gate_up_scales;
    const uint16_t *gate_up_bias;
    const uint8_t *down_blocks, *down_scales;
    const uint16_t *down_bias;
    uint16_t *out;
    int64_t T, D, k, E, I;
    float alpha, limit;
    int32_t threads;
};

/* gptoss_decode_attention: q [B, K, G, Dh] (bf16 when q_bf16, else fp32, rotated); keys and values fp32
   [B, S, K, Dh] with element (b, j, h, d) at b * batch_stride + h * head_stride + j * Dh + d (the KV
   cache's own layout); key positions at k_pos[b * pos_stride + j] (negative: padding); q_pos [B];
   sinks [K * G] fp32; window < 0: none; out as q. */
struct gptoss_attention_args {
    const void *q;
    const float *k, *v, *sinks;
    const int64_t *k_pos, *q_pos;
    void *out;
    int64_t B, K, G, Dh, S, batch_stride, head_stride, pos_stride, window;
    int32_t q_bf16, threads;
};

static const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

ALWAYS_INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

ALWAYS_INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

ALWAYS_INLINE float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* The E8M0 scale 2^(s - 127) as fp32, built in its bits: s in the exponent field, s = 0 (2^-127, below
   fp32's normal range) as its subnormal pattern, s = 255 the exponent of infinity (the loader refuses
   the E8M0 NaN before a kernel sees it). No table: nothing to initialise, nothing written at run time. */
ALWAYS_INLINE float e8m0(uint8_t s) {
    const uint32_t bits = s == 0 ? 0x00400000u : (uint32_t)s << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* How many of `left` rows of x the next row-kernel call takes: 8, 4, 2 or 1. */
ALWAYS_INLINE int take_rows(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

#endif
