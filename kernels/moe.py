"""Grouped expert matmuls with MXFP4 weights decoded in registers, forward and backward.

Rows are the (token, slot) pairs sorted by expert (kernels/routing.py). Each kernel computes
out[m, n] = sum_k a[m, k] * W_e[k, n] for the rows m of one expert e; the four products of the MoE
block are four small kernels that differ in which operand they gather, which way they read the
weight, and their epilogue:

  kernel                    a [rows, K]          weight read as            N, K    epilogue
  _moe_gate_up_kernel       x[token(m)]          W1 [2I, D], rows = n      2I, D   h = acc + b1 (saved); act = swiglu(h) [P, I]
  _moe_down_kernel          act[m] (sorted)      W2 [D, I], rows = n       D, I    y = acc + b2; out[pair] = w * y
  _moe_down_bwd_kernel      grad_out[token(m)]   W2 [D, I], rows = k       I, D    gh = swiglu'(h) * w * acc  [P, 2I];
                                                                                   dots[pair] += sum_n acc * act
  _moe_gate_up_bwd_kernel   gh[m] (sorted)       W1 [2I, D], rows = k      D, 2I   gx[pair] = acc

They share three @triton.jit helpers: the expert search (_find_expert, _expert_rows), and the two main
loops (_product_along_rows: the weight's packed dimension is K; _product_across_rows: it is N).
W1's rows interleave gate (2j) and linear (2j+1), so in gate_up one dot yields both halves of a tile
and the epilogue splits the column pairs; down_bwd writes its two gradients back interleaved.
The combine over the k slots of a token is a fifth, small kernel (_moe_combine_kernel: the fp32 sum,
rounded once to the activations' dtype). Weights are frozen; LoRA adapters on the experts join through
ADD: an fp32 or bf16 [P, N] update (sorted rows) added to the product in the epilogue (to h and y
forward; to d act before the SwiGLU's backward and to gx), computed by torch as one masked rank product
for all experts (kernels/expert_lora.py).

Weights stay MXFP4: each K step loads [rows, blocks, 16] packed bytes (16-byte vectors along the
packed dimension) and one scale per 32 values, decodes them in registers (kernels/mxfp4.py:
mxfp4_decode) and feeds a bf16 dot with fp32 accumulation. The forward kernels read the weight along its
rows' packed dimension (K) and transpose the decoded tile, or, in a swapped tile (SWAP), keep it as it
is and take the product transposed, acc^T = W a^T, with the decoded tile as wgmma's register operand;
the backward kernels read it along N (swapped: each byte pair of one column at two neighbouring rows
decoded into the register pair that operand takes, mxfp4_decode_columns). The
wgmma tiles (64+ rows) load each trip's scales a trip ahead (a byte a block is too small for the
asynchronous copies that bring the codes and `a`, and a plain load read in its own trip stalls it).

Grid: (G row tiles, cdiv(N, BLOCK_N), row tiles / G): the programs walk G row tiles at a time across every
column tile (_program_tile); G = 8 at prefill, all the row tiles at decode (_grid). Expert e needs
cdiv(count_e, BLOCK_M) row tiles; in all at most
cdiv(P, BLOCK_M) + min(E, P) - 1 (ceil(a) + ceil(b) <= ceil(a + b) + 1, over the non-empty experts),
so at decode (P = 4, BLOCK_M = 16) all 4 row tiles do work. Each program finds its expert from the
counts on the device (a search in chunks of 128 experts, no host synchronisation).
Autotune key: N, K, the dtype path, ADD and ROWS, the mean rows per used expert in buckets (16: decode,
64, 256, 1024: prefill); each kernel's bucket tries only its own tile shapes (CONFIGS, pruned by _pruner).
A key is tuned once, at its first launch, so a bucket's sizes share one choice: 1024 (over 256 rows an
expert: 20b prefills of 2,049+ tokens) keeps a long prefill from running what a 2,048-token training row
chose, or what 1,024 tokens chose for 16,384. On a GPU, the tiles a new key will time are compiled
before it times them, side by side on the CPU's cores (compile_tiles); Triton's own loop compiles each
as it reaches it.
Reference: gptoss.model.experts_forward (the torch path), which the tests compare against.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gptoss.checkpointing import output_unread
from gptoss.kernels.expert_lora import expert_mask, lora_backward, lora_rank, lora_update
from gptoss.kernels.mxfp4 import (
    INTERPRET,
    mxfp4_blocks,
    mxfp4_decode,
    mxfp4_decode_columns,
    mxfp4_scales,
    mxfp4_tile,
    scales_taken_here,
)
from gptoss.kernels.rounding import rounded
from gptoss.kernels.routing import Routing, route
from gptoss.launches import autotune_configs

SEARCH = tl.constexpr(128)  # experts examined per step of the tile -> expert search
GROUP_ROWS = 8  # row tiles whose programs run together, over every column tile (_grid, _program_tile)
WIDE_OFFSETS = 2**31  # gate_up_bwd's [P, D] output this large or larger takes 64-bit offsets (WIDE)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel and rows-per-expert bucket, chosen with the
# compile gate (tests/compile_gate.py) for SASS instructions per decoded weight element, registers and
# programs at decode. Decode: 16-row tiles on mma.sync, 1-4 warps, N narrow enough that 4 experts give
# 180-360 programs for 132 SMs. Prefill: 64- and 128-row tiles on wgmma. 2880 = 45 x 64. K = 128 a trip
# spreads a trip's fixed costs (barriers, copies, descriptors) over twice the elements: 5.8-6.1 SASS
# instructions per element against 6.6-6.8 at K = 64, on Triton 3.6 and 3.9 (the backward's K = 128 tiles
# waited on their scale loads on 3.6 until scales_taken_here, below). A sixth field of 1: the tile swapped
# (_product_along_rows' SWAP: the decoded tile as wgmma's register operand, the product asynchronous) at
# 7.0-7.5 instructions per element on Triton 3.9, 6.7-7.1 on 3.6; the autotuner weighs that against the
# unswapped tiles' synchronous products. 64 x 128 on one warpgroup (4 warps): a trip's fixed costs (the
# blocks' addresses, the scales, barriers, descriptors) are paid by 4 warps instead of 8, 5.25-5.42
# instructions per element against 6.7-6.9, and at 131-194 registers two or three blocks still share an
# SM, as with 8 warps, so one block's decode runs beside another's product (an unswapped block waits for
# its own each trip); half the warps an SM to hide latency with, which the autotuner weighs.
# Every tile has three stages, none two: a two-stage loop issues the next trip's copies (LDGSTS) after its
# product and waits for all of them (DEPBAR.LE SB0, 0x0) at the top of that trip, so each trip waits out
# the whole latency of memory, hidden only by other blocks on the SM. With three, a trip's copies stay in
# flight through the next trip (the compile gate's loop_copies_ahead, held to 1 or more by its test), for
# at most 0.4 more SASS instructions an element (the count that had chosen two).
# The backward's: below.
_FORWARD = {
    16: [(16, 64, 128, 2, 3), (16, 128, 64, 4, 3)],
    64: [
        (32, 64, 128, 4, 3),
        (64, 64, 64, 4, 3),
        (64, 128, 64, 8, 3),
        (64, 128, 64, 8, 3, 1),
        (64, 128, 64, 4, 3),
    ],
    256: [
        (64, 128, 64, 8, 3),
        (64, 128, 64, 4, 3),
        (128, 64, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 128, 128, 8, 3),
        (128, 128, 128, 8, 3),
        (64, 128, 64, 8, 3, 1),
        (128, 128, 64, 8, 3, 1),
    ],
}
# Backward: the wgmma tiles contract the decoded even and odd columns in two products and interleave
# the accumulators once after the loop (interleaving the decoded tile each trip, Triton 3.6, PyTorch
# 2.11's, failed to lower every 64 x 128 and 4-warp 64-row tile, TritonGPUOptimizeDotOperands). 64 x 128
# now compiles clean on 3.6 and 3.9 at 6.6-6.8 SASS instructions per element (8.2-8.6 on 3.6), where
# 64 x 64 x 64, before the only one, took 9.3-10.1 (now 10.3-10.9); 128 x 128 spills on sm_100a with ADD.
# With the LoRA update in the epilogue (ADD) 3.6 spilled 8 bytes at (16, 64, 128, 2, 3) and
# (32, 64, 128, 4, 3) (no longer at the first: 184-198 registers); K = 64 (8.0-8.5 on 3.9) instead of the
# second; 3.9 spills (16, 64, 64, 2, 3) and, on sm_100a, (32, 64, 128, 4, 2).
# Swapped backward tiles (_product_across_rows' SWAP), asynchronous like the forward's: 64 x 128 x 64 at
# 7.8-8.0 instructions per element (3.6: 7.6-7.8), and K = 128, which swapped waits on no load on either
# Triton, at 6.3-7.0 (3.6: 7.4-7.9); swapped 128 x 128 x 128 spills on sm_100a (down_bwd). Unswapped
# K = 128 (5.6-5.7 per element, against 6.6-6.8 at K = 64) and, for gate_up_bwd, 64 x 128 on one
# warpgroup (4 warps: 5.2-5.3 at K = 64, 4.7-5.1 at K = 128): Triton 3.6 waited on their scale loads in
# the trip that issued them until the scales reached the decode through scales_taken_here; now none
# waits. down_bwd's 4-warp tiles spill (its epilogue holds the product, h and the SwiGLU's backward).
_BACKWARD = {
    16: [(16, 64, 128, 2, 3), (16, 128, 128, 4, 3)],
    64: [(32, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 128, 64, 8, 3, 1)],
    256: [(64, 128, 64, 8, 3), (64, 64, 64, 8, 3), (64, 128, 128, 8, 3, 1)],
}
# down_bwd at K = 128 on 8 warps; gate_up_bwd on one warpgroup at K = 64 and 128 (its 8-warp K = 128 tile,
# 5.66-5.69 per element, holds as many blocks an SM as the 4-warp one at 4.7-5.1)
_DOWN_BWD_MORE = [(64, 128, 128, 8, 3)]
_GATE_UP_BWD_MORE = [(64, 128, 64, 4, 3), (64, 128, 128, 4, 3)]


def _long_prefill(table: dict) -> dict:
    """A table with rows_bucket's 1024 (over 256 rows an expert): the 256 bucket's tiles, tuned apart."""
    return {**table, 1024: table[256]}


# By kernel (the names of KERNELS, below): the compile gate compiles every tile listed here.
CONFIGS = {
    # 256 token rows a tile, swapped: a decoded element serves twice the MACs of the 128-row tiles', so a
    # trip's issue (252 SASS instructions a warp, 504 cycles for 8 warps) is half its wgmma (1,024 cycles)
    # where the 128-row tile's is 0.92 of it; down's spills on sm_100a
    "gate_up": _long_prefill({**_FORWARD, 256: [*_FORWARD[256], (256, 128, 64, 8, 3, 1)]}),
    "down": _long_prefill({**_FORWARD, 16: [(16, 32, 128, 1, 3), (16, 64, 128, 2, 3)]}),  # N = D: 2880, not 5760
    "down_bwd": _long_prefill(
        {**_BACKWARD, 64: [*_BACKWARD[64], *_DOWN_BWD_MORE], 256: [*_BACKWARD[256], *_DOWN_BWD_MORE]}
    ),
    # 128 token rows a tile: twice the MACs a decoded element; swapped, down_bwd's spills on sm_100a with ADD
    "gate_up_bwd": _long_prefill(
        {
            **_BACKWARD,
            64: [*_BACKWARD[64], *_GATE_UP_BWD_MORE],
            256: [*_BACKWARD[256], (128, 128, 64, 8, 3, 1), *_GATE_UP_BWD_MORE],
        }
    ),
}
# Tiles a kernel tries only without the LoRA update in its epilogue (ADD): with it they spill (Triton 3.6,
# sm_90a: 8 bytes), and the adapted layers are a few of the model's.
WITHOUT_ADD = {"gate_up": {(256, 128, 64, 8, 3, 1)}}
# fp32 activations (parity runs)
FP32_CONFIGS = _long_prefill({16: [(16, 32, 64, 4, 2)], 64: [(32, 32, 64, 4, 2)], 256: [(64, 64, 32, 4, 2)]})
INTERPRET_CONFIG = (16, 32, 64, 1, 1)


class ExpertWeights(NamedTuple):
    """One frozen matrix of all E experts as the kernels read it, W_e [R, C] = [out, in]: MXFP4 `blocks`
    [E, R, C/32, 16] and `scales` [E, R, C/32] (uint8), and its `bias` [E, R] (None where a kernel adds
    none: the backward products)."""

    blocks: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def experts(self) -> int:
        return self.blocks.shape[0]

    @property
    def rows(self) -> int:  # R: the matrix's outputs
        return self.blocks.shape[1]

    @property
    def cols(self) -> int:  # C: its inputs
        return self.blocks.shape[2] * 32

    def check(self, a: torch.Tensor, width: int) -> None:
        """Refuses what the kernels cannot read: other layouts, strided buffers, activations `a` that
        are neither bf16 nor fp32 or not [rows, width] (width: the side of W the product contracts,
        which must not be empty: the main loops take at least one trip)."""
        b, s = self.blocks, self.scales
        if b.dtype != torch.uint8 or b.dim() != 4 or b.shape[-1] != 16 or s.shape != b.shape[:-1]:
            raise ValueError(
                f"expected MXFP4 blocks [E, R, C/32, 16] and scales [E, R, C/32], got {tuple(b.shape)}, {tuple(s.shape)}"
            )
        if not (b.is_contiguous() and s.is_contiguous()):
            raise ValueError("MXFP4 expert blocks and scales must be contiguous")
        if a.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"activations must be bfloat16 or float32, got {a.dtype}")
        if a.dim() != 2 or a.shape[1] != width or width < 1:
            raise ValueError(
                f"expected activations [rows, {width}] for experts of {self.rows} x {self.cols}, got {tuple(a.shape)}"
            )


def expert_weights(experts) -> tuple[ExpertWeights, ExpertWeights]:
    """(W1, W2) of a gptoss.model.Experts with MXFP4 experts: gate_up [2I, D] and down [D, I]."""
    return (
        ExpertWeights(experts.gate_up_proj_blocks, experts.gate_up_proj_scales, experts.gate_up_proj_bias),
        ExpertWeights(experts.down_proj_blocks, experts.down_proj_scales, experts.down_proj_bias),
    )


def rows_bucket(pairs: int, experts: int) -> int:
    """Mean (token, slot) rows per used expert, rounded up to a bucket of CONFIGS."""
    rows = pairs / max(1, min(experts, pairs))
    return 16 if rows <= 16 else 64 if rows <= 64 else 256 if rows <= 256 else 1024


def _config(m, n, k, warps, stages, swap=0) -> triton.Config:
    tile = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, **({"SWAP": True} if swap else {})}
    return triton.Config(tile, num_warps=warps, num_stages=stages)


def tile_of(config: triton.Config | dict) -> tuple:
    """A config (or a launch's chosen constexprs with num_warps and num_stages, as the compile gate holds
    them) as CONFIGS and GPTOSS_MOE_CONFIG write it: (M, N, K, warps, stages), then 1 if swapped."""
    if isinstance(config, triton.Config):
        config = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    tile = tuple(config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
    return tile + ((1,) if config.get("SWAP") else ())


def pinned_config() -> triton.Config | None:
    """GPTOSS_MOE_CONFIG="BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages[,swap]" pins one config, read at
    launch (swap, 0 or 1: a wgmma tile that takes its product transposed)."""
    pinned = os.environ.get("GPTOSS_MOE_CONFIG")
    if not pinned:
        return None
    try:
        m, n, k, warps, stages, *rest = (int(v) for v in pinned.split(","))
        if len(rest) > 1:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"GPTOSS_MOE_CONFIG must be five integers M,N,K,warps,stages and an optional sixth, swap, got {pinned!r}"
        ) from None
    swap = rest[0] if rest else 0
    if not all(v > 0 and v & (v - 1) == 0 for v in (m, n, k, warps)) or stages < 1:
        raise ValueError(f"GPTOSS_MOE_CONFIG {pinned!r}: tiles and warps must be powers of two, stages >= 1")
    if m < 16 or n < 32 or k < 32:
        raise ValueError(
            f"GPTOSS_MOE_CONFIG {pinned!r}: needs BLOCK_M >= 16 (the MMA's rows), BLOCK_N >= 32 and BLOCK_K >= 32 (one MX block)"
        )
    if swap not in (0, 1) or (swap and (m < 64 or n < 64)):
        raise ValueError(
            f"GPTOSS_MOE_CONFIG {pinned!r}: swap is 0 or 1, and 1 only for a wgmma tile (BLOCK_M >= 64, BLOCK_N >= 64)"
        )
    return _config(m, n, k, warps, stages, swap)


def _pruner(kernel: str):
    """The configs a launch of `kernel` may try: the pinned one, else its rows bucket's (fp32 and the
    interpreter have their own)."""

    def prune(configs, named_args, **kwargs):
        pinned = pinned_config()
        if pinned is not None:
            return [pinned]
        if INTERPRET:
            return [_config(*INTERPRET_CONFIG)]
        table = FP32_CONFIGS if kwargs["UPCAST"] else CONFIGS[kernel]
        left_out = WITHOUT_ADD.get(kernel, set()) if kwargs["ADD"] else set()
        return [_config(*c) for c in table[named_args["ROWS"]] if c not in left_out]

    return prune


def _tiles(kernel: str) -> list[tuple]:
    return sorted({c for table in (CONFIGS[kernel], FP32_CONFIGS) for cs in table.values() for c in cs})


def all_configs() -> list[triton.Config]:
    """Every tile any of the four kernels may try (GPTOSS_MOE_CONFIG may pin any of them)."""
    return [_config(*c) for c in sorted({c for kernel in CONFIGS for c in _tiles(kernel)})]


def _autotune(kernel: str):
    return triton.autotune(
        configs=[_config(*c) for c in _tiles(kernel)],
        key=["N", "K", "ROWS", "UPCAST", "ADD"],
        prune_configs_by={"early_config_prune": _pruner(kernel)},
    )


# --- helpers the four kernels share ---------------------------------------------------------------------


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


@triton.jit
def _program_tile(BLOCK_N: tl.constexpr):
    """This program's row tile and first column. The grid is (G, column tiles, row tiles / G): blocks
    start in order of their index, x fastest, so the programs running at once walk G row tiles (a group)
    across every column tile, row tiles fastest, then the next group. They share a few row tiles'
    activations (read once while they stay in L2) and the weight tiles of those rows' experts. Row tiles
    fastest over the whole grid ran every row tile against one column tile at a time, and read all the
    activations again for each column tile: at 2,048 tokens down's [P, I] act is 47 MB and gate_up_bwd's
    [P, 2I] gradient 94 MB, each read 23 times (128-column tiles), more than the H100's 50 MB L2 holds.
    A weight tile is now read about once per group its expert's rows fall in, instead of once. Both
    indices come from the block's coordinates: no division (one in a one-dimensional grid tipped a
    backward tile into spilling on sm_100a)."""
    return tl.program_id(2) * tl.num_programs(0) + tl.program_id(0), tl.program_id(1) * BLOCK_N


@triton.jit
def _find_expert(counts_ptr, E, pid_m, BLOCK_M: tl.constexpr):
    """Row tile pid_m's expert and the number of row tiles of the experts before it (`first`); the
    expert is E (none) for the row tiles past the last: the grid is an upper bound."""
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
    return expert, first


@triton.jit
def _expert_rows(counts_ptr, offsets_ptr, sorted_pairs_ptr, expert, first, pid_m, BLOCK_M: tl.constexpr):
    """Row tile pid_m's [BLOCK_M] sorted rows m (int32), which of them exist, and their pairs (token * TOPK
    + slot, int32)."""
    count = tl.load(counts_ptr + expert)
    local = (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = local < count
    m = tl.load(offsets_ptr + expert) + local
    pair = tl.load(sorted_pairs_ptr + m, mask=m_mask, other=0)
    return m, m_mask, pair


@triton.jit
def _product_along_rows(
    a_ptr,
    a_row,
    m_mask,
    w_e,
    s_e,
    n,
    n_mask,
    K,
    UPCAST: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr,
):
    """acc[m, n] = sum_k a[a_row[m], k] W[n, k]: the weight's rows are n, its packed blocks run along k.
    A decoded tile comes as its even and odd positions along k (mxfp4_tile). wgmma tiles (64+ rows)
    interleave them in registers, so that `a` goes from shared memory to the tensor cores untouched;
    mma.sync tiles take `a` into registers anyway and meet the even and odd columns of `a` in two dots.
    wgmma tiles also load the scales a trip ahead; the mma.sync tiles, short of registers, don't.
    SWAP (wgmma tiles): the product is taken transposed, acc^T = W a^T, so that the decoded tile is
    wgmma's register operand. Unswapped, it is written to shared memory every trip (wgmma reads its
    second operand only from there), behind a barrier, and each trip waits for its own product; swapped,
    no copy of it is made and the product is still running while the next trip loads and decodes."""
    WGMMA: tl.constexpr = BLOCK_M >= 64
    # the loop takes at least one trip (the launchers refuse K = 0): without a path that skips it, ptxas
    # keeps a swapped tile's products asynchronous (a skipping path defines the accumulator outside them,
    # and ptxas then serialised every wgmma of some swapped tiles)
    tl.assume(K > 0)
    if WGMMA and SWAP:
        accT = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    G = K // 32
    if WGMMA:
        g = tl.arange(0, BLOCK_K // 32)
        scale = mxfp4_scales(s_e, n, g, n_mask[:, None] & (g[None, :] < G), G)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_row[:, None] * K + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        if WGMMA:  # this trip's scales came a trip ahead; the next trip's are loaded now
            w_even, w_odd = mxfp4_decode(
                mxfp4_blocks(w_e, n, g, n_mask[:, None] & (g[None, :] < G), G), scale, INTERPRET, SWAP
            )
            g_next = g + BLOCK_K // 32
            scale = mxfp4_scales(s_e, n, g_next, n_mask[:, None] & (g_next[None, :] < G), G)
            if SWAP:  # the decoded halves interleaved along k: W's tile in its own order, [BLOCK_N, BLOCK_K]
                w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, BLOCK_K))
                accT = _dot(w, tl.trans(a), accT, UPCAST)  # [BLOCK_N, BLOCK_K] x [BLOCK_K, BLOCK_M]
            else:
                # `a` stays in shared memory; the decoded halves are interleaved in registers (each half
                # transposed first: Triton 3.6 fails to lower the transpose of the interleaved tile)
                w = tl.reshape(tl.permute(tl.join(tl.trans(w_even), tl.trans(w_odd)), (0, 2, 1)), (BLOCK_K, BLOCK_N))
                acc = _dot(a, w, acc, UPCAST)  # [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
        else:  # mma.sync takes both operands from registers: splitting the few rows of `a` costs less
            w_even, w_odd = mxfp4_tile(w_e, s_e, n, g, n_mask[:, None] & (g[None, :] < G), G, INTERPRET)
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))  # columns 2i and 2i + 1
            acc = _dot(a_even, tl.trans(w_even), acc, UPCAST)  # [BLOCK_M, BLOCK_K/2] x [BLOCK_K/2, BLOCK_N]
            acc = _dot(a_odd, tl.trans(w_odd), acc, UPCAST)
    if WGMMA and SWAP:
        acc = tl.trans(accT)
    return acc


@triton.jit
def _product_across_rows(
    a_ptr,
    a_row,
    m_mask,
    w_e,
    s_e,
    n0,
    K,
    N,
    UPCAST: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr,
):
    """acc[m, n] = sum_k a[a_row[m], k] W[k, n] for n = n0 .. n0 + BLOCK_N - 1: the weight's rows are k,
    its packed blocks run along n, so a decoded tile comes as its even and odd columns. wgmma tiles (64+
    rows) contract them in two products and interleave the two accumulators once after the loop (a
    per-trip interleave made Triton 3.6 fail to lower every 64 x 128 tile), and load the scales a trip
    ahead as _product_along_rows does; mma.sync tiles interleave the decoded halves each trip.
    SWAP (wgmma tiles): as in _product_along_rows, acc^T = W^T a^T with the decoded tile as wgmma's
    register operand, its product asynchronous. The even columns' values and the odd columns' are stacked
    as the operand's rows, so one product takes both; the accumulator's rows are put back in column
    order once after the loop."""
    WGMMA: tl.constexpr = BLOCK_M >= 64
    tl.assume(K > 0)  # as in _product_along_rows: no path that skips the loop
    if WGMMA and SWAP:  # rows: columns n0, n0 + 2, ..., then n0 + 1, n0 + 3, ...
        accT = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    elif WGMMA:  # the even and odd columns in two products, interleaved once after the loop
        acc_even = tl.zeros([BLOCK_M, BLOCK_N // 2], tl.float32)
        acc_odd = tl.zeros([BLOCK_M, BLOCK_N // 2], tl.float32)
    else:  # mma.sync: the decoded halves interleaved each trip, one product (two cost twice the registers)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    G = N // 32
    g = n0 // 32 + tl.arange(0, BLOCK_N // 32)
    if WGMMA:
        k = tl.arange(0, BLOCK_K)
        scale = mxfp4_scales(s_e, k, g, (k[:, None] < K) & (g[None, :] < G), G)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_row[:, None] * K + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
        if WGMMA and SWAP:  # this trip's scales came a trip ahead; the next trip's are loaded now
            byte = mxfp4_blocks(w_e, k, g, (k[:, None] < K) & (g[None, :] < G), G)
            w_even, w_odd = mxfp4_decode_columns(byte, scale, INTERPRET)  # [BLOCK_N / 2, BLOCK_K] each
            k_next = k + BLOCK_K
            scale = mxfp4_scales(s_e, k_next, g, (k_next[:, None] < K) & (g[None, :] < G), G)
            w = tl.reshape(tl.permute(tl.join(w_even, w_odd), (2, 0, 1)), (BLOCK_N, BLOCK_K))
            accT = _dot(w, tl.trans(a), accT, UPCAST)  # [BLOCK_N, BLOCK_K] x [BLOCK_K, BLOCK_M]
        elif WGMMA:  # this trip's scales came a trip ahead; the next trip's are loaded now
            byte = mxfp4_blocks(w_e, k, g, (k[:, None] < K) & (g[None, :] < G), G)
            w_even, w_odd = mxfp4_decode(byte, scales_taken_here(scale, INTERPRET), INTERPRET)
            k_next = k + BLOCK_K
            scale = mxfp4_scales(s_e, k_next, g, (k_next[:, None] < K) & (g[None, :] < G), G)
            acc_even = _dot(a, w_even, acc_even, UPCAST)  # columns n0, n0 + 2, ...
            acc_odd = _dot(a, w_odd, acc_odd, UPCAST)  # columns n0 + 1, n0 + 3, ...
        else:
            w_even, w_odd = mxfp4_tile(w_e, s_e, k, g, (k[:, None] < K) & (g[None, :] < G), G, INTERPRET)
            w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_K, BLOCK_N))  # columns n0, n0 + 1, ...
            acc = _dot(a, w, acc, UPCAST)
    if WGMMA and SWAP:  # rows (parity, j) -> columns 2j + parity
        acc = tl.reshape(tl.permute(tl.reshape(accT, (2, BLOCK_N // 2, BLOCK_M)), (2, 1, 0)), (BLOCK_M, BLOCK_N))
    elif WGMMA:
        acc = tl.reshape(tl.join(acc_even, acc_odd), (BLOCK_M, BLOCK_N))
    return acc


# --- the four kernels -------------------------------------------------------------------------------------


@_autotune("gate_up")
@triton.jit(do_not_specialize=["save"])
def _moe_gate_up_kernel(
    x_ptr,  # [T, D] bf16 or fp32
    w_ptr,  # [E, 2I, D/32, 16] uint8: W1 in MXFP4
    s_ptr,  # [E, 2I, D/32] uint8 scales
    bias_ptr,  # [E, 2I] b1
    act_ptr,  # out: [P, I] swiglu(h), sorted rows
    h_ptr,  # save: [P, 2I] h, sorted rows (the backward's)
    add_ptr,  # ADD: [P, 2I] fp32 or bf16, sorted rows: the LoRA update of h
    counts_ptr,
    offsets_ptr,
    sorted_pairs_ptr,  # the routing: [E] rows per expert, [E] first row, [P] pairs
    K,
    N,
    E,
    TOPK,
    ROWS,  # rows-per-expert bucket: only the autotune key reads it
    alpha,
    limit,
    save,  # 1 keeps h: a runtime flag, not a constexpr, so training and inference launch the same tiles
    ADD: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr = False,  # the tile's, from its config (CONFIGS: a sixth field)
):
    pid_m, n0 = _program_tile(BLOCK_N)
    expert, first = _find_expert(counts_ptr, E, pid_m, BLOCK_M)
    if expert >= E:
        return
    m, m_mask, pair = _expert_rows(counts_ptr, offsets_ptr, sorted_pairs_ptr, expert, first, pid_m, BLOCK_M)
    m = m.to(tl.int64)
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < N
    w_e, s_e = w_ptr + expert.to(tl.int64) * N * K // 2, s_ptr + expert.to(tl.int64) * N * K // 32
    acc = _product_along_rows(
        x_ptr,
        (pair // TOPK).to(tl.int64),
        m_mask,
        w_e,
        s_e,
        n,
        n_mask,
        K,
        UPCAST,
        INTERPRET,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        SWAP,
    )
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if ADD:
        acc += tl.load(add_ptr + m[:, None] * N + n[None, :], mask=mn_mask, other=0.0).to(tl.float32)
    h = acc + tl.load(bias_ptr + expert * N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # kept by a mask, not a branch (a branch made a swapped tile spill on sm_100a); the flag goes into a
    # vector first (the interpreter refuses a mask made with a scalar)
    keep = m_mask & (tl.full([BLOCK_M], save, tl.int32) != 0)
    # h rounded to the activations' dtype before the SwiGLU, as it is kept: the act made here is then the
    # one the backward makes again from the kept h (down_bwd's epilogue) and differentiates; and a rounded
    # h takes half the registers of an fp32 one (the 256-row swapped tile spilled 48 bytes with it in fp32)
    h = h.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + m[:, None] * N + n[None, :], h, mask=keep[:, None] & n_mask[None, :])
    g, lin = tl.split(tl.reshape(h.to(tl.float32), (BLOCK_M, BLOCK_N // 2, 2)))  # columns 2j, 2j+1: gate, linear
    j = n0 // 2 + tl.arange(0, BLOCK_N // 2)
    act = _swiglu(g, lin, alpha, limit)
    tl.store(
        act_ptr + m[:, None] * (N // 2) + j[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=m_mask[:, None] & (j[None, :] < N // 2),
    )


@_autotune("down")
@triton.jit
def _moe_down_kernel(
    act_ptr,  # [P, I] sorted rows, bf16 or fp32
    w_ptr,  # [E, D, I/32, 16] uint8: W2 in MXFP4
    s_ptr,  # [E, D, I/32] uint8 scales
    bias_ptr,  # [E, D] b2
    gate_ptr,  # [P] fp32 routing weight of each pair
    out_ptr,  # out: [P, D] fp32, pair order: w * y
    add_ptr,  # ADD: [P, D] fp32 or bf16, sorted rows: the LoRA update of y
    counts_ptr,
    offsets_ptr,
    sorted_pairs_ptr,
    K,
    N,
    E,
    ROWS,
    ADD: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr = False,  # the tile's, from its config (CONFIGS: a sixth field)
):
    pid_m, n0 = _program_tile(BLOCK_N)
    expert, first = _find_expert(counts_ptr, E, pid_m, BLOCK_M)
    if expert >= E:
        return
    m, m_mask, pair = _expert_rows(counts_ptr, offsets_ptr, sorted_pairs_ptr, expert, first, pid_m, BLOCK_M)
    m, pair = m.to(tl.int64), pair.to(tl.int64)
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < N
    w_e, s_e = w_ptr + expert.to(tl.int64) * N * K // 2, s_ptr + expert.to(tl.int64) * N * K // 32
    acc = _product_along_rows(
        act_ptr, m, m_mask, w_e, s_e, n, n_mask, K, UPCAST, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, SWAP
    )
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if ADD:
        acc += tl.load(add_ptr + m[:, None] * N + n[None, :], mask=mn_mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + pair, mask=m_mask, other=0.0)
    y = acc + tl.load(bias_ptr + expert * N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + pair[:, None] * N + n[None, :], y * gate[:, None], mask=mn_mask)


@_autotune("down_bwd")
@triton.jit
def _moe_down_bwd_kernel(
    grad_ptr,  # [T, D] d loss / d out, bf16 or fp32
    w_ptr,  # [E, D, I/32, 16] uint8: W2 in MXFP4, read across its rows
    s_ptr,  # [E, D, I/32] uint8 scales
    h_ptr,  # [P, 2I] the forward's h, sorted rows
    gate_ptr,  # [P] fp32 routing weight of each pair
    gh_ptr,  # out: [P, 2I] d loss / d h, sorted rows, gate and linear interleaved as h
    dots_ptr,  # out: [P, cdiv(I, 32)] fp32, pair order: column tile j's share of sum_n (grad_out W2)[n] act[n]
    add_ptr,  # ADD: [P, I] fp32 or bf16, sorted rows: the adapter's path to d act (routing weight included)
    counts_ptr,
    offsets_ptr,
    sorted_pairs_ptr,
    K,
    N,
    E,
    TOPK,
    ROWS,
    alpha,
    limit,
    ADD: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr = False,  # the tile's, from its config (CONFIGS: a sixth field)
):
    pid_m, n0 = _program_tile(BLOCK_N)
    expert, first = _find_expert(counts_ptr, E, pid_m, BLOCK_M)
    if expert >= E:
        return
    m, m_mask, pair = _expert_rows(counts_ptr, offsets_ptr, sorted_pairs_ptr, expert, first, pid_m, BLOCK_M)
    a_row = (pair // TOPK).to(tl.int64)
    m, pair = m.to(tl.int64), pair.to(tl.int64)
    w_e, s_e = w_ptr + expert.to(tl.int64) * N * K // 2, s_ptr + expert.to(tl.int64) * N * K // 32
    acc = _product_across_rows(
        grad_ptr, a_row, m_mask, w_e, s_e, n0, K, N, UPCAST, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, SWAP
    )
    # acc = sum_d grad_out[d] W2[d, n]; times the routing weight = d loss / d act
    gate = tl.load(gate_ptr + pair, mask=m_mask, other=0.0)
    d_act = acc * gate[:, None]
    if ADD:
        n = n0 + tl.arange(0, BLOCK_N)
        mn_mask = m_mask[:, None] & (n[None, :] < N)
        d_act += tl.load(add_ptr + m[:, None] * N + n[None, :], mask=mn_mask, other=0.0).to(tl.float32)
    j = 2 * n0 + tl.arange(0, 2 * BLOCK_N)  # the interleaved columns of h and gh
    hj_mask = m_mask[:, None] & (j[None, :] < 2 * N)
    h = tl.load(h_ptr + m[:, None] * (2 * N) + j[None, :], mask=hj_mask, other=0.0).to(tl.float32)
    g, lin = tl.split(tl.reshape(h, (BLOCK_M, BLOCK_N, 2)))
    d_gate, d_lin = _swiglu_bwd(g, lin, d_act, alpha, limit)
    gh = tl.reshape(tl.join(d_gate, d_lin), (BLOCK_M, 2 * BLOCK_N))
    tl.store(gh_ptr + m[:, None] * (2 * N) + j[None, :], gh.to(gh_ptr.dtype.element_ty), mask=hj_mask)
    # the routing weight's gradient through the frozen product, d loss / d w = grad_out . (act W2^T), as
    # sum_n acc[m, n] act[n]: act made again as the forward made it, from the kept h (in h's dtype); the
    # columns past N have h = 0, so act = 0 there. One partial sum per column tile (no atomics: the
    # autotuner may run a launch more than once), summed by moe_down_bwd.
    act = _swiglu(g, lin, alpha, limit).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dots_ptr + pair * tl.cdiv(N, 32) + tl.program_id(1), tl.sum(acc * act, axis=1), mask=m_mask)


@_autotune("gate_up_bwd")
@triton.jit
def _moe_gate_up_bwd_kernel(
    gh_ptr,  # [P, 2I] d loss / d h, sorted rows, bf16 or fp32
    w_ptr,  # [E, 2I, D/32, 16] uint8: W1 in MXFP4, read across its rows
    s_ptr,  # [E, 2I, D/32] uint8 scales
    gx_ptr,  # out: [P, D] fp32, pair order: d loss / d x of each pair
    add_ptr,  # ADD: [P, D] fp32 or bf16, sorted rows: the adapter's part of it
    counts_ptr,
    offsets_ptr,
    sorted_pairs_ptr,
    K,
    N,
    E,
    ROWS,
    ADD: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WIDE: tl.constexpr,  # P * N reaches 2^31: 64-bit offsets for gx
    SWAP: tl.constexpr = False,  # the tile's, from its config (CONFIGS: a sixth field)
):
    pid_m, n0 = _program_tile(BLOCK_N)
    expert, first = _find_expert(counts_ptr, E, pid_m, BLOCK_M)
    if expert >= E:
        return
    m, m_mask, pair = _expert_rows(counts_ptr, offsets_ptr, sorted_pairs_ptr, expert, first, pid_m, BLOCK_M)
    m = m.to(tl.int64)
    n = n0 + tl.arange(0, BLOCK_N)
    w_e, s_e = w_ptr + expert.to(tl.int64) * N * K // 2, s_ptr + expert.to(tl.int64) * N * K // 32
    acc = _product_across_rows(
        gh_ptr, m, m_mask, w_e, s_e, n0, K, N, UPCAST, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, SWAP
    )
    mn_mask = m_mask[:, None] & (n[None, :] < N)
    if ADD:
        acc += tl.load(add_ptr + m[:, None] * N + n[None, :], mask=mn_mask, other=0.0).to(tl.float32)
    # gx's row offsets in 32 bits where [P, N] allows it, and the unswapped tiles read the rows' pairs again
    # here rather than hold them through the loop: on sm_100a ptxas gives the 64 x 128 tiles 64 registers a
    # thread (four blocks an SM), and either otherwise spilled there
    if not SWAP:
        pair = tl.load(sorted_pairs_ptr + m, mask=m_mask, other=0)
    row = pair.to(tl.int64) * N if WIDE else (pair * N).to(tl.int64)
    tl.store(gx_ptr + row[:, None] + n[None, :], acc.to(gx_ptr.dtype.element_ty), mask=mn_mask)


@triton.jit
def _moe_combine_kernel(
    pairs_ptr,  # [T, TOPK, D] fp32: each (token, slot) pair's output, pair order
    out_ptr,  # out: [T, D], the activations' dtype
    D,
    TOPK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t] = the sum over the k slots of token t, in fp32, rounded once to out's dtype: the combine of
    the forward (the weighted expert outputs) and of the backward (the gathered inputs' gradients)."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for slot in tl.static_range(TOPK):
        acc += tl.load(pairs_ptr + (t * TOPK + slot) * D + d, mask=mask, other=0.0)
    tl.store(out_ptr + t * D + d, rounded(acc, out_ptr).to(out_ptr.dtype.element_ty), mask=mask)


COMBINE_COLUMNS = 1024  # columns of D per combine program

# The four kernels by the names of CONFIGS (the compile gate reads both).
KERNELS = {
    "gate_up": _moe_gate_up_kernel,
    "down": _moe_down_kernel,
    "down_bwd": _moe_down_bwd_kernel,
    "gate_up_bwd": _moe_gate_up_bwd_kernel,
}


def autotuned() -> dict[str, int]:
    """How many choices each kernel's autotuner holds (one per autotune key it has met)."""
    return {name: len(kernel.cache) for name, kernel in KERNELS.items()}


