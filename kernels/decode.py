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
                                                            (kernels/attention_decode.py, two launches)
  _decode_linear_kernel  attention out, W_o, b_o, x         x += o_proj(out), in place
  _decode_router_kernel  x, norm gain, router W, b          RMSNorm; router logits; the normed x for the
                                                            experts, quantized (the first program)
  _decode_gate_up_kernel logits, normed x, W1 (MXFP4), b1   top-k of the logits on the device (no sort),
                                                            the slot's expert's gate_up rows, SwiGLU,
                                                            quantized; each slot's expert id and weight
  _decode_down_kernel    act, W2 (MXFP4), b2, x             every slot's expert's down rows in one tile,
                                                            bias, routing weight; summed, x += it, in place

Grids put thousands of warps on the weights: one program per (head, sequence) for q/k/v, per 8 output
rows for the dense products, per (64 rows, slot) for gate_up, per (8 rows x k slots) for down. Products
run on CUDA cores: at one token a 16-row MMA would be 15/16 padding.

How the expert kernels stream MXFP4 (_mx_matvec): their input activations are carried as integers, per
block of 32 values q = round(v * 32,512 / max|v|) in [-32,512, 32,512] (16 bits), as two int8 parts
h = round(q / 255) and l = q - 255 h (_quantize_store: the router kernel writes the normed x so, and each
gate_up program the 32 outputs of its rows, one block of the down product's input). A thread owns one
16-byte MX block of a row per trip, loaded as four int32 words of eight codes; kernels/mxfp4.py's
E2M1_DOT_PTX turns four codes into the bytes 12 + 2 E2M1 with two byte permutes (prmt: a table lookup
with the sign in the selector) and one or, and dp4a sums four byte products exactly in int32, for h and
l apart: 13 integer instructions per eight codes, no conversion, no float per element. Once per block:
the correction -12 sum(q) (stored with the block), one conversion and one multiply by 2^(s - 127) x the
block's scale. What this costs: each input value within max|block| / 65,024 (1.5e-5 of its block's
largest), where bf16 rounds each value to 2^-9 of itself. Loads run a trip ahead in two sets of
registers that take turns, so none is waited on in the trip that issues it. Blocks and rows past the
end read the last one (a cache hit) with scale 0 or are not stored, so no weight load carries a mask.
Offsets are int32 (fusable() refuses expert weights of 8 GiB or more a layer). The compile gate
(tests/compile_gate.py) prints their static cost per launch, 20b at one token, sm_90a, Triton 3.9 (3.6):
gate_up 2.64 (2.69) and down 2.64 (2.66) SASS instructions per weight element (the fp32 route before:
4.75 and 4.91), 24 resident warps per SM each, 2,028 (2,064) and 1,014 (1,020) serial instructions per
warp, no shared-memory op and no load waited on in the K loop.

Every intermediate is rounded where the plain path rounds it (bf16 after the norm, after each product
and bias, after RoPE's products, after each residual add), so the two agree to bf16 rounding of
different summation orders and the experts' 16-bit inputs; tests/test_decode_kernels.py holds them to
that. Reference: the plain path,
gptoss.generate.decode_step(..., fused=False).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss.kernels import mxfp4
from gptoss.kernels.attention_core import NO_WINDOW
from gptoss.kernels.attention_decode import attention_decode
from gptoss.kernels.moe import ExpertWeights, expert_weights
from gptoss.kernels.mxfp4 import INTERPRET, e2m1_dot_block, e8m0_to_fp32
from gptoss.kernels.rounding import rounded

# the quantized activations' constants (kernels/mxfp4.py), for @triton.jit code
Q_MAX, Q_PARTS, U_ZERO = tl.constexpr(mxfp4.Q_MAX), tl.constexpr(mxfp4.Q_PARTS), tl.constexpr(mxfp4.U_ZERO)
ROUNDER = tl.constexpr(1.5 * 2.0**23)
QUANTIZE_BLOCKS = tl.constexpr(4)  # blocks of 32 the router kernel quantizes at once
TRIPS_PER_LOOP = tl.constexpr(2)  # _mx_matvec's trips a loop iteration (its two sets of registers)
BLOCK_WORDS = tl.constexpr(20)  # int32 a quantized block of 32: 16 of int8 parts, scale, correction, 2 unused

# (BLOCK_N rows, BLOCK_K columns or BLOCK_G MX blocks of 32, num_warps) per kernel
QKV = (128, 4)  # BLOCK_K, warps; BLOCK_N is half a head (RoPE pairs the halves)
LINEAR = (8, 256, 4)
ROUTER = (8, 256, 4)
GATE_UP = (64, 4, 8)  # 64 rows = 32 SwiGLU outputs, one block of act; 4 MX blocks a trip: a block a thread
DOWN = (8, 8, 8)  # 8 rows of each of the k slots' experts; 8 MX blocks a trip: a block a thread


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
def _normed(x_ptr, gain_ptr, k, mask, r):
    """RMSNorm of columns k as the plain path rounds it: (x * r) * gain in fp32, to x's dtype."""
    x = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gain_ptr + k, mask=mask, other=0.0)
    return rounded(x * r * g, x_ptr)


