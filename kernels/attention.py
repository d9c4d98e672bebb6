"""Attention with learned sinks, grouped-query heads and an optional sliding window: a
FlashAttention-style forward and backward (training and prefill); decode is in attention_decode.py.

Computes what gptoss.model.attention_with_sinks computes (the reference the tests compare against):
for query head h = kv_head * G + g at position p and the keys at positions j,

    s_j  = q . k_j / sqrt(Dh)              for keys with  p - window < j <= p  and  j >= 0
    out  = sum_j softmax(s_1 .. s_n, z_h)_j v_j      z_h: the head's sink, a logit without a value

Rows. The G query heads of one KV head share its keys, so a program takes the rows (t, g) of one
(batch, KV head) stacked as row r = t * G + g: one key tile loaded serves BLOCK_M rows of every head
of the group (at decode, the 8 heads of a gpt-oss KV head are the 8 rows of one tile).

Softmax. In base 2 (scores scaled by log2(e) / sqrt(Dh)) with fp32 running max m and sum l. The sink
starts the running softmax: m = z, l = exp2(z - m) = 1. So a row whose keys are all masked (a
padding query, position -1) ends with l = 1 and out = 0, never 0 / 0. The forward saves the base-2
log-sum-exp L = m + log2(l) per row ([B, K, T * G] fp32) for the backward.

Backward (FlashAttention-2): P = exp2(s - L) is recomputed from L; with dP = dO V^T and
Delta = rowsum(dO * O), dS = P * (dP - Delta), dQ = dS K / sqrt(Dh), dK = dS^T Q / sqrt(Dh),
dV = P^T dO. The sink's softmax weight is exp2(z - L); its gradient is -sum over rows of that
weight times Delta. A preamble kernel makes Delta and each row's term of that sum in one pass over dO
and O (a torch sum over the rows finishes the sink's gradient); then two kernels, no atomics: one
program per query tile accumulates dQ over key tiles, one per key tile accumulates dK, dV over the
query tiles of all G heads (which is where GQA's sum over the group happens).

Which tiles meet. Positions are data (left padding, cache rings, continuation), so the pairs of
tiles that may contain a visible (query, key) are found on the device before the launch: per query
tile the largest position and the smallest window start, per key tile the smallest and largest
valid position; a pair is visited when those ranges overlap (a superset of the visible pairs; the
exact mask is applied inside, and only where some row of the pair does not see the whole key tile).
The same pass finds, per tile, the run of other-side tiles it sees whole (every row sees every key, no
padding): most pairs of a long causal row. Each query tile loops over its [first, last) key tiles, each
key tile over its [first, last) query tiles, and skips the per-score mask inside its run, a uniform test
of two comparisons a trip. Without host synchronisation, so a CUDA graph can capture it.

Decode (few rows, no gradient) takes the split-K kernels of kernels/attention_decode.py;
attention_with_sinks below sends it there. What the two files share: kernels/attention_core.py.

Grids: forward and dQ (cdiv(T * G, BLOCK_M), B * K); dK/dV (cdiv(S, BLOCK_N), B * K); the backward's
preamble (cdiv(T * G, DELTA_ROWS), B * K). Tiles are fixed per kernel and dtype (chosen with the compile gate,
tests/compile_gate.py), not autotuned: the tile-pair table is built for the tiles of the launch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gptoss.kernels.attention_core import (
    CONFIGS,
    LOG2E,
    LOG2E_IN_KERNELS,
    NO_WINDOW,
    attend_tile,
    check,
    dot,
    flags,
    last_contiguous,
    masked,
    path,
    positions,
    seen_whole,
)
from gptoss.kernels.attention_decode import DECODE_ROWS, attention_decode  # noqa: F401 (attention_decode: also this module's)


@triton.jit
def _ranges_of(ranges_ptr, tile, BLOCK: tl.constexpr):
    """A tile's row of tile_ranges' table, in the other side's offsets (tile index x BLOCK): the tiles it
    meets, [first, last), and those it sees whole, [whole_first, whole_last). Four loads per program, not
    per trip: the per-trip test is two comparisons of the loop's offset, with no reduction."""
    row = ranges_ptr + tile * 4
    return tl.load(row) * BLOCK, tl.load(row + 1) * BLOCK, tl.load(row + 2) * BLOCK, tl.load(row + 3) * BLOCK


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    sinks_ptr,
    qpos_ptr,
    kpos_ptr,
    out_ptr,
    lse_ptr,
    ranges_ptr,
    T,
    S,
    G,
    KH,
    window,
    scale2,
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
    so_b,
    so_t,
    so_h,
    so_g,
    sqp_b,
    skp_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // KH, bh % KH
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * G
    t, g = rows // G, rows % G
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + (t * sq_t + g * sq_g)[:, None] + d[None, :], mask=row_ok[:, None], other=0.0
    )
    qp = tl.load(qpos_ptr + b * sqp_b + t, mask=row_ok, other=-1)
    oldest = tl.maximum(qp - window, -1)
    m_i = tl.load(sinks_ptr + h * G + g, mask=row_ok, other=0.0).to(tl.float32) * LOG2E_IN_KERNELS  # the sink
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first, last, whole_first, whole_last = _ranges_of(ranges_ptr, b * tl.cdiv(T * G, BLOCK_M) + pid_m, BLOCK_N)
    k_base, v_base = k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < S
        kt = tl.load(k_base + cols[None, :] * sk_s + d[:, None], mask=col_ok[None, :], other=0.0)  # [Dh, BLOCK_N]
        v = tl.load(v_base + cols[:, None] * sv_s + d[None, :], mask=col_ok[:, None], other=0.0)  # [BLOCK_N, Dh]
        whole = (start >= whole_first) & (start < whole_last)  # every row sees every key: no per-score mask
        kp_ptrs = kpos_ptr + b * skp_b + cols
        m_i, l_i, acc = attend_tile(q, kt, v, qp, oldest, kp_ptrs, col_ok, whole, m_i, l_i, acc, scale2, UPCAST, IEEE)
    out = acc / l_i[:, None]
    o_off = b * so_b + h * so_h + (t * so_t + g * so_g)[:, None] + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + bh * T * G + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    qpos_ptr,
    kpos_ptr,
    dq_ptr,
    ranges_ptr,
    T,
    S,
    G,
    KH,
    window,
    scale2,
    scale,
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
    """dQ for one query tile; dO and dQ share q's layout (contiguous [B, T, K, G, Dh])."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // KH, bh % KH
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * G
    t, g = rows // G, rows % G
    d = tl.arange(0, HEAD_DIM)
    q_off = b * sq_b + h * sq_h + (t * sq_t + g * sq_g)[:, None] + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + q_off, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh * T * G + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh * T * G + rows, mask=row_ok, other=0.0)
    qp = tl.load(qpos_ptr + b * sqp_b + t, mask=row_ok, other=-1)
    oldest = tl.maximum(qp - window, -1)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first, last, whole_first, whole_last = _ranges_of(ranges_ptr, b * tl.cdiv(T * G, BLOCK_M) + pid_m, BLOCK_N)
    k_base, v_base = k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < S
        k = tl.load(k_base + cols[:, None] * sk_s + d[None, :], mask=col_ok[:, None], other=0.0)  # [BLOCK_N, Dh]
        vt = tl.load(v_base + cols[None, :] * sv_s + d[:, None], mask=col_ok[None, :], other=0.0)  # [Dh, BLOCK_N]
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, IEEE)
        whole = (start >= whole_first) & (start < whole_last)  # as in the forward
        s = masked(s, qp, oldest, kpos_ptr + b * skp_b + cols, col_ok, whole)
        p = tl.exp2(s * scale2 - lse[:, None])  # the scale in the exponent's fused multiply-add
        dp = dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq, UPCAST, IEEE)
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _keys_seen(kp, qp_ptrs, row_ok, window):
    """[keys, rows]: key position kp is seen by the row whose position is at qp_ptrs (-1 where not row_ok)."""
    qp = tl.load(qp_ptrs, mask=row_ok, other=-1)
    oldest = tl.maximum(qp - window, -1)
    return (kp[:, None] > oldest[None, :]) & (kp[:, None] <= qp[None, :])


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    qpos_ptr,
    kpos_ptr,
    dk_ptr,
    dv_ptr,
    ranges_ptr,
    T,
    S,
    G: tl.constexpr,  # query heads per KV head: the loop splits its rows into (token, head), shifts at G = 8
    KH,
    window,
    scale2,
    scale,
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
    sd_b,
    sd_s,
    sd_h,
    sqp_b,
    skp_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dK, dV for one key tile, summed over the query tiles of all G heads of its KV head."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // KH, bh % KH
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < S
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_s + d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_s + d[None, :], mask=col_ok[:, None], other=0.0)
    kp = tl.load(kpos_ptr + b * skp_b + cols, mask=col_ok, other=-1)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    first, last, whole_first, whole_last = _ranges_of(ranges_ptr, b * tl.cdiv(S, BLOCK_N) + pid_n, BLOCK_M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < T * G
        t, g = rows // G, rows % G
        q_off = b * sq_b + h * sq_h + (t * sq_t + g * sq_g)[:, None] + d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, Dh]
        do = tl.load(do_ptr + q_off, mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + bh * T * G + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + bh * T * G + rows, mask=row_ok, other=0.0)
        st = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, IEEE)  # [BLOCK_N, BLOCK_M]
        # as in the forward: the mask, and the rows' positions it reads, only where some row does not see
        # the whole key tile (fp32, the parity runs, masks every tile: the test costs that tile 8 bytes of
        # spill on sm_90a)
        if IEEE:
            st = tl.where(_keys_seen(kp, qpos_ptr + b * sqp_b + t, row_ok, window), st, float("-inf"))
        elif (start < whole_first) | (start >= whole_last):
            st = tl.where(_keys_seen(kp, qpos_ptr + b * sqp_b + t, row_ok, window), st, float("-inf"))
        pt = tl.exp2(st * scale2 - lse[None, :])  # the scale in the exponent's fused multiply-add
        dv = dot(pt.to(do.dtype), do, dv, UPCAST, IEEE)
        dpt = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), UPCAST, IEEE)
        dst = pt * (dpt - delta[None, :])
        dk = dot(dst.to(q.dtype), q, dk, UPCAST, IEEE)
    d_off = b * sd_b + h * sd_h + cols[:, None] * sd_s + d[None, :]
    tl.store(dk_ptr + d_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + d_off, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


INT_MAX = tl.constexpr(2147483647)  # "no position": larger than any int32 position, its negation smaller


@triton.jit
def _query_tiles(qpos_ptr, tiles, T, G, window, BLOCK_M: tl.constexpr):
    """Per query tile of `tiles` [N]: the latest position of its rows and the newest position too old for
    all of them (INT_MAX when the tile has no valid row), which decide whether a key tile may meet it; and
    its rows' earliest position and the oldest position too old for one of them (-1 where a row is padding
    or past T * G), which decide whether it sees a key tile whole (seen_whole)."""
    rows = tiles[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    qp = tl.load(qpos_ptr + rows // G, mask=rows < T * G, other=-1)
    oldest = tl.maximum(qp - window, -1)
    return tl.max(qp, 1), tl.min(tl.where(qp >= 0, oldest, INT_MAX), 1), tl.min(qp, 1), tl.max(oldest, 1)


@triton.jit
def _key_tiles(kpos_ptr, tiles, S, BLOCK_N: tl.constexpr):
    """Per key tile of `tiles` [N]: the smallest and largest valid position (INT_MAX / -INT_MAX if none),
    and the smallest and largest position (-1 where a key is padding or past S: then never seen whole)."""
    cols = tiles[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    kp = tl.load(kpos_ptr + cols, mask=cols < S, other=-1)
    valid_min = tl.min(tl.where(kp >= 0, kp, INT_MAX), 1)
    return valid_min, tl.max(tl.where(kp >= 0, kp, -INT_MAX), 1), tl.min(kp, 1), tl.max(kp, 1)


@triton.jit
def _span(hit, index, other, first, last):
    """first and one past the last of `index` [CHUNK] where `hit`, merged into the running pair."""
    first = tl.minimum(first, tl.min(tl.where(hit, index, other), 0))
    return first, tl.maximum(last, tl.max(tl.where(hit, index + 1, 0), 0))


@triton.jit
def _ranges_store(out, first, last, whole_first, whole_last, n_whole):
    """One tile's row of the table: [first, last) the tiles it meets; [whole_first, whole_last) tiles it
    sees whole, kept only where every tile between is (else empty: the kernels then mask those tiles,
    which is exact, only slower). Causal and sliding rows, left padding and rings keep them contiguous."""
    first = tl.minimum(first, last)
    whole_first = tl.minimum(whole_first, whole_last)
    contiguous = n_whole == whole_last - whole_first
    tl.store(out, first)
    tl.store(out + 1, last)
    tl.store(out + 2, tl.where(contiguous, whole_first, 0))
    tl.store(out + 3, tl.where(contiguous, whole_last, 0))


@triton.jit
def _tile_ranges_kernel(
    qpos_ptr,
    kpos_ptr,
    q_ranges_ptr,
    k_ranges_ptr,
    T,
    S,
    G,
    window,
    n_q,
    n_k,
    stride_qb,
    stride_kb,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KEY_BLOCK_M: tl.constexpr,
    KEY_BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Programs [0, n_q) write each query tile's row of the table over key tiles (tiles BLOCK_M x BLOCK_N:
    the forward's or dQ's), programs [n_q, n_q + n_k) each key tile's over query tiles (tiles KEY_BLOCK_M x
    KEY_BLOCK_N: dK/dV's): the tiles it meets and those it sees whole (_ranges_store); CHUNK tiles of the
    other side are examined at a time."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    qpos_ptr += b * stride_qb
    kpos_ptr += b * stride_kb
    lane = tl.arange(0, CHUNK)
    if pid < n_q:
        q_last, q_oldest, newest_first, oldest_last = _query_tiles(
            qpos_ptr, pid + 0 * lane, T, G, window, BLOCK_M
        )  # CHUNK equal copies
        other = tl.cdiv(S, BLOCK_N)
        first, last = other, other * 0
        whole_first, whole_last, n_whole = other, other * 0, other * 0
        for start in range(0, other, CHUNK):
            j = start + lane
            k_min, k_max, key_first, key_last = _key_tiles(kpos_ptr, j, S, BLOCK_N)
            meet = (k_min <= q_last) & (k_max > q_oldest) & (j < other)
            whole = seen_whole(key_first, key_last, newest_first, oldest_last) & (j < other)
            first, last = _span(meet, j, other, first, last)
            whole_first, whole_last = _span(whole, j, other, whole_first, whole_last)
            n_whole += tl.sum(whole.to(tl.int32), 0)
        out = q_ranges_ptr + (b * n_q + pid) * 4
    else:
        tile = pid - n_q
        k_min, k_max, key_first, key_last = _key_tiles(kpos_ptr, tile + 0 * lane, S, KEY_BLOCK_N)
        other = tl.cdiv(T * G, KEY_BLOCK_M)
        first, last = other, other * 0
        whole_first, whole_last, n_whole = other, other * 0, other * 0
        for start in range(0, other, CHUNK):
            i = start + lane
            q_last, q_oldest, newest_first, oldest_last = _query_tiles(qpos_ptr, i, T, G, window, KEY_BLOCK_M)
            meet = (k_min <= q_last) & (k_max > q_oldest) & (i < other)
            whole = seen_whole(key_first, key_last, newest_first, oldest_last) & (i < other)
            first, last = _span(meet, i, other, first, last)
            whole_first, whole_last = _span(whole, i, other, whole_first, whole_last)
            n_whole += tl.sum(whole.to(tl.int32), 0)
        out = k_ranges_ptr + (b * n_k + tile) * 4
    _ranges_store(out, first, last, whole_first, whole_last, n_whole)


# --- launchers ---------------------------------------------------------------------------------------------


RANGE_CHUNK = 16  # tiles of the other side one step of _tile_ranges_kernel examines


def tile_ranges(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    G: int,
    block_m: int,
    block_n: int,
    keys: bool = True,
    key_tiles: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For each (batch, query tile) the [first, last) key tiles it may see (tiles block_m x block_n), and
    (keys=True) for each (batch, key tile) the [first, last) query tiles that may see it (tiles key_tiles,
    by default the same), each followed by the [first, last) tiles of the pair seen whole (every row sees
    every key: no mask; empty where there are none or they are not contiguous): int32 [B, tiles, 4] each,
    in one launch (see the header). q_pos [B, T] and k_pos [B, S] int32, last dimension contiguous."""
    B, T = q_pos.shape
    S = k_pos.shape[1]
    key_m, key_n = key_tiles or (block_m, block_n)
    n_q, n_k = triton.cdiv(T * G, block_m), triton.cdiv(S, key_n)
    q_ranges = torch.empty(B, n_q, 4, dtype=torch.int32, device=q_pos.device)
    k_ranges = torch.empty(B, n_k, 4, dtype=torch.int32, device=q_pos.device) if keys else q_ranges
    _tile_ranges_kernel[(n_q + n_k if keys else n_q, B)](
        q_pos,
        k_pos,
        q_ranges,
        k_ranges,
        T,
        S,
        G,
        window,
        n_q,
        n_k,
        q_pos.stride(0),
        k_pos.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        KEY_BLOCK_M=key_m,
        KEY_BLOCK_N=key_n,
        CHUNK=RANGE_CHUNK,
        num_warps=4,
    )
    return q_ranges, k_ranges if keys else None


