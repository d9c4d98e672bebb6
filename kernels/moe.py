"""Grouped expert matmuls with MXFP4 weights decoded in registers, forward and backward.

Rows are the (token, slot) pairs sorted by expert (kernels/routing.py). One kernel computes
out[m, n] = sum_k a[m, k] * W_e[k, n] for the rows m of one expert e, in four modes that differ in
which operand is gathered, which way the weight is read, and the epilogue:

  mode      a [rows, K]          weight read as            N, K          epilogue
  GATE_UP   x[token(m)]          W1 [2I, D], rows = n      2I, D         h = acc + b1 (saved); act = swiglu(h) [P, I]
  DOWN      act[m] (sorted)      W2 [D, I], rows = n       D, I          y = acc + b2 (saved); out[pair] = w * y
  DOWN_BWD  grad_out[token(m)]   W2 [D, I], rows = k       I, D          gh = swiglu'(h) * w * acc  [P, 2I]
  UP_BWD    gh[m] (sorted)       W1 [2I, D], rows = k      D, 2I         gx[pair] = acc

W1's rows interleave gate (2j) and linear (2j+1), so in GATE_UP one dot yields both halves of a tile
and the epilogue splits the column pairs; DOWN_BWD writes its two gradients back interleaved.
The combine over the k slots of a token is a torch sum over [T, k, D]. Weights are frozen; LoRA
adapters on the experts join through ADD: an fp32 [P, N] update (sorted rows) added to the product
in the epilogue (to h and y forward; to d act before the SwiGLU's backward and to gx), computed by
torch as one masked rank product for all experts (see "expert LoRA" below).

Weights stay MXFP4: each K step loads [rows, blocks, 16] packed bytes (16-byte vectors along the
packed dimension) and one scale per 32 values, decodes them in registers (kernels/mxfp4.py:
mxfp4_tile) and feeds a bf16 dot with fp32 accumulation. Forward modes read the weight along its
rows' packed dimension (K) and transpose the decoded tile; backward modes read it along N.

Grid: (row tiles, cdiv(N, BLOCK_N)). Expert e needs cdiv(count_e, BLOCK_M) row tiles; in all at most
cdiv(P, BLOCK_M) + min(E, P) - 1 (ceil(a) + ceil(b) <= ceil(a + b) + 1, over the non-empty experts),
so at decode (P = 4, BLOCK_M = 16) all 4 row tiles do work. Each program finds its expert from the
counts on the device (a search in chunks of 128 experts, no host synchronisation).
Autotune key: N, K, the mode, the dtype path and ROWS, the mean rows per used expert in buckets
(16: decode, 64, 256: prefill); each bucket tries only its own tile shapes (_prune).
Reference: gptoss.model.experts_forward (the torch path), which the tests compare against.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gptoss.kernels.mxfp4 import INTERPRET, mxfp4_tile
from gptoss.kernels.routing import Routing, route

GATE_UP, DOWN, DOWN_BWD, UP_BWD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
SEARCH = tl.constexpr(128)  # experts examined per step of the tile -> expert search

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per mode and rows-per-expert bucket, chosen with the
# compile gate (tests/compile_gate.py) for SASS instructions per decoded weight element, registers and
# programs at decode. Decode: 16-row tiles on mma.sync, 1-4 warps, N narrow enough that 4 experts give
# 180-360 programs for 132 SMs. Prefill: 64- and 128-row tiles on wgmma. 2880 = 45 x 64.
_FORWARD = {
    16: [(16, 64, 128, 2, 3), (16, 128, 64, 4, 3)],
    64: [(32, 64, 128, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3)],
    256: [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3)],
}
# Backward: 128 x 128 tiles spill (the epilogue holds h and both gradients beside the accumulator), and
# Triton 3.6 (PyTorch 2.11's) fails to lower 64 x 128 x 64 and every 4-warp 64-row wgmma tile of these
# modes (TritonGPUOptimizeDotOperands) and spills at 128 x 64. With the LoRA update in the epilogue (ADD)
# 3.6 also spills 8 bytes at (16, 64, 128, 2, 3) and (32, 64, 128, 4, 3): two stages (5.8-6.0 SASS
# instructions per element on sm_90a, against 5.9-6.1) and K = 64 (8.0-8.5 on 3.9) instead; 3.9 spills
# (16, 64, 64, 2, 3) and, on sm_100a, (32, 64, 128, 4, 2). The tiles below compile clean on 3.6 and 3.9.
_BACKWARD = {
    16: [(16, 64, 128, 2, 2), (16, 128, 128, 4, 3)],
    64: [(32, 64, 64, 4, 3), (64, 64, 64, 8, 3)],
    256: [(64, 64, 64, 8, 3), (64, 64, 64, 8, 4)],
}
CONFIGS = {
    GATE_UP.value: _FORWARD,
    DOWN.value: {**_FORWARD, 16: [(16, 32, 128, 1, 3), (16, 64, 128, 2, 3)]},  # N = D: 2880 columns, not 5760
    DOWN_BWD.value: _BACKWARD,
    UP_BWD.value: _BACKWARD,
}
FP32_CONFIGS = {16: [(16, 32, 64, 4, 2)], 64: [(32, 32, 64, 4, 2)], 256: [(64, 64, 32, 4, 2)]}  # parity runs
INTERPRET_CONFIG = (16, 32, 64, 1, 1)


def rows_bucket(pairs: int, experts: int) -> int:
    """Mean (token, slot) rows per used expert, rounded up to a bucket of CONFIGS."""
    rows = pairs / max(1, min(experts, pairs))
    return 16 if rows <= 16 else 64 if rows <= 64 else 256


def _config(m, n, k, warps, stages) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


def pinned_config() -> triton.Config | None:
    """GPTOSS_MOE_CONFIG="BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages" pins one config, read at launch."""
    pinned = os.environ.get("GPTOSS_MOE_CONFIG")
    if not pinned:
        return None
    try:
        m, n, k, warps, stages = (int(v) for v in pinned.split(","))
    except ValueError:
        raise ValueError(f"GPTOSS_MOE_CONFIG must be five integers M,N,K,warps,stages, got {pinned!r}") from None
    if not all(v > 0 and v & (v - 1) == 0 for v in (m, n, k, warps)) or stages < 1:
        raise ValueError(f"GPTOSS_MOE_CONFIG {pinned!r}: tiles and warps must be powers of two, stages >= 1")
    if m < 16 or n < 32 or k < 32:
        raise ValueError(
            f"GPTOSS_MOE_CONFIG {pinned!r}: needs BLOCK_M >= 16 (the MMA's rows), BLOCK_N >= 32 and BLOCK_K >= 32 (one MX block)"
        )
    return _config(m, n, k, warps, stages)


def _prune(configs, named_args, **kwargs):
    """The configs a launch may try: the pinned one, else its rows bucket's (fp32 and the interpreter
    have their own)."""
    pinned = pinned_config()
    if pinned is not None:
        return [pinned]
    if INTERPRET:
        return [_config(*INTERPRET_CONFIG)]
    table = FP32_CONFIGS if kwargs["UPCAST"] else CONFIGS[kwargs["MODE"]]
    return [_config(*c) for c in table[named_args["ROWS"]]]


def all_configs() -> list[triton.Config]:
    tables = [*CONFIGS.values(), FP32_CONFIGS]
    return [_config(*c) for c in sorted({c for table in tables for cs in table.values() for c in cs})]


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:  # fp32 data, or the interpreter (which multiplies bf16 dot operands as raw integers)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a.to(tl.bfloat16), b, acc)


@triton.jit
def _swiglu(g, lin, alpha, limit):
    """The clamped SwiGLU of gpt-oss: the gate is clamped from above only, the linear half both ways."""
    g = tl.minimum(g, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    return g * tl.sigmoid(alpha * g) * (lin + 1.0)


@triton.jit
def _swiglu_bwd(g, lin, grad, alpha, limit):
    """d loss / d (gate, linear) pre-activations, given d loss / d swiglu(g, lin) = grad."""
    gc = tl.minimum(g, limit)
    lc = tl.minimum(tl.maximum(lin, -limit), limit)
    sig = tl.sigmoid(alpha * gc)
    d_gate = tl.where(g <= limit, grad * (lc + 1.0) * (sig + alpha * gc * sig * (1.0 - sig)), 0.0)
    d_lin = tl.where((lin >= -limit) & (lin <= limit), grad * gc * sig, 0.0)
    return d_gate, d_lin


@triton.autotune(
    configs=all_configs(),
    key=["N", "K", "ROWS", "MODE", "UPCAST", "ADD"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _moe_matmul_kernel(
    a_ptr,  # GATE_UP: x [T, D]; DOWN: act [P, I]; DOWN_BWD: grad_out [T, D]; UP_BWD: gh [P, 2I]  (bf16 or fp32)
    w_ptr,  # [E, R, C/32, 16] uint8: each expert's weight [R, C] = [out, in] in MXFP4 (W1: [2I, D], W2: [D, I])
    s_ptr,  # [E, R, C/32] uint8 scales
    bias_ptr,  # GATE_UP: b1 [E, 2I]; DOWN: b2 [E, D]
    out_ptr,  # GATE_UP: act [P, I]; DOWN: out [P, D] fp32 (pair order); DOWN_BWD: gh [P, 2I]; UP_BWD: gx [P, D] fp32 (pair order)
    aux_ptr,  # GATE_UP: saves h [P, 2I]; DOWN: saves y [P, D] fp32 (pair order); DOWN_BWD: reads h
    add_ptr,  # ADD: [P, N] fp32 (sorted rows) added to the product: the LoRA update (or its gradient)
    gate_ptr,  # [P] fp32 routing weight of each pair
    counts_ptr,  # [E] int32 rows per expert
    offsets_ptr,  # [E] int32 first sorted row of each expert
    sorted_pairs_ptr,  # [P] int32 pair (token * TOPK + slot) at each sorted row
    K,
    N,
    E,
    TOPK,
    ROWS,  # rows-per-expert bucket: only the autotune key reads it
    alpha,
    limit,
    MODE: tl.constexpr,
    SAVE: tl.constexpr,
    ADD: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # --- which expert and which of its row tiles: experts before ours hold `first` tiles ----------------
    pid_m = tl.program_id(0)
    expert = 0
    first = 0
    done = 0  # tiles of the experts already examined
    for e0 in range(0, E, SEARCH):
        e = e0 + tl.arange(0, SEARCH)
        tiles = tl.cdiv(tl.load(counts_ptr + e, mask=e < E, other=0), BLOCK_M)  # [SEARCH]
        before = done + tl.cumsum(tiles, axis=0) <= pid_m  # experts whose tiles all come before ours
        expert += tl.sum(before.to(tl.int32), axis=0)
        first += tl.sum(tl.where(before, tiles, 0), axis=0)
        done += tl.sum(tiles, axis=0)
    if expert >= E:  # past the last tile: the grid is an upper bound
        return
    count = tl.load(counts_ptr + expert)
    local = (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = local < count
    m = tl.load(offsets_ptr + expert) + local  # [BLOCK_M] sorted rows
    pair = tl.load(sorted_pairs_ptr + m, mask=m_mask, other=0)
    a_row = (pair // TOPK if (MODE == GATE_UP or MODE == DOWN_BWD) else m).to(tl.int64)
    m = m.to(tl.int64)
    pair = pair.to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = n < N
    w_e = w_ptr + expert.to(tl.int64) * N * K // 2  # this expert's packed bytes
    s_e = s_ptr + expert.to(tl.int64) * N * K // 32  # and scales

    # --- main loop: acc[m, n] += a[m, k] . W[k, n], the weight decoded from MXFP4 in registers ---------
    # A decoded tile comes as its even and odd positions along the packed dimension (mxfp4_tile). Forward,
    # that is k: the even and odd columns of `a` meet them in two dots, no interleaving needed. Backward,
    # it is n: the two halves are interleaved back into one [BLOCK_K, BLOCK_N] tile.
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a_mask = m_mask[:, None] & (k[None, :] < K)
        a = tl.load(a_ptr + a_row[:, None] * K + k[None, :], mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
        if MODE == GATE_UP or MODE == DOWN:  # weight rows are n; its packed blocks run along k
            g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            w_even, w_odd = mxfp4_tile(w_e, s_e, n, g, n_mask[:, None] & (g[None, :] < K // 32), K // 32, INTERPRET)
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))  # columns 2i and 2i + 1
            acc = _dot(a_even, tl.trans(w_even), acc, UPCAST)  # [BLOCK_M, BLOCK_K/2] x [BLOCK_K/2, BLOCK_N]
            acc = _dot(a_odd, tl.trans(w_odd), acc, UPCAST)
        else:  # weight rows are k; its packed blocks run along n
            g = n0 // 32 + tl.arange(0, BLOCK_N // 32)
            w_even, w_odd = mxfp4_tile(w_e, s_e, k, g, (k[:, None] < K) & (g[None, :] < N // 32), N // 32, INTERPRET)
            w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_K, BLOCK_N))  # columns n0, n0 + 1, ...
            acc = _dot(a, w, acc, UPCAST)

    # --- epilogues ------------------------------------------------------------------------------------
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if ADD:  # beside the frozen product, the LoRA update (of h, y or gx; of d act in DOWN_BWD, below)
        extra = tl.load(add_ptr + m[:, None] * N + n[None, :], mask=mn_mask, other=0.0).to(tl.float32)
        if MODE != DOWN_BWD:
            acc = acc + extra
    if MODE == GATE_UP:  # columns 2j, 2j+1 of h are the gate and linear halves of act column j
        h = acc + tl.load(bias_ptr + expert * N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SAVE:
            tl.store(aux_ptr + m[:, None] * N + n[None, :], h.to(aux_ptr.dtype.element_ty), mask=mn_mask)
        g, lin = tl.split(tl.reshape(h, (BLOCK_M, BLOCK_N // 2, 2)))
        j = n0 // 2 + tl.arange(0, BLOCK_N // 2)
        act = _swiglu(g, lin, alpha, limit)
        tl.store(out_ptr + m[:, None] * (N // 2) + j[None, :], act.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (j[None, :] < N // 2))  # fmt: skip
    elif MODE == DOWN:
        gate = tl.load(gate_ptr + pair, mask=m_mask, other=0.0)
        y = acc + tl.load(bias_ptr + expert * N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SAVE:
            tl.store(aux_ptr + pair[:, None] * N + n[None, :], y, mask=mn_mask)
        tl.store(out_ptr + pair[:, None] * N + n[None, :], y * gate[:, None], mask=mn_mask)
    elif MODE == DOWN_BWD:  # acc = sum_d grad_out[d] W2[d, n]; times the routing weight = d loss / d act
        gate = tl.load(gate_ptr + pair, mask=m_mask, other=0.0)
        j = 2 * n0 + tl.arange(0, 2 * BLOCK_N)  # the interleaved columns of h and gh
        hj_mask = m_mask[:, None] & (j[None, :] < 2 * N)
        h = tl.load(aux_ptr + m[:, None] * (2 * N) + j[None, :], mask=hj_mask, other=0.0).to(tl.float32)
        g, lin = tl.split(tl.reshape(h, (BLOCK_M, BLOCK_N, 2)))
        d_act = acc * gate[:, None]
        if ADD:  # the adapter's path to act, routing weight included
            d_act += extra
        d_gate, d_lin = _swiglu_bwd(g, lin, d_act, alpha, limit)
        gh = tl.reshape(tl.join(d_gate, d_lin), (BLOCK_M, 2 * BLOCK_N))
        tl.store(out_ptr + m[:, None] * (2 * N) + j[None, :], gh.to(out_ptr.dtype.element_ty), mask=hj_mask)
    else:
        tl.store(out_ptr + pair[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mn_mask)


def _launch(
    mode, a, blocks, scales, bias, out, aux, gate, routing: Routing, K, N, alpha=1.702, limit=7.0, save=False, add=None
):
    E = blocks.shape[0]
    P = routing.sorted_pairs.numel()
    if P == 0:
        return out

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_M"]) + min(E, P) - 1, triton.cdiv(N, meta["BLOCK_N"]))

    dummy = out  # for pointer arguments a mode does not use
    _moe_matmul_kernel[grid](
        a.contiguous(), blocks, scales, dummy if bias is None else bias, out, dummy if aux is None else aux,
        dummy if add is None else add, dummy if gate is None else gate, routing.counts, routing.offsets,
        routing.sorted_pairs, K, N, E, routing.top_k, rows_bucket(P, E), alpha, limit,
        MODE=mode.value, SAVE=save, ADD=add is not None, UPCAST=INTERPRET or a.dtype == torch.float32, INTERPRET=INTERPRET,
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


def _check_add(add, P, N):
    if add is not None and (add.shape != (P, N) or add.dtype != torch.float32 or not add.is_contiguous()):
        raise ValueError(
            f"the added update must be a contiguous fp32 [{P}, {N}] tensor, got {add.dtype} {tuple(add.shape)}"
        )


def moe_gate_up_fwd(x, routing, blocks, scales, bias, alpha, limit, save, add=None):
    """x [T, D] -> act [P, I] in sorted-row order (and h [P, 2I] when `save`); `add` [P, 2I] fp32
    (sorted rows) joins h before the SwiGLU."""
    _check_experts(x, blocks, scales)
    P, D, I2 = routing.sorted_pairs.numel(), x.shape[1], blocks.shape[1]
    _check_add(add, P, I2)
    act = torch.empty(P, I2 // 2, dtype=x.dtype, device=x.device)
    h = torch.empty(P, I2, dtype=x.dtype, device=x.device) if save else None
    _launch(
        GATE_UP, x, blocks, scales, bias, act, h, None, routing, K=D, N=I2, alpha=alpha, limit=limit, save=save, add=add
    )
    return act, h


def moe_down_fwd(act, routing, gate, blocks, scales, bias, save, add=None):
    """act [P, I] (sorted rows) -> weighted outputs [P, D] fp32 in pair order (and y unweighted when
    `save`); `add` [P, D] fp32 (sorted rows) joins y before the routing weight."""
    P, I, D = act.shape[0], act.shape[1], blocks.shape[1]
    _check_add(add, P, D)
    out = torch.empty(P, D, dtype=torch.float32, device=act.device)
    y = torch.empty(P, D, dtype=torch.float32, device=act.device) if save else None
    _launch(DOWN, act, blocks, scales, bias, out, y, gate, routing, K=I, N=D, save=save, add=add)
    return out, y


def moe_down_bwd(grad_out, routing, gate, blocks, scales, h, alpha, limit, add=None):
    """grad of the MoE output [T, D] -> grad of the pre-activation h [P, 2I] (sorted rows); `add`
    [P, I] fp32 (sorted rows) joins the gradient of act before the SwiGLU's backward."""
    P, D, I = h.shape[0], grad_out.shape[1], h.shape[1] // 2
    _check_add(add, P, I)
    gh = torch.empty(P, 2 * I, dtype=h.dtype, device=h.device)
    _launch(DOWN_BWD, grad_out, blocks, scales, None, gh, h, gate, routing, K=D, N=I, alpha=alpha, limit=limit, add=add)
    return gh