@triton.jit
def _decode_qkv_kernel(
    x_ptr,
    gain_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    wv_ptr,
    bv_ptr,  # x [B, D]; W [heads * Dh, D]
    cos_ptr,
    sin_ptr,  # [B, Dh / 2] bf16, the step's rotation
    q_ptr,  # [B, Hq * Dh] out
    k_cache_ptr,
    v_cache_ptr,  # [B, Hkv, slots, Dh]
    pos_cache_ptr,  # [B, slots] int32
    pos_ptr,  # [B] int32, the step's positions
    column_ptr,  # 0-d int64: the column this step writes (slot = column % slots)
    D,
    slots,
    eps,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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
    a = rounded(tl.sum(first, 1) + tl.load(bias_ptr + rows).to(tl.float32), x_ptr)
    c = rounded(tl.sum(second, 1) + tl.load(bias_ptr + rows + HALF).to(tl.float32), x_ptr)
    if h < HQ + HKV:  # RoPE, rounded per operation as bf16 tensors are: (a cos - c sin, c cos + a sin)
        cos = tl.load(cos_ptr + b * HALF + j).to(tl.float32)
        sin = tl.load(sin_ptr + b * HALF + j).to(tl.float32)
        a, c = (
            rounded(rounded(a * cos, x_ptr) - rounded(c * sin, x_ptr), x_ptr),
            rounded(rounded(c * cos, x_ptr) + rounded(a * sin, x_ptr), x_ptr),
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
    a_ptr,
    w_ptr,
    bias_ptr,
    x_ptr,  # a [B, K], W [N, K], bias [N], x [B, N] (updated in place)
    N,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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
    y = rounded(tl.sum(acc, 1) + tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32), x_ptr)
    x = tl.load(x_ptr + b * N + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + b * N + n, (x + y).to(x_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _decode_router_kernel(
    x_ptr,
    gain_ptr,
    w_ptr,
    bias_ptr,  # x [B, D]; router W [E, D], bias [E]
    logits_ptr,  # [B, E] fp32 out (bf16 values, as the plain path's router output)
    xq_ptr,  # [B, D / 32, BLOCK_WORDS] int32 out: the normed x the experts read, quantized
    D,
    E,
    eps,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    b = tl.program_id(1).to(tl.int64)
    e_mask = e < E
    xb = x_ptr + b * D
    r = _rms(xb, D, eps, BLOCK_K)
    if tl.program_id(0) == 0:  # the normed x, quantized in blocks of 32 for the expert kernels
        G = D // 32
        for g0 in range(0, G, QUANTIZE_BLOCKS):
            blocks = g0 + tl.arange(0, QUANTIZE_BLOCKS)
            k = blocks[:, None] * 32 + tl.arange(0, 32)[None, :]
            xn = _normed(xb, gain_ptr, k, k < D, r)  # [QUANTIZE_BLOCKS, 32]
            at = b * G + blocks
            _quantize_store(xn, xq_ptr + at * BLOCK_WORDS, blocks < G)
    acc = tl.zeros([BLOCK_E, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < D
        xn = _normed(xb, gain_ptr, k, mask, r)
        w = tl.load(w_ptr + e[:, None].to(tl.int64) * D + k[None, :], mask=e_mask[:, None] & mask[None, :], other=0.0)
        acc += w.to(tl.float32) * xn[None, :]
    z = rounded(tl.sum(acc, 1) + tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32), x_ptr)
    tl.store(logits_ptr + b * E + e, z, mask=e_mask)


@triton.jit
def _mx_words(w_ptr, s_ptr, base, g, G: tl.constexpr):
    """MX blocks g [BLOCK_G] of the rows whose first block is at `base` [BLOCK_N] (row * G): the codes as
    int32 words [BLOCK_N, BLOCK_G, 4] (one 16-byte load per block) and the scale bytes [BLOCK_N, BLOCK_G].
    Blocks past the row's end read its last block (a cache hit; _mx_trip gives them scale 0), so no load
    needs a mask."""
    at = base[:, None] + tl.minimum(g, G - 1)[None, :]
    words = w_ptr.to(tl.pointer_type(tl.int32)) + (at * 4)[:, :, None] + tl.arange(0, 4)[None, None, :]
    return tl.load(words), tl.load(s_ptr + at)


@triton.jit
def _q_words(q_ptr, first, g, G: tl.constexpr):
    """Blocks g [BLOCK_G] of a quantized vector (_quantize_store's layout: int32 [.., BLOCK_WORDS] per
    block) whose first block is block `first` of q_ptr, an int32 scalar (one vector) or [BLOCK_N] (one per
    row): the four parts a block's code word j is dotted with, as [1 or BLOCK_N, BLOCK_G, 4] int32 each
    (element j: h of codes 8j..8j+3, h of 8j+4..8j+7, then l of the same), the block's scale [1 or BLOCK_N,
    BLOCK_G] fp32 and its correction -12 sum(q) (int32). Blocks past the end read the last one (_mx_trip
    gives them scale 0). Offsets are int32, and one address serves the whole block."""
    at = tl.minimum(g, G - 1)
    if len(first.shape) == 0:
        block = (first + at)[None, :]
    else:
        block = first[:, None] + at[None, :]
    m = q_ptr + block * BLOCK_WORDS
    q = m[:, :, None] + tl.arange(0, 4)[None, None, :]
    scale = tl.load(m + 16).to(tl.float32, bitcast=True)
    return tl.load(q), tl.load(q + 4), tl.load(q + 8), tl.load(q + 12), scale, tl.load(m + 17)


@triton.jit
def _rint(x):
    """fp32 x (|x| < 2^22) rounded to the nearest integer, ties to even: adding 1.5 x 2^23 leaves no
    fraction bits. Plain adds (no floor instruction, which ptxas emits flushing subnormals), the same in
    the interpreter."""
    return (x + ROUNDER) - ROUNDER


@triton.jit
def _quantize_store(v, q_ptr, mask):
    """Blocks of 32 activations v [R, 32] (fp32) -> the integers q = round(v * Q_MAX / max|v|) of each
    block, stored at q_ptr ([R] pointers to each block's BLOCK_WORDS int32) as int8 parts h = round(q / 255)
    and l = q - 255 h in words 0-15 (h of words 0, 2, 4, 6 | h of 1, 3, 5, 7 | l of the same, word k
    holding values 4k..4k+3), then in word 16 the block's scale max|v| / Q_MAX / 2 (fp32 bits; the 1/2
    because the products are of 2 E2M1) and in word 17 -12 sum(q). |v - 2 scale q| <= max|v| / 65,024."""
    i = tl.arange(0, 32)
    top = tl.max(tl.abs(v), 1)  # [R]
    inv = tl.where(top > 0, Q_MAX / tl.where(top > 0, top, 1.0), 0.0)
    q = _rint(v * inv[:, None])  # |q| <= Q_MAX, exact in fp32
    h = _rint(q * (1.0 / Q_PARTS))  # q / 255 is never within 0.002 of a half: h is exact
    low = q - h * Q_PARTS  # in [-127, 127]
    k = i // 4
    at = ((k % 2) * 4 + k // 2) * 4 + i % 4  # byte of h within the block; l is 32 bytes further
    out = q_ptr.to(tl.pointer_type(tl.int8))[:, None] + at[None, :]
    tl.store(out, h.to(tl.int32).to(tl.int8), mask=mask[:, None])
    tl.store(out + 32, low.to(tl.int32).to(tl.int8), mask=mask[:, None])
    tl.store(q_ptr + 16, (top * (0.5 / Q_MAX)).to(tl.int32, bitcast=True), mask=mask)
    tl.store(q_ptr + 17, (tl.sum(q, 1) * -U_ZERO).to(tl.int32), mask=mask)


@triton.jit
def _mx_loads(w_ptr, s_ptr, base, q_ptr, first, g, G: tl.constexpr):
    """What one trip reads: the weight's words and scale bytes of blocks g (_mx_words) and the quantized
    vector's parts, scales and corrections (_q_words), as one tuple."""
    word, scale = _mx_words(w_ptr, s_ptr, base, g, G)
    xa, xb, xc, xd, xs, xcorr = _q_words(q_ptr, first, g, G)
    return word, scale, xa, xb, xc, xd, xs, xcorr


@triton.jit
def _mx_factor(loaded, valid):
    """A trip's per-block numbers from _mx_loads: the factor 2^(s - 127) x the vector block's scale (0 for
    blocks not `valid` [BLOCK_G]) and the correction -12 sum(q), [BLOCK_N or 1, BLOCK_G] each."""
    _, scale, _, _, _, _, xs, xcorr = loaded
    factor = e8m0_to_fp32(scale)  # 2^(s-127); s=0: 2^-127
    return tl.where(valid[None, :], factor * xs, 0.0), xcorr


@triton.jit
def _mx_trip(loaded, factor, xcorr, tables, INTERPRET: tl.constexpr):
    """One trip of a product with an MXFP4 weight: _mx_loads' words [BLOCK_N, BLOCK_G, 4] against the
    quantized vector's parts -> [BLOCK_N, BLOCK_G] fp32: each block's 32 products summed exactly in int32
    (e2m1_dot_block, from the correction -12 sum(q): the sum of 2 E2M1 q), then scaled once (_mx_factor)."""
    word, _, xa, xb, xc, xd, _, _ = loaded
    total = e2m1_dot_block(word, xa, xb, xc, xd, tables, xcorr, INTERPRET)
    return total.to(tl.float32) * factor


@triton.jit
def _mx_matvec(
    w_ptr, s_ptr, rows, G: tl.constexpr, q_ptr, first, lut_ptr, BLOCK_G: tl.constexpr, INTERPRET: tl.constexpr
):
    """Rows `rows` [BLOCK_N] (int32) of an MXFP4 weight with G blocks per row, dot a vector quantized by
    _quantize_store (its first block `first` of q_ptr: a scalar, or one per row) -> [BLOCK_N] fp32.
    lut_ptr: the four words of U_TABLES.

    A thread holds one 16-byte block of a row per trip. Two sets of registers take turns (TRIPS_PER_LOOP
    trips a loop iteration): a trip reads one set, and that set is loaded again at once, for the trip
    after next, while the other set's trip runs. So every load has a trip's arithmetic between it and its
    use, and no set is ever copied into the other (with one set and its successor, ptxas copies the
    loaded registers at the end of each trip, and the copy waits for the load). A trip past the last
    block reads the last one with scale 0. G is a compile-time constant."""
    # the byte tables per row (rows >= 0, so every row reads word 0 on): loaded as one value for all
    # threads, ptxas keeps them in uniform registers and copies them into vector registers before each use
    lut = lut_ptr + tl.minimum(rows, 0)[:, None]
    tables = (tl.load(lut), tl.load(lut + 1), tl.load(lut + 2), tl.load(lut + 3))
    base = rows * G
    lane = tl.arange(0, BLOCK_G)
    first_set = _mx_loads(w_ptr, s_ptr, base, q_ptr, first, lane, G)
    second_set = _mx_loads(w_ptr, s_ptr, base, q_ptr, first, BLOCK_G + lane, G)
    acc = tl.zeros([rows.shape[0], BLOCK_G], dtype=tl.float32)
    for g0 in range(0, G, TRIPS_PER_LOOP * BLOCK_G):  # trips g0 and g0 + BLOCK_G
        factor, xcorr = _mx_factor(first_set, g0 + lane < G)
        acc += _mx_trip(first_set, factor, xcorr, tables, INTERPRET)
        first_set = _mx_loads(w_ptr, s_ptr, base, q_ptr, first, g0 + 2 * BLOCK_G + lane, G)
        factor, xcorr = _mx_factor(second_set, g0 + BLOCK_G + lane < G)
        acc += _mx_trip(second_set, factor, xcorr, tables, INTERPRET)
        second_set = _mx_loads(w_ptr, s_ptr, base, q_ptr, first, g0 + 3 * BLOCK_G + lane, G)
    return tl.sum(acc, 1)


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
    logits_ptr,  # [B, E] fp32
    xq_ptr,  # the normed x, quantized: [B, D / 32, BLOCK_WORDS] int32
    w_ptr,
    s_ptr,
    bias_ptr,  # W1 blocks [E, 2I, D/32, 16], scales [E, 2I, D/32], bias [E, 2I]
    aq_ptr,  # out: the act of each slot, quantized: [B, TOP_K, I / 32, BLOCK_WORDS] int32
    route_ptr,  # [B, TOP_K, 2] fp32 out: each slot's expert id and weight, for the down kernel
    lut_ptr,  # int32 [4]: U_TABLES
    I,
    E,
    alpha,
    limit,
    D: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (rows, pair): the slot's expert's gate_up rows n (gate 2j, linear 2j + 1) . normed x,
    plus bias, then the clamped SwiGLU: act[j] for the BLOCK_N / 2 = 32 outputs of those rows, one block
    of the down product's input, quantized here."""
    pair = tl.program_id(1)
    b = pair // TOP_K
    expert, weight = _slot_expert(logits_ptr, b, pair % TOP_K, E, TOP_K, BLOCK_E)
    if tl.program_id(0) == 0:
        tl.store(route_ptr + pair * 2, expert.to(tl.float32))  # exact: expert ids are far below 2^24
        tl.store(route_ptr + pair * 2 + 1, weight)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < 2 * I
    rows = expert * 2 * I + tl.minimum(n, 2 * I - 1)  # rows past the end read the last one, not stored
    G: tl.constexpr = D // 32
    h = _mx_matvec(w_ptr, s_ptr, rows, G, xq_ptr, b * G, lut_ptr, BLOCK_G, INTERPRET)
    h += tl.load(bias_ptr + expert * 2 * I + n, mask=n_mask, other=0.0).to(tl.float32)  # fp32, as the plain kernel's
    gate, linear = tl.split(tl.reshape(h, (BLOCK_N // 2, 2)))
    gate = tl.minimum(gate, limit)
    linear = tl.minimum(tl.maximum(linear, -limit), limit)
    act = rounded(gate * tl.sigmoid(alpha * gate) * (linear + 1), bias_ptr)  # as the plain kernel's bf16 act
    at = pair * (I // 32) + tl.program_id(0) + tl.arange(0, 1)  # [1]: this program's block
    _quantize_store(tl.reshape(act, (1, BLOCK_N // 2)), aq_ptr + at * BLOCK_WORDS, at >= 0)


@triton.jit
def _decode_down_kernel(
    route_ptr,  # [B, TOP_K, 2] fp32 (expert, weight)
    aq_ptr,  # the act of each slot, quantized: [B, TOP_K, I / 32, BLOCK_WORDS] int32
    w_ptr,
    s_ptr,
    bias_ptr,  # W2 blocks [E, D, I/32, 16], scales [E, D, I/32], bias [E, D]
    x_ptr,  # [B, D] residual stream, updated in place
    lut_ptr,  # int32 [4]: U_TABLES
    D,
    I: tl.constexpr,
    TOP_K: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (rows, b): x[b, n] += the sum over the k slots of weight * (act[b, slot] . W2_e[n] + b2_e[n]),
    rounded to x's dtype as the plain path rounds it.

    The tile's rows are the k experts' rows n (SLOTS = k rounded up to a power of two; a padding slot reads
    expert 0 with weight 0), each against its own slot's act, so one K loop streams all k experts and
    nothing else runs inside it."""
    b = tl.program_id(1)
    r = tl.arange(0, SLOTS * BLOCK_N)
    slot = tl.minimum(r // BLOCK_N, TOP_K - 1)
    n = tl.program_id(0) * BLOCK_N + r % BLOCK_N
    expert = tl.load(route_ptr + (b * TOP_K + slot) * 2).to(tl.int32)  # [SLOTS * BLOCK_N]
    weight = tl.where(r // BLOCK_N < TOP_K, tl.load(route_ptr + (b * TOP_K + slot) * 2 + 1), 0.0)
    rows = expert * D + tl.minimum(n, D - 1)  # rows past the end read the last one, not stored
    G: tl.constexpr = I // 32
    at = (b * TOP_K + slot) * G  # each row's slot's first act block
    y = _mx_matvec(w_ptr, s_ptr, rows, G, aq_ptr, at, lut_ptr, BLOCK_G, INTERPRET)
    y += tl.load(bias_ptr + expert * D + n, mask=n < D, other=0.0).to(tl.float32)
    out = tl.sum(tl.reshape(weight * y, (SLOTS, BLOCK_N)), 0)  # slot 0 first
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + b * D + n, mask=n < D, other=0.0).to(tl.float32)
    tl.store(x_ptr + b * D + n, (x + rounded(out, x_ptr)).to(x_ptr.dtype.element_ty), mask=n < D)


# --- launchers ---------------------------------------------------------------------------------------------


def decode_qkv(
    x: torch.Tensor,
    gain: torch.Tensor,
    eps: float,
    attn,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q: torch.Tensor,
    cache,
    pos: torch.Tensor,
    column: torch.Tensor,
) -> None:
    """x [B, D] -> q [B, Hq * Dh] written; k, v and positions written into `cache` (a LayerCache) at column."""
    B, D = x.shape
    Hq, Hkv, Dh = attn.num_kv_heads * attn.group, attn.num_kv_heads, attn.head_dim
    block_k, warps = QKV
    _decode_qkv_kernel[(Hq + 2 * Hkv, B)](
        x,
        gain,
        attn.q_proj.weight,
        attn.q_proj.bias,
        attn.k_proj.weight,
        attn.k_proj.bias,
        attn.v_proj.weight,
        attn.v_proj.bias,
        cos,
        sin,
        q,
        cache.k,
        cache.v,
        cache.pos,
        pos,
        column,
        D,
        cache.k.shape[2],
        eps,
        HQ=Hq,
        HKV=Hkv,
        HEAD_DIM=Dh,
        BLOCK_K=block_k,
        num_warps=warps,
    )


def decode_linear_residual(a: torch.Tensor, linear, x: torch.Tensor) -> None:
    """x += linear(a), in place: a [B, K], x [B, N]."""
    B, K = a.shape
    N = x.shape[1]
    block_n, block_k, warps = LINEAR
    _decode_linear_kernel[(triton.cdiv(N, block_n), B)](
        a, linear.weight, linear.bias, x, N, K, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps
    )


_TABLES: dict = {}


def _tables(device) -> torch.Tensor:
    """U_TABLES as an int32 tensor on `device`, made once per device (the expert kernels' byte tables)."""
    if device not in _TABLES:
        words = [w - (1 << 32) if w >= 1 << 31 else w for w in mxfp4.U_TABLES]
        _TABLES[device] = torch.tensor(words, dtype=torch.int32, device=device)
    return _TABLES[device]


def quantized(*shape: int, device) -> torch.Tensor:
    """Room for activations of `shape` (the last a multiple of 32) in the expert kernels' form: per block
    of 32, BLOCK_WORDS int32 (_quantize_store)."""
    *lead, n = shape
    return torch.empty(*lead, n // 32, BLOCK_WORDS.value, dtype=torch.int32, device=device)


def decode_router(x: torch.Tensor, gain: torch.Tensor, eps: float, router) -> tuple[torch.Tensor, torch.Tensor]:
    """-> router logits [B, E] fp32 and the normed x [B, D] quantized: the form the expert kernels read."""
    B, D = x.shape
    E = router.weight.shape[0]
    logits = torch.empty(B, E, dtype=torch.float32, device=x.device)
    xn = quantized(B, D, device=x.device)
    block_e, block_k, warps = ROUTER
    _decode_router_kernel[(triton.cdiv(E, block_e), B)](
        x,
        gain,
        router.weight,
        router.bias,
        logits,
        xn,
        D,
        E,
        eps,
        BLOCK_E=block_e,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return logits, xn


def decode_experts(
    logits: torch.Tensor,
    xn: torch.Tensor,
    w1: ExpertWeights,
    w2: ExpertWeights,
    top_k: int,
    alpha: float,
    limit: float,
    x: torch.Tensor,
) -> None:
    """x += the MoE of the normed x (decode_router's) through gate_up `w1` and down `w2`, experts chosen
    from `logits` on the device; in place."""
    B, D = x.shape
    E = logits.shape[1]
    I = w2.cols
    act = quantized(B, top_k, I, device=x.device)
    route = torch.empty(B, top_k, 2, dtype=torch.float32, device=x.device)
    lut = _tables(x.device)
    block_n, block_g, warps = GATE_UP
    _decode_gate_up_kernel[(triton.cdiv(2 * I, block_n), B * top_k)](
        logits,
        xn,
        w1.blocks,
        w1.scales,
        w1.bias,
        act,
        route,
        lut,
        I,
        E,
        alpha,
        limit,
        D=D,
        TOP_K=top_k,
        BLOCK_E=triton.next_power_of_2(E),
        BLOCK_N=block_n,
        BLOCK_G=block_g,
        INTERPRET=INTERPRET,
        num_warps=warps,
    )
    block_n, block_g, warps = DOWN
    _decode_down_kernel[(triton.cdiv(D, block_n), B)](
        route,
        act,
        w2.blocks,
        w2.scales,
        w2.bias,
        x,
        lut,
        D,
        I=I,
        TOP_K=top_k,
        SLOTS=triton.next_power_of_2(top_k),
        BLOCK_N=block_n,
        BLOCK_G=block_g,
        INTERPRET=INTERPRET,
        num_warps=warps,
    )


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
        if max(w.blocks.numel() for w in expert_weights(mlp.experts)) >= 2**33:
            return "expert weights of 8 GiB or more a layer (the expert kernels' offsets are int32 words)"
        if attn.head_dim % 2 or attn.head_dim & (attn.head_dim - 1):
            return "a head dim that is not a power of two"
    return None


def decode_layers(model, ids: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
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
        decode_qkv(
            x,
            layer.input_layernorm.weight,
            layer.input_layernorm.eps,
            attn,
            cos,
            sin,
            q,
            layer_cache,
            pos32,
            cache.column,
        )
        window = NO_WINDOW if attn.window is None else attn.window
        keys, values = layer_cache.k.transpose(1, 2), layer_cache.v.transpose(1, 2)  # [B, S, K, Dh] views
        out = attention_decode(q, keys, values, attn.sinks, pos32, layer_cache.pos, window)
        decode_linear_residual(out.view(B, K * G * Dh), attn.o_proj, x)
        norm = layer.post_attention_layernorm
        logits, xn = decode_router(x, norm.weight, norm.eps, mlp.router)
        decode_experts(logits, xn, *expert_weights(mlp.experts), mlp.top_k, mlp.alpha, mlp.limit, x)
    return model.model.norm(x)
