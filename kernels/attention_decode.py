"""Attention at decode (few rows, T * G <= DECODE_ROWS per (batch, KV head), no gradient): split-K.

The keys are split into chunks, one program per (chunk, batch, KV head), so one sequence fills the GPU;
each writes its unnormalised partial output with its running max m and sum l, and a second kernel
merges the chunks and the sink. Key tiles with no visible key (the unused slots of a pre-allocated
cache, position -1) are skipped. Grids: decode (chunks, B * K), merge (B * K,). The same math as
kernels/attention.py (and gptoss.model.attention_with_sinks, the reference).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gptoss.kernels.attention_core import CONFIGS, LOG2E, LOG2E_IN_KERNELS, attend, flags, path, visible

DECODE_ROWS = 64  # at most this many rows (T * G) per (batch, KV head) take the split-K decode kernel
NEG = tl.constexpr(-1.0e30)  # a decode chunk's running max before it sees a key: exp2(NEG - m) = 0, no NaN


@triton.jit
def _attn_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    qpos_ptr,
    kpos_ptr,
    part_ptr,
    stat_ptr,
    T,
    S,
    G,
    KH,
    window,
    scale2,
    chunk,
    sq_b,
    sq_t,
    sq_h,
    sq_g,
    sk_b,
    sk_s,
    sk_h,
    sv_b,
    sv_s,
    sv_h,
    sqp_b,
    skp_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Keys [split * chunk, (split + 1) * chunk) for all T * G <= BLOCK_M rows of one (batch, KV head):
    the unnormalised output [BLOCK_M, Dh] and the running max and sum (base 2), without the sink."""
    split, bh = tl.program_id(0), tl.program_id(1)
    splits = tl.num_programs(0)
    b, h = bh // KH, bh % KH
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < T * G
    t, g = rows // G, rows % G
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + (t * sq_t + g * sq_g)[:, None] + d[None, :], mask=row_ok[:, None], other=0.0
    )
    qp = tl.load(qpos_ptr + b * sqp_b + t, mask=row_ok, other=-1)
    oldest = tl.maximum(qp - window, -1)
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base, v_base = k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
    end = tl.minimum(split * chunk + chunk, S)
    for start in range(split * chunk, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        kp = tl.load(kpos_ptr + b * skp_b + cols, mask=col_ok, other=-1)
        seen = visible(qp, oldest, kp)
        if tl.max(tl.max(seen.to(tl.int32), 1), 0) > 0:  # skip tiles nobody sees (empty cache slots)
            kt = tl.load(k_base + cols[None, :] * sk_s + d[:, None], mask=col_ok[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * sv_s + d[None, :], mask=col_ok[:, None], other=0.0)
            m_i, l_i, acc = attend(q, kt, v, seen, m_i, l_i, acc, scale2, UPCAST, IEEE)
    base = bh * splits + split
    tl.store(part_ptr + (base * BLOCK_M + rows)[:, None] * HEAD_DIM + d[None, :], acc)
    tl.store(stat_ptr + (base * 2) * BLOCK_M + rows, m_i)
    tl.store(stat_ptr + (base * 2 + 1) * BLOCK_M + rows, l_i)


@triton.jit
def _attn_decode_merge_kernel(
    part_ptr,
    stat_ptr,
    sinks_ptr,
    out_ptr,
    T,
    G,
    KH,
    splits,
    so_b,
    so_t,
    so_h,
    so_g,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Merge the chunks of one (batch, KV head) and the sink: out = sum_c 2^(m_c - M) acc_c / L."""
    bh = tl.program_id(0)
    b, h = bh // KH, bh % KH
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < T * G
    t, g = rows // G, rows % G
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.load(sinks_ptr + h * G + g, mask=row_ok, other=0.0).to(tl.float32) * LOG2E_IN_KERNELS
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for split in range(0, splits):
        base = bh * splits + split
        m_c = tl.load(stat_ptr + (base * 2) * BLOCK_M + rows)
        l_c = tl.load(stat_ptr + (base * 2 + 1) * BLOCK_M + rows)
        acc_c = tl.load(part_ptr + (base * BLOCK_M + rows)[:, None] * HEAD_DIM + d[None, :])
        m_new = tl.maximum(m_i, m_c)
        a, c = tl.exp2(m_i - m_new), tl.exp2(m_c - m_new)
        l_i = l_i * a + l_c * c
        acc = acc * a[:, None] + acc_c * c[:, None]
        m_i = m_new
    o_off = b * so_b + h * so_h + (t * so_t + g * so_g)[:, None] + d[None, :]
    tl.store(out_ptr + o_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    splits: int | None = None,
) -> torch.Tensor:
    """The split-K forward for T * G <= DECODE_ROWS rows per (batch, KV head); no log-sum-exp, no gradient."""
    B, T, K, G, Dh = q.shape
    S = k.shape[1]
    bm, bn, warps, stages = CONFIGS["decode"][path(q.dtype)]
    bm = max(bm, triton.next_power_of_2(T * G))
    if splits is None:  # about two programs per SM
        kind = q.device.type  # meta: the compile gate, which sizes the grid for an H100's 132 SMs
        sms = (
            torch.cuda.get_device_properties(q.device).multi_processor_count
            if kind == "cuda"
            else 132
            if kind == "meta"
            else 4
        )
        splits = max(1, min(triton.cdiv(S, bn), triton.cdiv(2 * sms, B * K)))
    chunk = triton.cdiv(triton.cdiv(S, splits), bn) * bn  # keys per chunk, whole tiles
    splits = triton.cdiv(S, chunk)
    part = torch.empty(B * K, splits, bm, Dh, dtype=torch.float32, device=q.device)
    stat = torch.empty(B * K, splits, 2, bm, dtype=torch.float32, device=q.device)
    out = torch.empty(B, T, K, G, Dh, dtype=q.dtype, device=q.device)
    _attn_decode_kernel[(splits, B * K)](
        q,
        k,
        v,
        q_pos,
        k_pos,
        part,
        stat,
        T,
        S,
        G,
        K,
        window,
        LOG2E / math.sqrt(Dh),
        chunk,
        *q.stride()[:4],
        *k.stride()[:3],
        *v.stride()[:3],
        q_pos.stride(0),
        k_pos.stride(0),
        HEAD_DIM=Dh,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=warps,
        num_stages=stages,
        **flags(q.dtype),
    )
    _attn_decode_merge_kernel[(B * K,)](
        part, stat, sinks, out, T, G, K, splits, *out.stride()[:4], HEAD_DIM=Dh, BLOCK_M=bm, num_warps=4
    )
    return out
