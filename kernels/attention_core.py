"""What the attention kernels share (gptoss.kernels.attention for training and prefill,
gptoss.kernels.attention_decode for decoding): the tiles per kernel and dtype, the base-2 online-softmax
step, the visibility mask, and the checks and layouts of the inputs. The math is described in
kernels/attention.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss.kernels.mxfp4 import INTERPRET

LOG2E = 1.4426950408889634  # also read inside kernels by name, as LOG2E_IN_KERNELS (a constexpr global)
LOG2E_IN_KERNELS = tl.constexpr(LOG2E)
NO_WINDOW = 1 << 30  # a window no position reaches: full causal attention

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and dtype path; "interpret" keeps tests fast. The
# bf16 tiles, read in the compile gate's SASS (sm_90a, instructions a score on tiles every row sees whole,
# Triton 3.9 / 3.6): forward 128 x 128, 8.6 / 10.5, where 128 x 64 took 11.8 / 13.9 (twice the keys a trip
# halve its fixed costs and the output's rescaling a key); dQ 128 x 128, 8.3 / 9.8, where 64 x 64 took
# 11.1 / 12.0; dK/dV 64 x 64, 4 warps, 12.9 / 14.9 (its 128 x 128 and 128 x 64 tiles spill or take more).
# The backward's tile-pair table has one side for dQ's tiles and one for dK/dV's (tile_ranges' key_tiles).
# Which tile pairs are seen whole comes from that table too (two comparisons a trip; reducing the key
# tile's positions each trip took 3-9% more instructions), and positions are read only on masked trips:
# forward 8.0 / 7.7, dQ 7.7 / 7.1, dK/dV 11.8 / 11.8 on tiles seen whole. Three stages: with two, each
# trip waited at its top for the keys and values the trip before had sent for after its products (the
# compile gate's loop_copies_ahead 0), the whole latency of memory, and at one 8-warp block an SM (fwd,
# dQ) no other block to fill it; three keep a trip's copies in flight at the same instructions a score
# (two: 8.1 / 7.8, 7.8 / 7.1, 11.7 / 12.2), for 16-32 KiB more shared memory (fwd 112 KiB, dQ 128, dK/dV 65).
CONFIGS = {
    "fwd": {"bf16": (128, 128, 8, 3), "fp32": (32, 32, 4, 2), "interpret": (32, 16, 1, 1)},
    "dq": {"bf16": (128, 128, 8, 3), "fp32": (16, 32, 4, 1), "interpret": (32, 16, 1, 1)},
    "dkdv": {"bf16": (64, 64, 4, 3), "fp32": (16, 32, 4, 1), "interpret": (16, 32, 1, 1)},
    "decode": {"bf16": (16, 64, 4, 3), "fp32": (16, 32, 4, 2), "interpret": (16, 16, 1, 1)},
}


def path(dtype: torch.dtype) -> str:
    return "interpret" if INTERPRET else "fp32" if dtype == torch.float32 else "bf16"


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:  # the interpreter multiplies bf16 dot operands as raw integers: give it fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:  # fp32 data: full fp32 products (the parity runs), not TF32
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def visible(qp, oldest, kp):
    """[rows, keys]: key position kp is seen by the query at qp (oldest: the last position too old)."""
    return (kp[None, :] > oldest[:, None]) & (kp[None, :] <= qp[:, None])


@triton.jit
def online_step(s, v, m_i, l_i, acc, scale2, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """The online softmax after one key tile's unscaled scores s [rows, keys] (masked ones -inf): the
    running max, sum and unnormalised output [rows, Dh]. The scale goes into the exponent's fused
    multiply-add (scale2 > 0: the max of the scaled scores is the scaled max), one instruction a score
    where a multiply and a subtraction were two."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale2)
    p = tl.exp2(s * scale2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def attend(q, kt, v, seen, m_i, l_i, acc, scale2, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One key tile of the online softmax: scores of q [rows, Dh] against kt [Dh, keys] (base 2),
    masked by `seen`; returns the running max, sum and unnormalised output [rows, Dh] after it."""
    s = tl.where(seen, dot(q, kt, tl.zeros((q.shape[0], kt.shape[1]), tl.float32), UPCAST, IEEE), float("-inf"))
    return online_step(s, v, m_i, l_i, acc, scale2, UPCAST, IEEE)


@triton.jit
def seen_whole(key_first, key_last, newest_first, oldest_last):
    """Every row of a query tile sees every key of a key tile: the keys' smallest and largest positions
    against the rows' smallest position and largest last-too-old one (no padding on either side: a -1
    position makes it false). Where it holds, the kernels skip the per-score mask."""
    return (key_last <= newest_first) & (key_first > oldest_last)


@triton.jit
def masked(s, qp, oldest, kp_ptrs, col_ok, whole):
    """Scores [rows, keys] with what a row does not see at -inf; left as they are where `whole`. The keys'
    positions (at kp_ptrs, -1 where not col_ok) are read only on a masked trip, in the branch, after the
    trip's first product (read before it, in a branch of its own, the loop took 1-5 more instructions a
    score; read every trip, pipelined through shared memory with the tiles, 0.3-1.9 more on tiles seen
    whole)."""
    if not whole:
        kp = tl.load(kp_ptrs, mask=col_ok, other=-1)
        s = tl.where(visible(qp, oldest, kp), s, float("-inf"))
    return s


@triton.jit
def attend_tile(
    q, kt, v, qp, oldest, kp_ptrs, col_ok, whole, m_i, l_i, acc, scale2, UPCAST: tl.constexpr, IEEE: tl.constexpr
):
    """attend() of a key tile against query positions qp (oldest: each row's last position too old) and
    the key positions at kp_ptrs, read and the mask built only where not `whole` (seen_whole)."""
    s = dot(q, kt, tl.zeros((q.shape[0], kt.shape[1]), tl.float32), UPCAST, IEEE)
    s = masked(s, qp, oldest, kp_ptrs, col_ok, whole)
    return online_step(s, v, m_i, l_i, acc, scale2, UPCAST, IEEE)


def positions(pos: torch.Tensor, B: int, n: int, what: str) -> torch.Tensor:
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.dim() != 2 or pos.shape[-1] != n or pos.shape[0] not in (1, B):
        raise ValueError(f"{what} must be [{n}] or [{B}, {n}] positions, got {tuple(pos.shape)}")
    return pos.to(torch.int32).expand(B, n).contiguous()


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int | None) -> None:
    if q.dim() != 5 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B, T, K, G, Dh], k and v [B, S, K, Dh], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, T, K, G, Dh = q.shape
    if k.shape[0] != B or k.shape[2] != K or k.shape[3] != Dh:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}: expected [{B}, S, {K}, {Dh}]")
    if sinks.shape != (K * G,):
        raise ValueError(f"expected one sink per query head, [{K * G}], got {tuple(sinks.shape)}")
    if Dh not in (16, 32, 64, 128):
        raise ValueError(f"the Triton attention takes head dims 16, 32, 64 or 128, got {Dh}: use the torch backend")
    if q.dtype not in (torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, bfloat16 or float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None (full causal) or at least 1, got {window}")


def last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def flags(dtype: torch.dtype) -> dict:
    return dict(UPCAST=INTERPRET, IEEE=dtype == torch.float32)
