"""One decode step of a layer in seven launches: fused kernels for one token per sequence.

At one token per sequence every product is a matrix-vector product, the weights are read once and the
work per byte is tiny, so what a step costs is the bytes read plus a floor per launch (about 2 us on
Hopper even inside a CUDA graph). The plain path (gptoss.model with the Triton attention and MoE
kernels) issues about 55 kernels per layer: RMSNorm alone is 8, rotary 14, routing bookkeeping 7. Here
a layer is:

  kernel                 reads                              does
  _decode_qkv_kernel     x, norm gain, W_q/W_k/W_v, biases  RMSNorm, one head's q, k or v, RoPE; q to a
                                                            buffer, k and v (and the position) into the
                                                            static cache at the step's column
  attention decode       q, the cache                       split-K attention with sinks and its merge
                                                            (kernels/attention.py, two launches)
  _decode_linear_kernel  attention out, W_o, b_o, x         x += o_proj(out), in place
  _decode_router_kernel  x, norm gain, router W, b          RMSNorm; router logits; the normed x for the
                                                            experts (the first program)
  _decode_gate_up_kernel logits, normed x, W1 (MXFP4), b1   top-k of the logits on the device (no sort),
                                                            the slot's expert's gate_up rows, SwiGLU
  _decode_down_kernel    logits, act, W2 (MXFP4), b2, x     for each of the k slots: the expert's down rows,
                                                            bias, routing weight; summed, x += it, in place

Grids put thousands of warps on the weights: one program per (head, sequence) for q/k/v, per 8 output
rows for the dense products, per (32 rows, slot) for gate_up. Products run on CUDA cores (fp32
accumulation): at one token a 16-row MMA would be 15/16 padding. MXFP4 tiles are decoded in registers
by the helper the prefill kernels use (kernels/mxfp4.py: mxfp4_tile).

Every intermediate is rounded where the plain path rounds it (bf16 after the norm, after each product
and bias, after RoPE's products, after each residual add), so the two agree to bf16 rounding of
different summation orders; tests/test_decode_kernels.py holds them to that. Reference: the plain path,
gptoss.generate.decode_step(..., fused=False).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss.kernels.attention import NO_WINDOW, attention_decode
from gptoss.kernels.mxfp4 import INTERPRET, mxfp4_tile

# (BLOCK_N rows, BLOCK_K columns or BLOCK_G MX blocks of 32, num_warps) per kernel
QKV = (128, 4)  # BLOCK_K, warps; BLOCK_N is half a head (RoPE pairs the halves)
LINEAR = (8, 256, 4)
ROUTER = (8, 256, 4)
GATE_UP = (32, 4, 4)  # 32 rows = 16 SwiGLU outputs; 4 MX blocks = 128 values per step
DOWN = (16, 4, 4)  # gate_up's tile shape (see FUSED_MAX_BATCH in gptoss/generate.py)


@triton.jit
def _rms(x_ptr, D, eps, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the row at x_ptr, in fp32."""
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + k, mask=k < D, other=0.0).to(tl.float32)
        total += x * x
    return tl.rsqrt(tl.sum(total, 0) / D + eps)


@triton.jit
def _round(x, like):
    """fp32 x rounded to the element type of pointer `like` (the model's dtype), back in fp32: where the
    plain path holds a tensor in that dtype, the fused kernels round the same value the same way."""
    return x.to(like.dtype.element_ty).to(tl.float32)


@triton.jit
def _normed(x_ptr, gain_ptr, k, mask, r):
    """RMSNorm of columns k as the plain path rounds it: (x * r) * gain in fp32, to x's dtype."""
    x = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gain_ptr + k, mask=mask, other=0.0)
    return _round(x * r * g, x_ptr)


