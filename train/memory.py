"""The trainer's peak memory for one example, worked out from the model's shapes.

A LoRA step with per-layer activation checkpointing holds, all the time: the frozen weights, the
adapters with their gradients and AdamW moments (fp32, 16 bytes per trainable number) and each
layer's input (the checkpoint, [T, D]). On top of that, one of two moments is the peak:

* the loss: `linear_cross_entropy` takes the supervised positions CHUNK_ROWS at a time, one fp32
  [chunk, V] logits tensor alive (under bf16 autocast the bf16 product it is copied from beside it),
  exponentiated and turned into its gradient in place, with the gathered rows and their gradient
  [N, D] in fp32;
* the backward of one layer, recomputed: its attention and MoE activations.

Attention. The torch reference materialises fp32 scores [H, T, S] per example: autograd keeps the
softmax output (with the sink column) and the probabilities reshaped for the value matmul (a copy,
the slice is not contiguous); in backward the gradients of the probabilities, of the padded slice and
of the softmax input exist beside them, about 4 score tensors at the peak (4 * H * T * S * 4 bytes).
The Triton kernel keeps q, k, v, the output and a fp32 log-sum-exp per row; its tiles live in
registers and shared memory.

MoE. The torch path (the CPU) keeps every routed expert's decoded weights for backward (all E of
them once T * k >= E) and its rows; the Triton kernel keeps the pre-activation h [T*k, 2I], no weights
and no expert outputs, and its backward makes d h beside it, then the fp32 d x of each pair [T*k, D].
Expert adapters on the kernel path add the SwiGLU output [T*k, I] (the down adapter's input), the
expert mask and the two rank products [T*k, E*r] in fp32, and in backward the fp32 gradients of the
adapters' inputs and outputs.
"""

from __future__ import annotations

from gptoss.adapter import default_expert_layers
from gptoss.config import ModelConfig
from gptoss.train.loss import CHUNK_ROWS

GiB = 1 << 30
# what training_peak returns, in the order the tables show it
PARTS = (
    "weights",
    "lora_state",
    "checkpoints",
    "logits",
    "attention_workspace",
    "moe_workspace",
    "layer_backward",
    "peak",
)


def weight_bytes(c: ModelConfig, dtype_bytes: int) -> int:
    """Frozen weights: experts as MXFP4 (17 bytes per 32 numbers), the rest in the model dtype."""
    D, E, L = c.hidden_size, c.num_local_experts, c.num_hidden_layers
    experts = E * c.expert_weight_params * 17 // 32 + E * c.expert_bias_params * dtype_bytes  # packed + scales, biases
    attention = c.attention_params * dtype_bytes
    router = c.router_params * dtype_bytes
    norms = 2 * D * 4  # RMSNorm gains stay fp32
    return L * (experts + attention + router + norms) + 2 * c.vocab_size * D * dtype_bytes + D * 4


def lora_numbers(c: ModelConfig, r: int, expert_layers: list[int]) -> int:
    """Trainable numbers: r x (in + out) per attention projection per layer, plus E x r x (in + out) per
    expert matrix in the expert layers."""
    D, I, E = c.hidden_size, c.intermediate_size, c.num_local_experts
    attention = r * ((D + c.q_dim) + 2 * (D + c.kv_dim) + (c.q_dim + D))
    experts = E * r * ((D + 2 * I) + (I + D))
    return c.num_hidden_layers * attention + len(expert_layers) * experts


def training_peak(
    c: ModelConfig,
    tokens: int,
    *,
    attention: str,
    moe: str,
    dtype_bytes: int,
    r: int = 8,
    expert_layers: list[int] | None = None,
    supervised: int | None = None,
) -> dict[str, float]:
    """Bytes of each part of one example's training step and the estimated peak.

    attention: "torch" (reference, scores materialised) or "triton"; moe: "torch" (decoded experts kept
    for backward in every layer) or "triton" (the kernels, expert adapters beside them)."""
    if expert_layers is None:
        expert_layers = default_expert_layers(c.num_hidden_layers)
    T, D, I, E, k = tokens, c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok
    H, b = c.num_attention_heads, dtype_bytes
    N = T if supervised is None else supervised
    P = T * k  # (token, expert) rows
    parts = {
        "weights": weight_bytes(c, b),
        "lora_state": 16 * lora_numbers(c, r, expert_layers),
        "checkpoints": c.num_hidden_layers * T * D * b,
        # one chunk's fp32 logits (and the bf16 product they are copied from), the rows and their gradient
        "logits": min(N, CHUNK_ROWS) * c.vocab_size * (4 + (b if b < 4 else 0)) + 2 * N * D * 4,
    }
    # one layer recomputed: its projections and rotations (q, k, v before and after RoPE, the output,
    # and their gradients), each [T, q_dim] or [T, kv_dim]
    layer_acts = T * (4 * c.q_dim + 4 * c.kv_dim + 4 * D) * b
    if attention == "torch":
        attn_ws = 4 * H * T * T * 4 + 2 * T * c.q_dim * 4  # 4 fp32 score tensors, fp32 q and its gradient
    else:
        attn_ws = 2 * T * c.q_dim * b + H * T * 4 * 2  # out and dO, log-sum-exp and Delta
    decoded = min(E, P) * (2 * I * D + D * I) * b  # the routed experts' weights, kept for backward
    moe_rows_torch = P * (2 * D + 3 * I) * b + 2 * P * D * 4  # gathered x, h, act, y; fp32 weighted y, pairs
    # h and its gradient, the pairs' fp32 d x and the routing weights' partial sums (cdiv(I, 32) a pair);
    # a recomputation makes no expert output (gptoss.checkpointing)
    moe_rows_triton = 2 * P * 2 * I * b + P * D * 4 + P * -(-I // 32) * 4
    # expert adapters beside the kernels: act; mask, z1, z2; backward's fp32 d y, d x and d act rows
    lora_rows = P * I * b + 3 * P * E * r * 4 + P * (2 * D + I) * 4
    if moe == "torch":
        moe_ws = decoded + moe_rows_torch
    else:
        moe_ws = moe_rows_triton + (lora_rows if expert_layers else 0)
    parts["layer_backward"] = layer_acts + attn_ws + moe_ws
    parts["attention_workspace"] = attn_ws
    parts["moe_workspace"] = moe_ws
    persistent = parts["weights"] + parts["lora_state"] + parts["checkpoints"]
    parts["peak"] = persistent + max(parts["logits"], parts["layer_backward"])
    return parts


def memory_table(tokens: int = 2048) -> str:
    """Markdown: gpt-oss-20b and -120b, bf16 on one GPU, before (torch attention) and after the
    attention kernel (the MoE kernel in both), GiB per part (docs/architecture.md shows this table)."""
    from gptoss.config import get_preset

    head = "| model | attention | weights | LoRA + AdamW | checkpoints | loss (logits) | attention workspace | MoE workspace | one layer's backward | peak |"
    lines = [head, "|" + "---|" * 10]
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        for label, attention in (("torch reference", "torch"), ("Triton kernel", "triton")):
            p = training_peak(get_preset(name), tokens, attention=attention, moe="triton", dtype_bytes=2)
            cells = " | ".join(f"{p[k] / GiB:.2f}" for k in PARTS)
            lines.append(f"| {name} | {label} | {cells} |")
    return "\n".join(lines)
