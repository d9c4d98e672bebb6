/* One new token's attention for every head (decoding), the twin of gptoss.model.attention_with_sinks
   at T = 1 (arguments: native.h, struct gptoss_attention_args). The query is scaled by 1/sqrt(Dh)
   (rounded to fp32 as torch does), a key is seen when q_pos - window < its position <= q_pos (window < 0:
   no window), the head's sink joins the softmax as one more logit with no value; all in fp32, the output
   rounded once to q's dtype. Heads are split between threads. Portable C. */

#include "native.h"

int gptoss_decode_attention(const struct gptoss_attention_args *a) {
    const int64_t K = a->K, G = a->G, Dh = a->Dh, S = a->S, window = a->window;
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(a->threads * (S + 2 * Dh) + 1));
    if (scratch == NULL) return GPTOSS_NO_MEMORY;
    const float scale = (float)sqrt((double)Dh);
#pragma omp parallel for num_threads(a->threads) schedule(static)
    for (int64_t head = 0; head < a->B * K * G; head++) {
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        float *p = scratch + thread * (S + 2 * Dh), *qs = p + S, *acc = qs + Dh;
        const int64_t b = head / (K * G), h = (head / G) % K;
        for (int64_t d = 0; d < Dh; d++) {
            const int64_t at = head * Dh + d;
            const float x = a->q_bf16 ? bf16_to_f32(((const uint16_t *)a->q)[at]) : ((const float *)a->q)[at];
            qs[d] = x / scale;
        }
        const int64_t now = a->q_pos[b], oldest = window < 0 ? -1 : (now - window < -1 ? -1 : now - window);
        const float sink = a->sinks[head % (K * G)];
        const float *keys = a->k + b * a->batch_stride + h * a->head_stride;
        const float *values = a->v + b * a->batch_stride + h * a->head_stride;
        float top = sink;
        for (int64_t j = 0; j < S; j++) {
            const int64_t at = a->k_pos[b * a->pos_stride + j];
            if (at <= oldest || at > now) {
                p[j] = -INFINITY;
                continue;
            }
            const float *kj = keys + j * Dh;
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
            const float w = p[j] / total, *vj = values + j * Dh;
            for (int64_t d = 0; d < Dh; d++) acc[d] += w * vj[d];
        }
        for (int64_t d = 0; d < Dh; d++) {
            if (a->q_bf16) ((uint16_t *)a->out)[head * Dh + d] = f32_to_bf16(acc[d]);
            else ((float *)a->out)[head * Dh + d] = acc[d];
        }
    }
    free(scratch);
    return GPTOSS_OK;
}