def moe_gate_up_bwd(gh, routing, blocks, scales, D, add=None):
    """grad of h [P, 2I] (sorted rows) -> grad of the gathered inputs [P, D] fp32 in pair order; `add`
    [P, D] fp32 (sorted rows) joins it."""
    _check_add(add, gh.shape[0], D)
    gx = torch.empty(gh.shape[0], D, dtype=torch.float32, device=gh.device)
    _launch(UP_BWD, gh, blocks, scales, None, gx, None, None, routing, K=gh.shape[1], N=D, add=add)
    return gx


# --- expert LoRA beside the kernels ---------------------------------------------------------------------
# An adapted matrix adds s * (a A_e^T) B_e^T to each sorted row a of expert e. With the factors laid out
# expert-major (gptoss.adapter.ExpertLoRA.expert_major: A [E*r, in] and B [out, E*r], expert e's rank
# rows and columns at e*r .. e*r+r-1), every row's update is one masked product for all experts:
# z = (a A^T) * mask keeps each row's own expert's r columns of [P, E*r], then s * z B^T. No host
# synchronisation and no launch per expert, for E*r extra columns (256 beside gate_up's 5760 for
# gpt-oss-20b at r = 8). The update (fp32) goes into the kernels' epilogues through `add`.


def expert_mask(routing: Routing, num_experts: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """[P, E*r]: 1 where column j belongs to the expert of sorted row m (j // r == expert), else 0."""
    row_expert = routing.ids.reshape(-1).long()[routing.sorted_pairs.long()]  # [P]
    columns = torch.arange(num_experts * r, device=row_expert.device) // r
    return (columns[None, :] == row_expert[:, None]).to(dtype)


def lora_update(a, A, B, mask, scaling):
    """a [P, in] (sorted rows) -> (z [P, E*r], the update s * z B^T [P, out] fp32)."""
    z = (a.to(A.dtype) @ A.T) * mask
    return z, (scaling * (z @ B.T)).float().contiguous()


def lora_backward(g, a, z, A, B, mask, scaling):
    """g = d loss / d update [P, out] -> (dA [E*r, in], dB [out, E*r], d a [P, in] fp32)."""
    g = g.to(A.dtype)
    dz = scaling * (g @ B) * mask  # [P, E*r]: only each row's own expert's columns
    return dz.T @ a.to(A.dtype), scaling * (g.T @ z), (dz @ A).float().contiguous()


class MoEFunction(torch.autograd.Function):
    """out [T, D] = sum_slots w[t, s] * expert_{ids[t, s]}(x[t]); the MXFP4 weights are frozen.
    Differentiable in x, w and, when given, the expert-major LoRA factors A1, B1 (gate_up) and A2,
    B2 (down), whose update s * (a A_e^T) B_e^T joins each matrix's product in the kernel epilogue."""

    @staticmethod
    def forward(ctx, x, weights, A1, B1, A2, B2, routing, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                alpha, limit, scaling):  # fmt: skip
        T, D = x.shape
        save = any(ctx.needs_input_grad[:6])
        gate = weights.reshape(-1).float().contiguous()
        mask = z1 = z2 = u1 = u2 = None
        if A1 is not None or A2 is not None:
            E = w1_blocks.shape[0]
            A = A1 if A1 is not None else A2
            mask = expert_mask(routing, E, A.shape[0] // E, A.dtype)
        if A1 is not None:
            rows = routing.sorted_pairs.long() // routing.top_k  # the token of each sorted row
            z1, u1 = lora_update(x.index_select(0, rows), A1, B1, mask, scaling)
        act, h = moe_gate_up_fwd(x, routing, w1_blocks, w1_scales, b1, alpha, limit, save, add=u1)
        if A2 is not None:
            z2, u2 = lora_update(act, A2, B2, mask, scaling)
        out_pairs, y = moe_down_fwd(act, routing, gate, w2_blocks, w2_scales, b2, save, add=u2)
        if save:
            ctx.save_for_backward(x, h, y, gate, act if A2 is not None else None, mask, z1, z2, A1, B1, A2, B2,
                                  w1_blocks, w1_scales, w2_blocks, w2_scales)  # fmt: skip
            ctx.routing, ctx.alpha, ctx.limit, ctx.scaling = routing, alpha, limit, scaling
        return out_pairs.view(T, routing.top_k, D).sum(1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, h, y, gate, act, mask, z1, z2, A1, B1, A2, B2, w1_blocks, w1_scales, w2_blocks, w2_scales = ctx.saved_tensors
        routing, K, s = ctx.routing, ctx.routing.top_k, ctx.scaling
        need = ctx.needs_input_grad
        T, D = grad_out.shape
        grad_out = grad_out.contiguous()
        rows = routing.sorted_pairs.long() // K if A1 is not None or A2 is not None else None  # sorted row -> token
        grad_x = grad_w = dA1 = dB1 = dA2 = dB2 = d_act = None
        if need[1]:  # d out / d w[t, s] = y[t, s] (the adapter's update included)
            grad_w = torch.einsum("tkd,td->tk", y.view(T, K, D), grad_out.float())
        if A2 is not None:  # d loss / d y of each sorted row: its token's gradient times its routing weight
            g_y = grad_out.float().index_select(0, rows) * gate[routing.sorted_pairs.long()].unsqueeze(-1)
            dA2, dB2, d_act = lora_backward(g_y, act, z2, A2, B2, mask, s)
        if need[0] or need[2] or need[3]:
            gh = moe_down_bwd(grad_out, routing, gate, w2_blocks, w2_scales, h, ctx.alpha, ctx.limit, add=d_act)
            dx = None
            if A1 is not None:
                dA1, dB1, dx = lora_backward(gh, x.index_select(0, rows), z1, A1, B1, mask, s)
            if need[0]:
                gx_pairs = moe_gate_up_bwd(gh, routing, w1_blocks, w1_scales, D, add=dx)
                grad_x = gx_pairs.view(T, K, D).sum(1).to(x.dtype)
        return (grad_x, grad_w, dA1 if need[2] else None, dB1 if need[3] else None, dA2 if need[4] else None,
                dB2 if need[5] else None) + (None,) * 10  # fmt: skip


def moe(
    x: torch.Tensor, logits: torch.Tensor, top_k: int, experts, alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """The MoE block on x [T, D] given router logits [T, E]; `experts` is a gptoss.model.Experts
    (MXFP4), with or without LoRA adapters on its matrices.

    Routing ids come from the kernel; the routing weights are recomputed by torch from the picked
    logits when gradients are needed, so they flow back to the router."""
    routing = route(logits, top_k)
    weights = routing.weights
    if torch.is_grad_enabled() and logits.requires_grad:
        weights = torch.softmax(logits.gather(1, routing.ids.long()).float(), dim=-1)
    adapters = experts.lora  # gptoss.adapter.ExpertLoRA by matrix name; both made with one r and alpha
    factors = [adapters[w].expert_major() if w in adapters else (None, None) for w in ("gate_up_proj", "down_proj")]
    scalings = {a.scaling for a in adapters.values()}
    if len(scalings) > 1:
        raise ValueError(f"the two expert adapters of a layer must share alpha / r, found {sorted(scalings)}")
    return MoEFunction.apply(
        x.contiguous(), weights, *factors[0], *factors[1], routing, experts.gate_up_proj_blocks,
        experts.gate_up_proj_scales, experts.gate_up_proj_bias, experts.down_proj_blocks, experts.down_proj_scales,
        experts.down_proj_bias, alpha, limit, scalings.pop() if scalings else 1.0,
    )  # fmt: skip
