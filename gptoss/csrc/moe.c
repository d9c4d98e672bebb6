/* The mixture of experts of a few tokens, MXFP4 experts, bf16 activations, in one call (gptoss.cpu
   MXFP4Experts, decoding): the twin of gptoss.model.experts_forward (arguments: native.h,
   struct gptoss_moe_args). The (token, slot) pairs are grouped by expert; gate_up rows go out in pairs
   (gate 2i, linear 2i + 1), so each thread makes its own SwiGLU outputs, written straight into the
   order the down product reads; then down; then per token the weighted outputs summed in fp32 in slot
   order and rounded once. Two barriers in all, where a torch loop launches a few dozen operations and
   two parallel regions per expert. Needs the bf16 pair products (AVX512-BF16). */

#include "rows.h"

#ifdef HAVE_BF16_DOT
/* bf16 rounding of each step of gptoss.model.swiglu as torch runs it on bf16 tensors (every operation
   computes in fp32 and rounds its result): the gate clamped from above, the linear part on both sides,
   gate * sigmoid(alpha * gate) * (linear + 1). NaN stays NaN through the clamps, as in torch. */
ALWAYS_INLINE float swiglu_bf16(float gate, float lin, float alpha, float limit) {
    gate = gate > limit ? limit : gate;
    lin = lin > limit ? limit : lin < -limit ? -limit : lin;
    const float a = round_bf16(alpha * gate);
    const float sig = round_bf16(1.0f / (1.0f + expf(-a)));
    const float gs = round_bf16(gate * sig);
    return round_bf16(gs * round_bf16(lin + 1.0f));
}
#endif

int gptoss_mxfp4_moe(const struct gptoss_moe_args *a) {
#ifdef HAVE_BF16_DOT
    const int64_t T = a->T, D = a->D, k = a->k, E = a->E, I = a->I;
    if (D % 32 != 0 || I % 32 != 0 || T < 1 || k < 1) return GPTOSS_BAD_SHAPE;
    const int64_t n = T * k, G1 = D / 32, G2 = I / 32;
    const int64_t P1 = 128 * ((G1 + 3) / 4), P2 = 128 * ((G2 + 3) / 4);
    for (int64_t p = 0; p < n; p++)
        if (a->ids[p] < 0 || a->ids[p] >= E) return GPTOSS_BAD_EXPERT;
    /* pairs sorted by expert (ascending), token order within one: row r of the sorted list is pair[r] */
    int64_t *pair = (int64_t *)malloc(sizeof(int64_t) * (size_t)(3 * n + 2 * E + 1));
    uint16_t *xp = (uint16_t *)calloc((size_t)(n * (P1 + P2)), sizeof(uint16_t));
    float *y = (float *)malloc(sizeof(float) * (size_t)(n * D));
    if (pair == NULL || xp == NULL || y == NULL) {
        free(pair); free(xp); free(y);
        return GPTOSS_NO_MEMORY;
    }
    int64_t *row_of = pair + n, *first = pair + 2 * n, *count = first + E, *runs = count + E;
    memset(count, 0, sizeof(int64_t) * (size_t)E);
    for (int64_t p = 0; p < n; p++) count[a->ids[p]]++;
    int64_t used = 0;
    for (int64_t e = 0, at = 0; e < E; e++) {
        first[e] = at;
        at += count[e];
        if (count[e] > 0) runs[used++] = e;
        count[e] = 0;
    }
    for (int64_t p = 0; p < n; p++) {
        const int64_t e = a->ids[p], r = first[e] + count[e]++;
        pair[r] = p;
        row_of[p] = r;
    }
    uint16_t *act = xp + n * P1; /* SwiGLU outputs, [n, P2], in the order the down product reads */
    for (int64_t r = 0; r < n; r++) permute_x(a->x + (pair[r] / k) * D, 1, D, P1, xp + r * P1);
#pragma omp parallel num_threads(a->threads)
    {
        float sums[2][8];
#pragma omp for schedule(guided, 64)
        for (int64_t job = 0; job < used * I; job++) {
            const int64_t e = runs[job / I], i = job % I, rows = count[e];
            for (int64_t r0 = 0; r0 < rows;) {
                const int R = take_rows(rows - r0);
                const uint16_t *xr = xp + (first[e] + r0) * P1;
                for (int h = 0; h < 2; h++) {
                    const int64_t o = e * 2 * I + 2 * i + h;
                    rows_bf16(R, a->gate_up_blocks + o * G1 * 16, a->gate_up_scales + o * G1, G1, xr, P1, sums[h]);
                    const float add = bf16_to_f32(a->gate_up_bias[o]);
                    for (int r = 0; r < R; r++) sums[h][r] = round_bf16(sums[h][r] + add);
                }
                /* element i of the down product's input sits where permute_x puts it */
                const int64_t at = 128 * (i / 128) + 32 * (i % 4) + (i % 128) / 4;
                for (int r = 0; r < R; r++)
                    act[(first[e] + r0 + r) * P2 + at] = f32_to_bf16(swiglu_bf16(sums[0][r], sums[1][r], a->alpha, a->limit));
                r0 += R;
            }
        }
#pragma omp for schedule(guided, 64)
        for (int64_t job = 0; job < used * D; job++) {
            const int64_t e = runs[job / D], d = job % D, rows = count[e];
            const int64_t o = e * D + d;
            const float add = bf16_to_f32(a->down_bias[o]);
            for (int64_t r0 = 0; r0 < rows;) {
                const int R = take_rows(rows - r0);
                const uint16_t *ar = act + (first[e] + r0) * P2;
                rows_bf16(R, a->down_blocks + o * G2 * 16, a->down_scales + o * G2, G2, ar, P2, sums[0]);
                for (int r = 0; r < R; r++) y[(first[e] + r0 + r) * D + d] = round_bf16(sums[0][r] + add);
                r0 += R;
            }
        }
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++)
            for (int64_t t = 0; t < T; t++) {
                float total = 0.0f;
                for (int64_t s = 0; s < k; s++) {
                    const float weighted = y[row_of[t * k + s] * D + d] * a->weights[t * k + s];
                    total += weighted;
                }
                a->out[t * D + d] = f32_to_bf16(total);
            }
    }
    free(pair); free(xp); free(y);
    return GPTOSS_OK;
#else
    (void)a;
    return GPTOSS_NO_KERNEL;
#endif
}