def chosen_tiles(since: dict[str, int] | None = None) -> dict[str, dict]:
    """What each kernel's autotuner chose at its latest launch: {kernel: {"tile": (M, N, K, warps, stages[,
    1]), "ms": {"M-N-K-warps-stages[-1]": milliseconds}}}, for the benchmarks' records. "ms" holds every
    tile timed for that choice, and only where the choice was made after `since` (an autotuned()
    snapshot): a choice met before was timed for another launch. Kernels not yet launched are left out."""
    chosen = {}
    for name, kernel in KERNELS.items():
        best = getattr(kernel, "best_config", None)
        if best is None:
            continue
        fresh = since is not None and len(kernel.cache) > since.get(name, 0)
        timed = (getattr(kernel, "configs_timings", None) or {}) if fresh else {}
        ms = {
            "-".join(map(str, tile_of(c))): float(t[0] if isinstance(t, list | tuple) else t) for c, t in timed.items()
        }
        chosen[name] = {"tile": tile_of(best), "ms": ms}
    return chosen


# --- launchers --------------------------------------------------------------------------------------------


def _tuning_key(tuner, args: tuple, kwargs: dict) -> tuple:
    """The key under which Triton's Autotuner files its choice for a launch: the key arguments' values, then
    every tensor argument's dtype (Autotuner.run's own rule, the same in Triton 3.6 and 3.9)."""
    named = {k: v for k, v in {**dict(zip(tuner.arg_names, args)), **kwargs}.items() if k in tuner.arg_names}
    return tuple(
        [named[k] for k in tuner.keys if k in named] + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    )