@triton.jit
def _decode_qkv_kernel(
    x_ptr, gain_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,  # x [B, D]; W [heads * Dh, D]
    cos_ptr, sin_ptr,  # [B, Dh / 2] bf16, the step's rotation
    q_ptr,  # [B, Hq * Dh] out
    k_cache_ptr, v_cache_ptr,  # [B, Hkv, slots, Dh]
    pos_cache_ptr,  # [B, slots] int32
    pos_ptr,  # [B] int32, the step's positions
    column_ptr,  # 0-d int64: the column this step writes (slot = column % slots)
    D, slots, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (head, b): RMSNorm(x[b]) @ rows of one q, k or v head, plus bias; RoPE on q and k."""
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    if h < HQ:
        w_ptr, bias_ptr, head = wq_ptr, bq_ptr, h
    elif h < HQ + HKV:
        w_ptr, bias_ptr, head = wk_ptr, bk_ptr, h - HQ
    else:
        w_ptr, bias_ptr, head = wv_ptr, bv_ptr, h - HQ - HKV
    xb = x_ptr + b * D
    r = _rms(xb, D, eps, BLOCK_K)
    j = tl.arange(0, HALF)
    rows = head * HEAD_DIM + j  # the head's first half; the second is rows + HALF
    first = tl.zeros([HALF, BLOCK_K], dtype=tl.float32)
    second = tl.zeros([HALF, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < D
        xn = _normed(xb, gain_ptr, k, mask, r)[None, :]
        w1 = tl.load(w_ptr + rows[:, None].to(tl.int64) * D + k[None, :], mask=mask[None, :], other=0.0)
        w2 = tl.load(w_ptr + (rows + HALF)[:, None].to(tl.int64) * D + k[None, :], mask=mask[None, :], other=0.0)
        first += w1.to(tl.float32) * xn
        second += w2.to(tl.float32) * xn
    a = _round(tl.sum(first, 1) + tl.load(bias_ptr + rows).to(tl.float32), x_ptr)
    c = _round(tl.sum(second, 1) + tl.load(bias_ptr + rows + HALF).to(tl.float32), x_ptr)
    if h < HQ + HKV:  # RoPE, rounded per operation as bf16 tensors are: (a cos - c sin, c cos + a sin)
        cos = tl.load(cos_ptr + b * HALF + j).to(tl.float32)
        sin = tl.load(sin_ptr + b * HALF + j).to(tl.float32)
        a, c = (
            _round(_round(a * cos, x_ptr) - _round(c * sin, x_ptr), x_ptr),
            _round(_round(c * cos, x_ptr) + _round(a * sin, x_ptr), x_ptr),
        )
    if h < HQ:
        out = q_ptr + (b * HQ + head) * HEAD_DIM + j
        tl.store(out, a.to(q_ptr.dtype.element_ty))
        tl.store(out + HALF, c.to(q_ptr.dtype.element_ty))
    else:
        slot = tl.load(column_ptr) % slots
        if h < HQ + HKV:
            cache = k_cache_ptr
        else:
            cache = v_cache_ptr
        out = cache + ((b * HKV + head) * slots + slot) * HEAD_DIM + j
        tl.store(out, a.to(k_cache_ptr.dtype.element_ty))
        tl.store(out + HALF, c.to(k_cache_ptr.dtype.element_ty))
        if h == HQ:  # one program per sequence records the slot's position
            tl.store(pos_cache_ptr + b * slots + slot, tl.load(pos_ptr + b))


@triton.jit
def _decode_linear_kernel(
    a_ptr, w_ptr, bias_ptr, x_ptr,  # a [B, K], W [N, K], bias [N], x [B, N] (updated in place)
    N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """x[b, n] += (a[b] @ W.T + bias)[n], each rounded to bf16 as the plain path's two kernels round."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1).to(tl.int64)
    n_mask = n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < K
        a = tl.load(a_ptr + b * K + k, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=n_mask[:, None] & mask[None, :], other=0.0)
        acc += w.to(tl.float32) * a[None, :]
    y = _round(tl.sum(acc, 1) + tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32), x_ptr)
    x = tl.load(x_ptr + b * N + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + b * N + n, (x + y).to(x_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _decode_router_kernel(
    x_ptr, gain_ptr, w_ptr, bias_ptr,  # x [B, D]; router W [E, D], bias [E]
    logits_ptr,  # [B, E] fp32 out (bf16 values, as the plain path's router output)
    xn_ptr,  # [B, D] out: the normed x the experts read, its even columns then its odd ones
    D, E, eps,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    b = tl.program_id(1).to(tl.int64)
    e_mask = e < E
    xb = x_ptr + b * D
    r = _rms(xb, D, eps, BLOCK_K)
    acc = tl.zeros([BLOCK_E, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < D
        xn = _normed(xb, gain_ptr, k, mask, r)
        if tl.program_id(0) == 0:  # even columns first, then odd ones: the experts read each half contiguously
            tl.store(xn_ptr + b * D + (k % 2) * (D // 2) + k // 2, xn.to(xn_ptr.dtype.element_ty), mask=mask)
        w = tl.load(w_ptr + e[:, None].to(tl.int64) * D + k[None, :], mask=e_mask[:, None] & mask[None, :], other=0.0)
        acc += w.to(tl.float32) * xn[None, :]
    z = _round(tl.sum(acc, 1) + tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32), x_ptr)
    tl.store(logits_ptr + b * E + e, z, mask=e_mask)


@triton.jit
def _halves(row_ptr, g, g_mask, HALF, BLOCK_G: tl.constexpr):
    """A vector stored as its even elements then its odd ones (HALF each): the even and the odd
    elements of MX blocks g, fp32, [BLOCK_G * 16] each, in mxfp4_tile's column order. Contiguous loads."""
    at = (g[:, None] * 16 + tl.arange(0, 16)[None, :]).reshape(BLOCK_G * 16)
    mask = (g_mask[:, None] & (tl.arange(0, 16) < 16)[None, :]).reshape(BLOCK_G * 16)
    even = tl.load(row_ptr + at, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(row_ptr + HALF + at, mask=mask, other=0.0).to(tl.float32)
    return even, odd


@triton.jit
def _slot_expert(logits_ptr, b, slot, E, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Routing on the device: the expert of top-k slot `slot` of row b (largest logit first; equal
    logits: the lower expert id) and its softmax weight over the k picked logits."""
    e = tl.arange(0, BLOCK_E)
    z = tl.load(logits_ptr + b * E + e, mask=e < E, other=float("-inf"))
    top = tl.max(z, 0)
    total = 0.0
    expert = 0
    picked = 0.0
    for j in tl.static_range(TOP_K):
        m = tl.max(z, 0)
        pick = tl.min(tl.where(z == m, e, BLOCK_E), 0)
        total += tl.exp(m - top)
        expert = tl.where(slot == j, pick, expert)
        picked = tl.where(slot == j, m, picked)
        z = tl.where(e == pick, float("-inf"), z)
    return expert, tl.exp(picked - top) / total


@triton.jit
def _decode_gate_up_kernel(
    logits_ptr, xn_ptr,  # [B, E] fp32, [B, D]
    w_ptr, s_ptr, bias_ptr,  # W1 blocks [E, 2I, D/32, 16], scales [E, 2I, D/32], bias [E, 2I]
    act_ptr,  # [B, TOP_K, I] out, each row's even outputs then its odd ones
    D, I, E, alpha, limit,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Program (rows, pair): the slot's expert's gate_up rows n (gate 2j, linear 2j + 1) . normed x,
    plus bias, then the clamped SwiGLU: act[j] for the BLOCK_N / 2 outputs of those rows."""
    pair = tl.program_id(1)
    b = (pair // TOP_K).to(tl.int64)
    expert, _ = _slot_expert(logits_ptr, b, pair % TOP_K, E, TOP_K, BLOCK_E)
    expert = expert.to(tl.int64)
    G = D // 32
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < 2 * I
    rows = expert * 2 * I + n
    acc = tl.zeros([BLOCK_N, BLOCK_G * 16], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        g_mask = g < G
        even, odd = mxfp4_tile(w_ptr, s_ptr, rows, g, n_mask[:, None] & g_mask[None, :], G, INTERPRET)
        x_even, x_odd = _halves(xn_ptr + b * D, g, g_mask, D // 2, BLOCK_G)
        acc += even.to(tl.float32) * x_even[None, :]  # two fused multiply-adds per pair, no separate add
        acc += odd.to(tl.float32) * x_odd[None, :]
    h = tl.sum(acc, 1) + tl.load(bias_ptr + expert * 2 * I + n, mask=n_mask, other=0.0).to(tl.float32)
    gate, linear = tl.split(tl.reshape(h, (BLOCK_N // 2, 2)))
    gate = tl.minimum(gate, limit)
    linear = tl.minimum(tl.maximum(linear, -limit), limit)
    act = gate * tl.sigmoid(alpha * gate) * (linear + 1)
    j = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    where = act_ptr + pair.to(tl.int64) * I + (j % 2) * (I // 2) + j // 2  # even outputs first, as xn
    tl.store(where, act.to(act_ptr.dtype.element_ty), mask=j < I)


@triton.jit
def _decode_down_kernel(
    logits_ptr, act_ptr,  # [B, E] fp32, [B, TOP_K, I]
    w_ptr, s_ptr, bias_ptr,  # W2 blocks [E, D, I/32, 16], scales [E, D, I/32], bias [E, D]
    x_ptr,  # [B, D] residual stream, updated in place
    D, I, E,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Program (rows, b): x[b, n] += sum over the k slots of weight * (act . W2_e[n] + b2_e[n])."""
    b = tl.program_id(1).to(tl.int64)
    G = I // 32
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < D
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for slot in range(TOP_K):  # a run-time slot, as gate_up's (pair % TOP_K), not an unrolled constant
        expert, weight = _slot_expert(logits_ptr, b, slot, E, TOP_K, BLOCK_E)
        expert = expert.to(tl.int64)
        rows = expert * D + n
        a = act_ptr + (b * TOP_K + slot) * I
        acc = tl.zeros([BLOCK_N, BLOCK_G * 16], dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            g_mask = g < G
            even, odd = mxfp4_tile(w_ptr, s_ptr, rows, g, n_mask[:, None] & g_mask[None, :], G, INTERPRET)
            a_even, a_odd = _halves(a, g, g_mask, I // 2, BLOCK_G)
            acc += even.to(tl.float32) * a_even[None, :]
            acc += odd.to(tl.float32) * a_odd[None, :]
        y = tl.sum(acc, 1) + tl.load(bias_ptr + expert * D + n, mask=n_mask, other=0.0).to(tl.float32)
        out += weight * y
    x = tl.load(x_ptr + b * D + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + b * D + n, (x + _round(out, x_ptr)).to(x_ptr.dtype.element_ty), mask=n_mask)


# --- launchers ---------------------------------------------------------------------------------------------


def decode_qkv(x, gain, eps, attn, cos, sin, q, cache, pos, column):
    """x [B, D] -> q [B, Hq * Dh] written; k, v and positions written into `cache` (a LayerCache) at column."""
    B, D = x.shape
    Hq, Hkv, Dh = attn.num_kv_heads * attn.group, attn.num_kv_heads, attn.head_dim
    block_k, warps = QKV
    _decode_qkv_kernel[(Hq + 2 * Hkv, B)](
        x, gain, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias, attn.v_proj.weight,
        attn.v_proj.bias, cos, sin, q, cache.k, cache.v, cache.pos, pos, column, D, cache.k.shape[2], eps,
        HQ=Hq, HKV=Hkv, HEAD_DIM=Dh, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip


def decode_linear_residual(a, linear, x):
    """x += linear(a), in place: a [B, K], x [B, N]."""
    B, K = a.shape
    N = x.shape[1]
    block_n, block_k, warps = LINEAR
    _decode_linear_kernel[(triton.cdiv(N, block_n), B)](
        a, linear.weight, linear.bias, x, N, K, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps
    )


def decode_router(x, gain, eps, router):
    """-> router logits [B, E] fp32 and the normed x [B, D] (x's dtype)."""
    B, D = x.shape
    E = router.weight.shape[0]
    logits = torch.empty(B, E, dtype=torch.float32, device=x.device)
    xn = torch.empty_like(x)
    block_e, block_k, warps = ROUTER
    _decode_router_kernel[(triton.cdiv(E, block_e), B)](
        x, gain, router.weight, router.bias, logits, xn, D, E, eps, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=warps
    )
    return logits, xn


def decode_experts(logits, xn, experts, top_k, alpha, limit, x):
    """x += the MoE of the normed xn [B, D], experts chosen from `logits` on the device; in place."""
    B, D = xn.shape
    E = logits.shape[1]
    I = experts.down_proj_blocks.shape[2] * 32
    act = torch.empty(B, top_k, I, dtype=xn.dtype, device=xn.device)
    block_e = triton.next_power_of_2(E)
    block_n, block_g, warps = GATE_UP
    _decode_gate_up_kernel[(triton.cdiv(2 * I, block_n), B * top_k)](
        logits, xn, experts.gate_up_proj_blocks, experts.gate_up_proj_scales, experts.gate_up_proj_bias, act,
        D, I, E, alpha, limit, TOP_K=top_k, BLOCK_E=block_e, BLOCK_N=block_n, BLOCK_G=block_g,
        INTERPRET=INTERPRET, num_warps=warps,
    )  # fmt: skip
    block_n, block_g, warps = DOWN
    _decode_down_kernel[(triton.cdiv(D, block_n), B)](
        logits, act, experts.down_proj_blocks, experts.down_proj_scales, experts.down_proj_bias, x,
        D, I, E, TOP_K=top_k, BLOCK_E=block_e, BLOCK_N=block_n, BLOCK_G=block_g, INTERPRET=INTERPRET,
        num_warps=warps,
    )  # fmt: skip


def fusable(model) -> str | None:
    """None if decode_layers can run `model`, else why not (the plain path then runs)."""
    from torch import nn

    if model.backend != "triton":
        return "the torch backend"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if any(type(getattr(attn, p)) is not nn.Linear for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "adapters on the attention projections"
        if type(mlp.router) is not nn.Linear or not mlp.experts.quantized or mlp.experts.has_lora:
            return "dense experts or expert adapters"
        if attn.head_dim % 2 or attn.head_dim & (attn.head_dim - 1):
            return "a head dim that is not a power of two"
    return None


def decode_layers(model, ids, pos, cache) -> torch.Tensor:
    """Every layer of one decode step on the fused kernels: ids, positions [B, 1] -> final-normed hidden
    [B, D]. Writes the cache as the plain path does (the caller advances its column)."""
    B = ids.shape[0]
    x = model.model.embed_tokens(ids[:, 0])  # [B, D], a fresh buffer the layers update in place
    cos, sin = model.model.rotary_emb(pos[:, 0])  # [B, Dh / 2] fp32, once for all layers
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    pos32 = pos.to(torch.int32)  # [B, 1]
    for layer, layer_cache in zip(model.model.layers, cache.layers):
        attn, mlp = layer.self_attn, layer.mlp
        K, G, Dh = attn.num_kv_heads, attn.group, attn.head_dim
        q = torch.empty(B, 1, K, G, Dh, dtype=x.dtype, device=x.device)
        decode_qkv(x, layer.input_layernorm.weight, layer.input_layernorm.eps, attn, cos, sin, q, layer_cache,
                   pos32, cache.column)  # fmt: skip
        window = NO_WINDOW if attn.window is None else attn.window
        keys, values = layer_cache.k.transpose(1, 2), layer_cache.v.transpose(1, 2)  # [B, S, K, Dh] views
        out = attention_decode(q, keys, values, attn.sinks, pos32, layer_cache.pos, window)
        decode_linear_residual(out.view(B, K * G * Dh), attn.o_proj, x)
        norm = layer.post_attention_layernorm
        logits, xn = decode_router(x, norm.weight, norm.eps, mlp.router)
        decode_experts(logits, xn, mlp.experts, mlp.top_k, mlp.alpha, mlp.limit, x)
    return model.model.norm(x)