def tile_ranges_reference(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, G: int, block_m: int, block_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """tile_ranges in torch operations (about 35 of them): the definition the kernel is tested against."""

    B, T = q_pos.shape
    S = k_pos.shape[1]
    big = 1 << 40
    n_q, n_k = triton.cdiv(T * G, block_m), triton.cdiv(S, block_n)
    qp = q_pos.long().repeat_interleave(G, dim=1)  # [B, T * G], row r = t * G + g
    qp = torch.nn.functional.pad(qp, (0, n_q * block_m - T * G), value=-1).view(B, n_q, block_m)
    q_last = qp.amax(-1)  # [B, n_q] latest position a row of the tile sits at
    q_oldest = torch.where(qp >= 0, (qp - window).clamp(min=-1), big).amin(-1)  # keys must be newer than this
    kp = torch.nn.functional.pad(k_pos.long(), (0, n_k * block_n - S), value=-1).view(B, n_k, block_n)
    k_min = torch.where(kp >= 0, kp, big).amin(-1)  # [B, n_k]
    k_max = torch.where(kp >= 0, kp, -big).amax(-1)
    meet = (k_min[:, None, :] <= q_last[:, :, None]) & (k_max[:, None, :] > q_oldest[:, :, None])  # [B, n_q, n_k]
    # seen whole: every key of the tile (padding included, -1) newer than every row's oldest and no newer
    # than its earliest row (padding included, -1)
    q_first, q_too_old = qp.amin(-1), (qp - window).clamp(min=-1).amax(-1)
    whole = (kp.amax(-1)[:, None, :] <= q_first[:, :, None]) & (kp.amin(-1)[:, None, :] > q_too_old[:, :, None])
    return (
        torch.cat((_first_last(meet), _contiguous(whole)), -1),
        torch.cat((_first_last(meet.transpose(1, 2)), _contiguous(whole.transpose(1, 2))), -1),
    )


def _contiguous(whole: torch.Tensor) -> torch.Tensor:
    """_first_last of `whole`, (0, 0) where its true columns are not one contiguous run."""
    span = _first_last(whole)
    run = whole.sum(-1) == span[..., 1] - span[..., 0]
    return torch.where(run[..., None], span, 0).to(torch.int32).contiguous()


def _first_last(meet: torch.Tensor) -> torch.Tensor:
    """[B, n, m] bool -> int32 [B, n, 2]: the first true column and one past the last (0, 0 if none)."""
    m = meet.shape[-1]
    idx = torch.arange(m, device=meet.device)
    last = torch.where(meet, idx + 1, 0).amax(-1)
    first = torch.minimum(torch.where(meet, idx, m).amin(-1), last)
    return torch.stack((first, last), -1).to(torch.int32).contiguous()


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out [B, T, K, G, Dh] (q's dtype) and the base-2 log-sum-exp [B, K, T * G] fp32."""
    B, T, K, G, Dh = q.shape
    S = k.shape[1]
    bm, bn, warps, stages = CONFIGS["fwd"][path(q.dtype)]
    ranges, _ = tile_ranges(q_pos, k_pos, window, G, bm, bn, keys=False)
    out = torch.empty(B, T, K, G, Dh, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, K, T * G, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T * G, bm), B * K)
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        sinks,
        q_pos,
        k_pos,
        out,
        lse,
        ranges,
        T,
        S,
        G,
        K,
        window,
        LOG2E / math.sqrt(Dh),
        *q.stride()[:4],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:4],
        q_pos.stride(0),
        k_pos.stride(0),
        HEAD_DIM=Dh,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=warps,
        num_stages=stages,
        **flags(q.dtype),
    )
    return out, lse


