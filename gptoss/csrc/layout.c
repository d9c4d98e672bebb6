/* The argument structs' layout (native.h), for the tests that hold native.py's ctypes mirrors to it. */

#include "native.h"

/* The argument structs' layout, so native.py's ctypes mirrors can be held to it: which = 0 (moe) or
   1 (attention); field = -1 the size, else the offset of the field-th member in declaration order. */
int64_t gptoss_layout(int which, int field) {
#define AT(T, m) (int64_t) offsetof(struct T, m)
    static const int64_t moe[] = {AT(gptoss_moe_args, x), AT(gptoss_moe_args, ids), AT(gptoss_moe_args, weights),
        AT(gptoss_moe_args, gate_up_blocks), AT(gptoss_moe_args, gate_up_scales), AT(gptoss_moe_args, gate_up_bias),
        AT(gptoss_moe_args, down_blocks), AT(gptoss_moe_args, down_scales), AT(gptoss_moe_args, down_bias),
        AT(gptoss_moe_args, out), AT(gptoss_moe_args, T), AT(gptoss_moe_args, D), AT(gptoss_moe_args, k),
        AT(gptoss_moe_args, E), AT(gptoss_moe_args, I), AT(gptoss_moe_args, alpha), AT(gptoss_moe_args, limit),
        AT(gptoss_moe_args, threads)};
    static const int64_t attention[] = {AT(gptoss_attention_args, q), AT(gptoss_attention_args, k),
        AT(gptoss_attention_args, v), AT(gptoss_attention_args, sinks), AT(gptoss_attention_args, k_pos),
        AT(gptoss_attention_args, q_pos), AT(gptoss_attention_args, out), AT(gptoss_attention_args, B),
        AT(gptoss_attention_args, K), AT(gptoss_attention_args, G), AT(gptoss_attention_args, Dh),
        AT(gptoss_attention_args, S), AT(gptoss_attention_args, batch_stride), AT(gptoss_attention_args, head_stride),
        AT(gptoss_attention_args, pos_stride), AT(gptoss_attention_args, window), AT(gptoss_attention_args, q_bf16),
        AT(gptoss_attention_args, threads)};
#undef AT
    const int64_t *table = which == 0 ? moe : attention;
    const int64_t count = which == 0 ? (int64_t)(sizeof moe / sizeof *moe) : (int64_t)(sizeof attention / sizeof *attention);
    if (field < 0) return which == 0 ? (int64_t)sizeof(struct gptoss_moe_args) : (int64_t)sizeof(struct gptoss_attention_args);
    return field < count ? table[field] : -1;
}
