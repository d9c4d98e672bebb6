"""Grouped expert matmuls with MXFP4 weights decoded in registers, forward and backward.

Rows are the (token, slot) pairs sorted by expert (kernels/routing.py). One kernel, four modes:

  GATE_UP      act[m, n] = swiglu(x[tok(m)] . W1[e, 2n] + b1[e, 2n],  x[tok(m)] . W1[e, 2n+1] + b1[e, 2n+1])
               (gate/linear rows of W1 are interleaved; saves the pre-activation h[m, 2I] for backward)
  DOWN         out[pair(m)] = w[pair(m)] * (act[m] . W2[e, n] + b2[e, n])        (saves y, unweighted)
  DOWN_BWD     gh[m, 2n | 2n+1] = swiglu'(h[m]) * sum_d w[pair(m)] g[tok(m), d] W2[e, d, n]
  UP_BWD       gx[pair(m), n] = sum_j gh[m, j] W1[e, j, n]
The per-token sum over the k slots (the combine) is a torch reduction over [T, k, D].
Expert weights stay MXFP4 in memory: each K-step loads packed bytes and scales and decodes them to
fp32 in registers, never writing a bf16 copy. Weights are frozen: no weight gradients.

Grid: (cdiv(P, BLOCK_M) + E, cdiv(N, BLOCK_N)). Every expert needs cdiv(count_e, BLOCK_M) row tiles,
at most cdiv(P, BLOCK_M) + E in all; program_id(0) finds its expert and tile from the counts on the
device (no host synchronisation), and surplus programs exit at once.
Reference: gptoss.model.MoE (the torch path), which the tests compare against.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from gptoss.kernels.mxfp4 import INTERPRET, e2m1_to_float
from gptoss.kernels.routing import Routing, route

GATE_UP, DOWN, DOWN_BWD, UP_BWD = 0, 1, 2, 3


def _configs() -> list[triton.Config]:
    """Tile shapes for H100 and the 2880-wide dimensions (2880 = 45 x 64: BLOCK_K/BLOCK_N 64 leave no
    ragged tail). GPTOSS_MOE_CONFIG="BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages" pins one config."""
    pinned = os.environ.get("GPTOSS_MOE_CONFIG")
    if pinned:
        m, n, k, warps, stages = (int(v) for v in pinned.split(","))
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)]
    if INTERPRET:  # the CPU interpreter: one small config, no tuning
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in [
            (16, 64, 128, 4, 4),  # decode: few rows per expert, bandwidth-bound
            (16, 128, 64, 4, 4),
            (32, 64, 128, 4, 4),
            (64, 64, 64, 4, 3),
            (64, 128, 64, 8, 3),
            (128, 64, 64, 8, 3),  # prefill: many rows per expert, compute-bound
            (128, 128, 64, 8, 3),
        ]
    ]


@triton.jit
def _weight_tile(w_ptr, s_ptr, r, c, mask, C):
    """W[r, c] of one expert's [R, C] MXFP4 weight (blocks along C), decoded to fp32."""
    byte = tl.load(w_ptr + r * (C // 2) + c // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((c % 2) * 4).to(tl.int32)) & 15
    scale = tl.load(s_ptr + r * (C // 32) + c // 32, mask=mask, other=127).to(tl.float32)
    return e2m1_to_float(code) * tl.exp2(scale - 127.0)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:  # fp32 data, or the interpreter (which multiplies bf16 dot operands as raw integers)
        return tl.dot(a.to(tl.float32), b, acc, input_precision="ieee")
    return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)


@triton.autotune(configs=_configs(), key=["N", "K", "MODE"])
@triton.jit
def _moe_matmul_kernel(
    a_ptr,  # GATE_UP: x [T, D]; DOWN: act [P, I]; DOWN_BWD: grad_out [T, D]; UP_BWD: gh [P, 2I]
    w_ptr,  # [E, R, C/2] uint8: an expert's weight [R, C] = [out, in] in MXFP4 (W1: [2I, D], W2: [D, I])
    s_ptr,  # [E, R, C/32] uint8 scales
    bias_ptr,  # GATE_UP: b1 [E, 2I]; DOWN: b2 [E, D]
    out_ptr,  # GATE_UP: act [P, I]; DOWN: out [P, D] (pair order); DOWN_BWD: gh [P, 2I]; UP_BWD: gx [P, D] (pair order)
    aux_ptr,  # GATE_UP: saves h [P, 2I]; DOWN: saves y [P, D] (pair order); DOWN_BWD: reads h
    gate_ptr,  # [P] fp32 routing weight of each pair
    counts_ptr,  # [E] int32
    offsets_ptr,  # [E] int32
    sorted_pairs_ptr,  # [P] int32
    K,
    N,
    R,
    C,
    E,
    TOPK,
    alpha,
    limit,
    MODE: tl.constexpr,
    SAVE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # --- which expert and which of its row tiles this program handles -------------------------
    e_range = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + e_range, mask=e_range < E, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, axis=0)
    pid = tl.program_id(0)
    expert = tl.sum((tiles_end <= pid).to(tl.int32), axis=0)
    if expert >= E:
        return
    first_tile = tl.sum(tl.where(e_range == expert, tiles_end - tiles, 0), axis=0)
    count = tl.sum(tl.where(e_range == expert, counts, 0), axis=0)
    local = (pid - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = local < count
    m = (tl.load(offsets_ptr + expert) + local).to(tl.int64)  # sorted rows [BLOCK_M]
    pair = tl.load(sorted_pairs_ptr + m, mask=m_mask, other=0).to(tl.int64)
    a_row = pair // TOPK if (MODE == GATE_UP or MODE == DOWN_BWD) else m
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    w_e = w_ptr + expert.to(tl.int64) * R * (C // 2)
    s_e = s_ptr + expert.to(tl.int64) * R * (C // 32)
    if MODE == DOWN or MODE == DOWN_BWD:
        gate = tl.load(gate_ptr + pair, mask=m_mask, other=0.0)

    # --- main loop over the contraction dimension -------------------------------------------------
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_lin = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # GATE_UP: the linear half
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        a = tl.load(a_ptr + a_row[:, None] * K + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if MODE == DOWN_BWD:
            a = a.to(tl.float32) * gate[:, None]
        b_mask = k_mask[:, None] & n_mask[None, :]
        if MODE == GATE_UP:  # contract over W1's columns; gate rows 2n, linear rows 2n+1
            acc = _dot(a, _weight_tile(w_e, s_e, 2 * n[None, :], k[:, None], b_mask, C), acc, UPCAST)
            acc_lin = _dot(a, _weight_tile(w_e, s_e, 2 * n[None, :] + 1, k[:, None], b_mask, C), acc_lin, UPCAST)
        elif MODE == DOWN:  # contract over W2's columns
            acc = _dot(a, _weight_tile(w_e, s_e, n[None, :], k[:, None], b_mask, C), acc, UPCAST)
        else:  # backward: contract over the weight's rows
            acc = _dot(a, _weight_tile(w_e, s_e, k[:, None], n[None, :], b_mask, C), acc, UPCAST)

    # --- epilogues ------------------------------------------------------------------------------------
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if MODE == GATE_UP:
        g = acc + tl.load(bias_ptr + expert * 2 * N + 2 * n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        lin = acc_lin + tl.load(bias_ptr + expert * 2 * N + 2 * n + 1, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SAVE:
            h_ptrs = aux_ptr + m[:, None] * (2 * N) + 2 * n[None, :]
            tl.store(h_ptrs, g.to(aux_ptr.dtype.element_ty), mask=mn_mask)
            tl.store(h_ptrs + 1, lin.to(aux_ptr.dtype.element_ty), mask=mn_mask)
        g = tl.minimum(g, limit)  # the gate is clamped from above only
        lin = tl.minimum(tl.maximum(lin, -limit), limit)
        act = g * tl.sigmoid(alpha * g) * (lin + 1.0)
        tl.store(out_ptr + m[:, None] * N + n[None, :], act.to(out_ptr.dtype.element_ty), mask=mn_mask)
    elif MODE == DOWN:
        y = acc + tl.load(bias_ptr + expert * N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SAVE:
            tl.store(aux_ptr + pair[:, None] * N + n[None, :], y, mask=mn_mask)
        tl.store(out_ptr + pair[:, None] * N + n[None, :], y * gate[:, None], mask=mn_mask)
    elif MODE == DOWN_BWD:  # acc = d loss / d act; chain through the clamped SwiGLU
        h_ptrs = aux_ptr + m[:, None] * (2 * N) + 2 * n[None, :]
        g = tl.load(h_ptrs, mask=mn_mask, other=0.0).to(tl.float32)
        lin = tl.load(h_ptrs + 1, mask=mn_mask, other=0.0).to(tl.float32)
        gc = tl.minimum(g, limit)
        lc = tl.minimum(tl.maximum(lin, -limit), limit)
        sig = tl.sigmoid(alpha * gc)
        d_gate = acc * (lc + 1.0) * (sig + alpha * gc * sig * (1.0 - sig))
        d_gate = tl.where(g <= limit, d_gate, 0.0)
        d_lin = tl.where((lin >= -limit) & (lin <= limit), acc * gc * sig, 0.0)
        gh_ptrs = out_ptr + m[:, None] * (2 * N) + 2 * n[None, :]
        tl.store(gh_ptrs, d_gate.to(out_ptr.dtype.element_ty), mask=mn_mask)
        tl.store(gh_ptrs + 1, d_lin.to(out_ptr.dtype.element_ty), mask=mn_mask)
    else:
        tl.store(out_ptr + pair[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mn_mask)


def _launch(mode, a, blocks, scales, bias, out, aux, gate, routing: Routing, K, N, alpha=1.702, limit=7.0, save=False):
    E, R, G, _ = blocks.shape
    P = routing.sorted_pairs.numel()
    if P == 0:
        return out

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_M"]) + E, triton.cdiv(N, meta["BLOCK_N"]))

    dummy = out  # for pointer arguments a mode does not use
    _moe_matmul_kernel[grid](
        a.contiguous(), blocks, scales, dummy if bias is None else bias, out, dummy if aux is None else aux,
        dummy if gate is None else gate, routing.counts, routing.offsets, routing.sorted_pairs,
        K, N, R, G * 32, E, routing.top_k, alpha, limit,
        MODE=mode, SAVE=save, UPCAST=INTERPRET or a.dtype == torch.float32, BLOCK_E=triton.next_power_of_2(E),
    )  # fmt: skip
    return out


def _check_experts(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != 16 or scales.shape != blocks.shape[:-1]:
        raise ValueError(
            f"expected MXFP4 blocks [E, R, C/32, 16] and scales [E, R, C/32], got {tuple(blocks.shape)}, {tuple(scales.shape)}"
        )
    if not (blocks.is_contiguous() and scales.is_contiguous()):
        raise ValueError("MXFP4 expert blocks and scales must be contiguous")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be bfloat16 or float32, got {x.dtype}")


def moe_gate_up_fwd(x, routing, blocks, scales, bias, alpha, limit, save):
    """x [T, D] -> act [P, I] in sorted-row order (and h [P, 2I] when `save`)."""
    _check_experts(x, blocks, scales)
    P, D, I2 = routing.sorted_pairs.numel(), x.shape[1], blocks.shape[1]
    act = torch.empty(P, I2 // 2, dtype=x.dtype, device=x.device)
    h = torch.empty(P, I2, dtype=x.dtype, device=x.device) if save else None
    _launch(
        GATE_UP, x, blocks, scales, bias, act, h, None, routing, K=D, N=I2 // 2, alpha=alpha, limit=limit, save=save
    )
    return act, h


def moe_down_fwd(act, routing, gate, blocks, scales, bias, save):
    """act [P, I] (sorted rows) -> weighted outputs [P, D] fp32 in pair order (and y unweighted when `save`)."""
    P, I, D = act.shape[0], act.shape[1], blocks.shape[1]
    out = torch.empty(P, D, dtype=torch.float32, device=act.device)
    y = torch.empty(P, D, dtype=torch.float32, device=act.device) if save else None
    _launch(DOWN, act, blocks, scales, bias, out, y, gate, routing, K=I, N=D, save=save)
    return out, y


def moe_down_bwd(grad_out, routing, gate, blocks, scales, h, alpha, limit):
    """grad of the MoE output [T, D] -> grad of the pre-activation h [P, 2I] (sorted rows)."""
    P, D, I = h.shape[0], grad_out.shape[1], h.shape[1] // 2
    gh = torch.empty(P, 2 * I, dtype=h.dtype, device=h.device)
    _launch(DOWN_BWD, grad_out, blocks, scales, None, gh, h, gate, routing, K=D, N=I, alpha=alpha, limit=limit)
    return gh


def moe_gate_up_bwd(gh, routing, blocks, scales, D):
    """grad of h [P, 2I] (sorted rows) -> grad of the gathered inputs [P, D] fp32 in pair order."""
    gx = torch.empty(gh.shape[0], D, dtype=torch.float32, device=gh.device)
    _launch(UP_BWD, gh, blocks, scales, None, gx, None, None, routing, K=gh.shape[1], N=D)
    return gx


class MoEFunction(torch.autograd.Function):
    """out [T, D] = sum_slots w[t, s] * expert_{ids[t, s]}(x[t]); differentiable in x and w only."""

    @staticmethod
    def forward(ctx, x, weights, routing, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, alpha, limit):
        T, D = x.shape
        save = any(ctx.needs_input_grad[:2])
        gate = weights.reshape(-1).float().contiguous()
        act, h = moe_gate_up_fwd(x, routing, w1_blocks, w1_scales, b1, alpha, limit, save)
        out_pairs, y = moe_down_fwd(act, routing, gate, w2_blocks, w2_scales, b2, save)
        if save:
            ctx.save_for_backward(h, y, gate, w1_blocks, w1_scales, w2_blocks, w2_scales)
            ctx.routing, ctx.alpha, ctx.limit, ctx.x_dtype = routing, alpha, limit, x.dtype
        return out_pairs.view(T, routing.top_k, D).sum(1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        h, y, gate, w1_blocks, w1_scales, w2_blocks, w2_scales = ctx.saved_tensors
        routing, K = ctx.routing, ctx.routing.top_k
        T, D = grad_out.shape
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:  # d out / d w[t, s] = y[t, s]
            grad_w = torch.einsum("tkd,td->tk", y.view(T, K, D), grad_out.float())
        if ctx.needs_input_grad[0]:
            gh = moe_down_bwd(grad_out, routing, gate, w2_blocks, w2_scales, h, ctx.alpha, ctx.limit)
            gx_pairs = moe_gate_up_bwd(gh, routing, w1_blocks, w1_scales, D)
            grad_x = gx_pairs.view(T, K, D).sum(1).to(ctx.x_dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None


def moe(
    x: torch.Tensor, logits: torch.Tensor, top_k: int, experts, alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """The MoE block on x [T, D] given router logits [T, E]; `experts` is a gptoss.model.Experts (MXFP4).

    Routing ids come from the kernel; the routing weights are recomputed by torch from the picked
    logits when gradients are needed, so they flow back to the router."""
    routing = route(logits, top_k)
    weights = routing.weights
    if torch.is_grad_enabled() and logits.requires_grad:
        weights = torch.softmax(logits.gather(1, routing.ids.long()).float(), dim=-1)
    return MoEFunction.apply(
        x.contiguous(), weights, routing, experts.gate_up_proj_blocks, experts.gate_up_proj_scales,
        experts.gate_up_proj_bias, experts.down_proj_blocks, experts.down_proj_scales, experts.down_proj_bias,
        alpha, limit,
    )  # fmt: skip