@triton.jit
def _attn_bwd_delta_kernel(
    do_ptr,  # [B, T, K, G, Dh] d loss / d out, contiguous
    out_ptr,  # [B, T, K, G, Dh] the forward's out, contiguous
    lse_ptr,  # [B, K, T * G] fp32: the forward's base-2 log-sum-exp per row
    sinks_ptr,  # [K * G] the sinks' logits
    delta_ptr,  # out: [B, K, T * G] fp32, Delta = rowsum(dO * O)
    sink_ptr,  # out: [B, K, T * G] fp32, -exp2(z - L) Delta: the row's part of its sink logit's gradient
    T,
    G,
    KH,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The backward's per-row preamble, one pass over dO and O: Delta in the dQ and dK/dV kernels' row
    order (r = t * G + g of one (batch, KV head)), and each row's term of its sink's gradient."""
    bh = tl.program_id(1)  # batch * KH + KV head
    b, kv = bh // KH, bh % KH
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < T * G
    t, g = rows // G, rows % G
    at = (((b.to(tl.int64) * T + t) * KH + kv) * G + g)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    do = tl.load(do_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    o = tl.load(out_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(do * o, axis=1)
    row = bh.to(tl.int64) * T * G + rows
    z = tl.load(sinks_ptr + kv * G + g, mask=ok, other=0.0).to(tl.float32) * LOG2E_IN_KERNELS
    lse = tl.load(lse_ptr + row, mask=ok, other=0.0)
    tl.store(delta_ptr + row, delta, mask=ok)
    tl.store(sink_ptr + row, -tl.exp2(z - lse) * delta, mask=ok)


DELTA_ROWS = 64  # rows of dO and O per program of the preamble (8 warps): [64, Dh] tiles of each


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv (the inputs' dtypes and shapes) and dsinks fp32 [K * G]."""
    B, T, K, G, Dh = q.shape
    S = k.shape[1]
    bm, bn, warps, stages = CONFIGS["dq"][path(q.dtype)]
    key_m, key_n, key_warps, key_stages = CONFIGS["dkdv"][path(q.dtype)]
    q_ranges, k_ranges = tile_ranges(q_pos, k_pos, window, G, bm, bn, key_tiles=(key_m, key_n))
    do = do.contiguous()
    # Delta = rowsum(dO * O) per row, and the sink's part: its share of each row's softmax is 2^(z - L),
    # its logit's gradient sums -share * Delta over the rows of its head
    delta_rows = torch.empty(B, K, T * G, dtype=torch.float32, device=q.device)
    sink_rows = torch.empty_like(delta_rows)
    if T * G:
        _attn_bwd_delta_kernel[(triton.cdiv(T * G, DELTA_ROWS), B * K)](
            do,
            out.contiguous(),
            lse,
            sinks,
            delta_rows,
            sink_rows,
            T,
            G,
            K,
            HEAD_DIM=Dh,
            BLOCK_R=DELTA_ROWS,
            num_warps=8,
        )
    dsinks = sink_rows.view(B, K, T, G).sum((0, 2)).reshape(K * G)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty(B, S, K, Dh, dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    scale = 1.0 / math.sqrt(Dh)
    common = dict(HEAD_DIM=Dh, **flags(q.dtype))
    qc = q.contiguous()  # dO and dQ are read and written with q's strides
    _attn_bwd_dq_kernel[(triton.cdiv(T * G, bm), B * K)](
        qc,
        k,
        v,
        do,
        lse,
        delta_rows,
        q_pos,
        k_pos,
        dq,
        q_ranges,
        T,
        S,
        G,
        K,
        window,
        LOG2E * scale,
        scale,
        *qc.stride()[:4],
        *k.stride()[:3],
        *v.stride()[:3],
        q_pos.stride(0),
        k_pos.stride(0),
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=warps,
        num_stages=stages,
        **common,
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, key_n), B * K)](
        qc,
        k,
        v,
        do,
        lse,
        delta_rows,
        q_pos,
        k_pos,
        dk,
        dv,
        k_ranges,
        T,
        S,
        G,
        K,
        window,
        LOG2E * scale,
        scale,
        *qc.stride()[:4],
        *k.stride()[:3],
        *v.stride()[:3],
        *dk.stride()[:3],
        q_pos.stride(0),
        k_pos.stride(0),
        BLOCK_M=key_m,
        BLOCK_N=key_n,
        num_warps=key_warps,
        num_stages=key_stages,
        **common,
    )
    return dq, dk, dv, dsinks


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, q_pos, k_pos, window):
        out, lse = attention_fwd(q, k, v, sinks, q_pos, k_pos, window)
        ctx.save_for_backward(q, k, v, sinks, out, lse, q_pos, k_pos)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, sinks, out, lse, q_pos, k_pos = ctx.saved_tensors
        dq, dk, dv, dsinks = attention_bwd(do, q, k, v, sinks, out, lse, q_pos, k_pos, ctx.window)
        return dq, dk, dv, dsinks.to(sinks.dtype), None, None, None