def compile_tiles(tuner, grid, args: tuple, kwargs: dict, workers: int | None = None) -> int:
    """Compiles every tile the autotuner `tuner` will time for this launch, `workers` at a time (default:
    one a CPU core), and returns how many it compiled. Its own loop compiles each tile as it times it,
    one after another (2-3 s each for sm_90a on two CPU cores), and the recipe's first step meets 43
    of them for gpt-oss-20b (28 for 120b). Triton's compiler spends most of that outside the GIL (in
    ptxas), so threads run side by side; each compiled kernel lands in the JIT's cache under the key the
    timing run looks up. A tile that fails to compile here is left for the autotuner, which meets the
    failure as it would have."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode  # Triton >= 3.5
    except ImportError:
        return 0
    if active_mode.get() is not None:  # the caller compiles asynchronously already; one mode at a time
        return 0
    from concurrent.futures import ThreadPoolExecutor

    configs = autotune_configs(tuner, args, kwargs)
    workers = min(len(configs), workers or len(os.sched_getaffinity(0)))
    if len(configs) < 2 or workers < 2:
        return 0
    with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for config in configs:  # as Autotuner._bench runs a config: the launch's kwargs, then the config's
            tuner.fn.warmup(*args, grid=grid, **dict(kwargs, **config.all_kwargs()))
    return len(configs)


def _launch(tuner, grid, *args, **kwargs) -> None:
    """tuner[grid](*args, **kwargs); on a GPU, at a key its autotuner has not met, the tiles it will time
    are compiled first, side by side (compile_tiles)."""
    if args[0].is_cuda and _tuning_key(tuner, args, kwargs) not in tuner.cache:
        compile_tiles(tuner, grid, args, kwargs)
    tuner[grid](*args, **kwargs)


def _grid(P: int, E: int, N: int):
    """(G, column tiles, groups): the row tiles' upper bound in groups of G = GROUP_ROWS, rounded up to
    whole groups (_program_tile). At decode's rows per expert (the 16 bucket) one group of all of them: the
    activations are a few rows, and rounding up would add programs that find no rows."""
    decode = rows_bucket(P, E) == 16

    def grid(meta):
        rows = triton.cdiv(P, meta["BLOCK_M"]) + min(E, P) - 1
        group = rows if decode else min(GROUP_ROWS, rows)
        return (group, triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(rows, group))

    return grid


def _flags(a: torch.Tensor, add: torch.Tensor | None) -> dict:
    return dict(ADD=add is not None, UPCAST=INTERPRET or a.dtype == torch.float32, INTERPRET=INTERPRET)


def _check_add(add: torch.Tensor | None, P: int, N: int) -> None:
    if add is not None and (
        add.shape != (P, N) or add.dtype not in (torch.float32, torch.bfloat16) or not add.is_contiguous()
    ):
        raise ValueError(
            f"the added update must be a contiguous fp32 or bf16 [{P}, {N}] tensor, got {add.dtype} {tuple(add.shape)}"
        )


def moe_gate_up_fwd(
    x: torch.Tensor,
    routing: Routing,
    w1: ExpertWeights,
    alpha: float,
    limit: float,
    save: bool,
    add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, D] -> act [P, I] in sorted-row order (and h [P, 2I] when `save`); `add` [P, 2I] fp32
    or bf16 (sorted rows) joins h before the SwiGLU."""
    w1.check(x, w1.cols)
    P, D, I2 = routing.sorted_pairs.numel(), x.shape[1], w1.rows
    _check_add(add, P, I2)
    act = torch.empty(P, I2 // 2, dtype=x.dtype, device=x.device)
    h = torch.empty(P, I2, dtype=x.dtype, device=x.device) if save else None
    if P:
        _launch(
            _moe_gate_up_kernel,
            _grid(P, w1.experts, I2),
            x.contiguous(),
            w1.blocks,
            w1.scales,
            w1.bias,
            act,
            act if h is None else h,
            act if add is None else add,
            routing.counts,
            routing.offsets,
            routing.sorted_pairs,
            D,
            I2,
            w1.experts,
            routing.top_k,
            rows_bucket(P, w1.experts),
            alpha,
            limit,
            int(save),
            **_flags(x, add),
        )
    return act, h


def moe_down_fwd(
    act: torch.Tensor,
    routing: Routing,
    gate: torch.Tensor,
    w2: ExpertWeights,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """act [P, I] (sorted rows) -> weighted outputs [P, D] fp32 in pair order; `add` [P, D] fp32 or
    bf16 (sorted rows) joins y before the routing weight. Nothing is kept for the backward: the routing
    weights' gradient comes from moe_down_bwd."""
    w2.check(act, w2.cols)
    P, I, D = act.shape[0], act.shape[1], w2.rows
    _check_add(add, P, D)
    out = torch.empty(P, D, dtype=torch.float32, device=act.device)
    if P:
        _launch(
            _moe_down_kernel,
            _grid(P, w2.experts, D),
            act.contiguous(),
            w2.blocks,
            w2.scales,
            w2.bias,
            gate,
            out,
            out if add is None else add,
            routing.counts,
            routing.offsets,
            routing.sorted_pairs,
            I,
            D,
            w2.experts,
            rows_bucket(P, w2.experts),
            **_flags(act, add),
        )
    return out


def moe_down_bwd(
    grad_out: torch.Tensor,
    routing: Routing,
    gate: torch.Tensor,
    w2: ExpertWeights,
    h: torch.Tensor,
    alpha: float,
    limit: float,
    add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad of the MoE output [T, D] -> (grad of the pre-activation h [P, 2I] (sorted rows), dots [P] fp32
    in pair order: grad_out[t] . (act W2_e^T), each pair's output without bias or adapter, dotted with its
    token's gradient: the routing weight's gradient through the product); `add` [P, I] fp32 or bf16
    (sorted rows) joins the gradient of act before the SwiGLU's backward."""
    w2.check(grad_out, w2.rows)
    P, D, I = h.shape[0], grad_out.shape[1], h.shape[1] // 2
    _check_add(add, P, I)
    gh = torch.empty(P, 2 * I, dtype=h.dtype, device=h.device)
    # a column per 32 columns of act, the narrowest tile: a launch fills cdiv(I, BLOCK_N) of them
    partial = torch.zeros(P, triton.cdiv(I, 32), dtype=torch.float32, device=h.device)
    if P:
        _launch(
            _moe_down_bwd_kernel,
            _grid(P, w2.experts, I),
            grad_out.contiguous(),
            w2.blocks,
            w2.scales,
            h,
            gate,
            gh,
            partial,
            gh if add is None else add,
            routing.counts,
            routing.offsets,
            routing.sorted_pairs,
            D,
            I,
            w2.experts,
            routing.top_k,
            rows_bucket(P, w2.experts),
            alpha,
            limit,
            **_flags(grad_out, add),
        )
    return gh, partial.sum(1)


def moe_gate_up_bwd(
    gh: torch.Tensor, routing: Routing, w1: ExpertWeights, add: torch.Tensor | None = None
) -> torch.Tensor:
    """grad of h [P, 2I] (sorted rows) -> grad of the gathered inputs [P, D] fp32 in pair order; `add`
    [P, D] fp32 or bf16 (sorted rows) joins it."""
    w1.check(gh, w1.rows)
    P, I2, D = gh.shape[0], gh.shape[1], w1.cols
    _check_add(add, P, D)
    gx = torch.empty(P, D, dtype=torch.float32, device=gh.device)
    if P:
        _launch(
            _moe_gate_up_bwd_kernel,
            _grid(P, w1.experts, D),
            gh.contiguous(),
            w1.blocks,
            w1.scales,
            gx,
            gx if add is None else add,
            routing.counts,
            routing.offsets,
            routing.sorted_pairs,
            I2,
            D,
            w1.experts,
            rows_bucket(P, w1.experts),
            WIDE=P * D >= WIDE_OFFSETS,
            **_flags(gh, add),
        )
    return gx


def moe_combine(pairs: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T * k, D] fp32 in pair order -> [T, D] in `dtype`: the sum over each token's k slots, in fp32, one
    launch (in torch: a sum into an fp32 [T, D], then a cast)."""
    if pairs.dtype != torch.float32 or pairs.dim() != 2 or pairs.shape[0] % max(1, top_k) or top_k < 1:
        raise ValueError(f"expected fp32 [T * {top_k}, D] pair outputs, got {pairs.dtype} {tuple(pairs.shape)}")
    P, D = pairs.shape
    out = torch.empty(P // top_k, D, dtype=dtype, device=pairs.device)
    if P and D:
        grid = (P // top_k, triton.cdiv(D, COMBINE_COLUMNS))
        _moe_combine_kernel[grid](pairs.contiguous(), out, D, TOPK=top_k, BLOCK_D=COMBINE_COLUMNS, num_warps=4)
    return out


# --- the MoE block as one differentiable function -----------------------------------------------------------


class MoEFunction(torch.autograd.Function):
    """out [T, D] = sum_slots w[t, s] * expert_{ids[t, s]}(x[t]); the MXFP4 weights (ExpertWeights) are
    frozen. Differentiable in x, w and, when given, the expert-major LoRA factors A1, B1 (gate_up) and
    A2, B2 (down), whose update s * (a A_e^T) B_e^T joins each matrix's product in the kernel epilogue.

    The backward keeps h, not the experts' outputs y: the routing weights' gradient grad_out[t] . y[t, s]
    is taken apart as grad_out . (act W2^T) (summed in down_bwd's epilogue, which has both factors),
    grad_out . b2 and the adapter's s (grad_out B2) . z2. So a checkpointed layer's recomputation
    (gptoss.checkpointing.output_unread) stops after gate_up: it returns an uninitialised tensor in
    place of the output, which nothing reads there, without the down product and the combine."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weights: torch.Tensor,
        A1,
        B1,
        A2,
        B2,
        routing: Routing,
        w1: ExpertWeights,
        w2: ExpertWeights,
        alpha: float,
        limit: float,
        scaling: float,
    ) -> torch.Tensor:
        save = any(ctx.needs_input_grad[:6])
        unread = save and output_unread()
        gate = weights.reshape(-1).float().contiguous()
        mask = z1 = z2 = u1 = u2 = None
        if A1 is not None or A2 is not None:
            A = A1 if A1 is not None else A2
            mask = expert_mask(routing, w1.experts, A.shape[0] // w1.experts, x.dtype)
        if A1 is not None:
            rows = routing.sorted_pairs.long() // routing.top_k  # the token of each sorted row
            z1, u1 = lora_update(x.index_select(0, rows), A1, B1, mask, scaling)
        act, h = moe_gate_up_fwd(x, routing, w1, alpha, limit, save, add=u1)
        if A2 is not None:
            z2, u2 = (lora_rank(act, A2, mask), None) if unread else lora_update(act, A2, B2, mask, scaling)
        if save:
            ctx.save_for_backward(x, h, gate, act if A2 is not None else None, mask, z1, z2, A1, B1, A2, B2)
            ctx.routing, ctx.w1, ctx.w2 = routing, w1, w2  # frozen buffers: held, never differentiated
            ctx.alpha, ctx.limit, ctx.scaling = alpha, limit, scaling
        if unread:  # a placeholder: nothing reads it (gptoss.checkpointing)
            return x.new_empty(x.shape)
        return moe_combine(moe_down_fwd(act, routing, gate, w2, add=u2), routing.top_k, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, h, gate, act, mask, z1, z2, A1, B1, A2, B2 = ctx.saved_tensors
        routing, K, s = ctx.routing, ctx.routing.top_k, ctx.scaling
        need = ctx.needs_input_grad
        T, D = grad_out.shape
        grad_out = grad_out.contiguous()
        pairs = routing.sorted_pairs.long()  # sorted row -> pair (token * K + slot)
        rows = pairs // K if A1 is not None or A2 is not None else None  # sorted row -> token
        grad_x = grad_w = dA1 = dB1 = dA2 = dB2 = d_act = None
        if A2 is not None:  # d loss / d y of each sorted row: its token's gradient times its routing weight
            g_rows = grad_out.index_select(0, rows)
            dA2, dB2, d_act = lora_backward(
                g_rows * gate[pairs].unsqueeze(-1).to(g_rows.dtype), act, z2, A2, B2, mask, s
            )
        if need[0] or need[1] or need[2] or need[3]:
            gh, dots = moe_down_bwd(grad_out, routing, gate, ctx.w2, h, ctx.alpha, ctx.limit, add=d_act)
            if need[1]:  # d out / d w[t, s] = grad_out[t] . y[t, s], y = act W2^T + b2 + the adapter's update
                if ctx.w2.bias is not None:  # [T, E] in the activations' dtype, as every product here
                    by_expert = grad_out @ ctx.w2.bias.to(grad_out.dtype).T
                    dots.view(T, K).add_(by_expert.gather(1, routing.ids.long()))
                if A2 is not None:
                    update = s * ((g_rows @ B2.to(g_rows.dtype)) * z2).float().sum(-1)  # sorted rows
                    dots.index_add_(0, pairs, update)
                grad_w = dots.view(T, K)
            dx = None
            if A1 is not None and (need[0] or need[2] or need[3]):
                dA1, dB1, dx = lora_backward(gh, x.index_select(0, rows), z1, A1, B1, mask, s)
            if need[0]:
                gx_pairs = moe_gate_up_bwd(gh, routing, ctx.w1, add=dx)
                grad_x = moe_combine(gx_pairs, K, x.dtype)
        return (
            grad_x,
            grad_w,
            dA1 if need[2] else None,
            dB1 if need[3] else None,
            dA2 if need[4] else None,
            dB2 if need[5] else None,
        ) + (None,) * 6


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
    w1, w2 = expert_weights(experts)
    return MoEFunction.apply(
        x.contiguous(),
        weights,
        *factors[0],
        *factors[1],
        routing,
        w1,
        w2,
        alpha,
        limit,
        scalings.pop() if scalings else 1.0,
    )