def attention_with_sinks(
    q: torch.Tensor,  # [B, T, K, G, Dh] rotated queries
    k: torch.Tensor,  # [B, S, K, Dh] rotated keys
    v: torch.Tensor,  # [B, S, K, Dh]
    sinks: torch.Tensor,  # [K*G] one logit per query head
    q_pos: torch.Tensor,  # [T] or [B, T]; negative = padding
    k_pos: torch.Tensor,  # [S] or [B, S]; negative = padding, never seen
    window: int | None,  # None: full causal; w: the w most recent keys, the current one included
) -> torch.Tensor:  # [B, T, K, G, Dh]
    """gptoss.model.attention_with_sinks on Triton kernels; differentiable in q, k, v and sinks."""
    check(q, k, v, sinks, window)
    B, T, K, G, Dh = q.shape
    q_pos, k_pos = positions(q_pos, B, T, "q_pos"), positions(k_pos, B, k.shape[1], "k_pos")
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    window = NO_WINDOW if window is None else int(window)
    sinks = sinks.contiguous()
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, sinks))
    if T * G <= DECODE_ROWS and not needs_grad:
        return attention_decode(q, k, v, sinks, q_pos, k_pos, window)
    return AttentionFunction.apply(q, k, v, sinks, q_pos, k_pos, window)
