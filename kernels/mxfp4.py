"""MXFP4 decoding in registers, and the MXFP4 -> bf16/fp32 dequantization kernel.

Computes out[r, c] = E2M1(code of element c of row r) * 2^(scales[r, c // 32] - 127) for a weight
stored as `blocks` [..., R, C/32, 16] uint8 (two codes per byte, low nibble first) and `scales`
[..., R, C/32] uint8. Reference: gptoss.mxfp4.dequantize (same signature).

How a tile is decoded (shared with the grouped expert matmul, kernels/moe.py):
- Bytes are loaded as [rows, blocks, 16]: one MX block is 16 contiguous bytes, a 16-byte vector load.
- Each scale byte s is loaded once per block and becomes the bf16 2^(s-127) by moving s into the
  exponent field (s << 7), not by an exp2 per element.
- E2M1 codes become bf16 with integer operations, two values per 32-bit register (E2M1_PTX): the
  3 magnitude bits go to bf16 bits 6-8 and the sign to bit 15. Read as bf16 that is exactly
  E2M1 * 2^-126 (codes 0 and 1 land on subnormals, which Hopper's bf16 multiply keeps), so one
  packed multiply by 2^126 gives the E2M1 value and one by the block's scale finishes it.
  Under TRITON_INTERPRET=1 (no PTX) the same values come from plain arithmetic (_e2m1_interpret).

The swapped tiles of the grouped MoE matmul, whose codes reach each thread a byte at a time, decode
one byte into one register holding both its values instead (E2M1_PAIR_PTX, mxfp4_decode's PAIRED).

The fused decode kernels (kernels/decode.py) take codes another way: E2M1_DOT_PTX turns them into the
bytes 12 + 2 E2M1 and sums their products with int8 activations exactly in int32 (e2m1_dot_block).

Dequantization grid: (cdiv(rows, BLOCK_R), cdiv(G, BLOCK_G)); each program streams BLOCK_R x BLOCK_G
blocks: 16 bytes + 1 scale read, 32 values written, per block.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# E2M1 -> bf16, four packed bytes in ($4) -> low-nibble values of bytes 0..3 ($0 = bytes 0,1; $1 = 2,3)
# and high-nibble values ($2, $3). The steps, as (op, dest, source, operand); tests/test_mxfp4_kernel.py
# runs this very list through a bit-exact model of each instruction on every byte pair.
#   prmt     gather bytes: t0 = [b0, 0, b1, 0], t1 = [b2, 0, b3, 0] (one code pair per 16-bit half)
#   and      keep one nibble per half (low: 0x000F000F, high: 0x00F000F0)
#   mul      one multiply places two shifted copies that share no bits (so no carries): the low nibble
#            x (64 + 4096) puts its magnitude at bits 6-8 and its sign at 15; the high nibble x (4 + 256) too
#   and      keep bits 6-8 and 15 of each half
#   bf16x2   times 2^126 (0x7E80) in both halves: E2M1 * 2^-126 -> E2M1, exact
def _nibbles(word: str) -> tuple:
    """The steps both E2M1 programs start with: gather the bytes of `word` a pair per 16-bit half, then
    keep one nibble per half (u0, u1: the low nibbles of bytes 0,1 and 2,3; u2, u3: the high ones)."""
    return (
        ("prmt", "t0", word, 0x4140),
        ("prmt", "t1", word, 0x4342),
        ("and", "u0", "t0", 0x000F000F),
        ("and", "u1", "t1", 0x000F000F),
        ("and", "u2", "t0", 0x00F000F0),
        ("and", "u3", "t1", 0x00F000F0),
    )


E2M1_PTX = (
    *_nibbles("$4"),
    ("mul", "u0", "u0", 64 + 4096),
    ("mul", "u1", "u1", 64 + 4096),
    ("mul", "u2", "u2", 4 + 256),
    ("mul", "u3", "u3", 4 + 256),
    ("and", "u0", "u0", 0x81C081C0),
    ("and", "u1", "u1", 0x81C081C0),
    ("and", "u2", "u2", 0x81C081C0),
    ("and", "u3", "u3", 0x81C081C0),
    ("bf16x2", "$0", "u0", 0x7E807E80),
    ("bf16x2", "$1", "u1", 0x7E807E80),
    ("bf16x2", "$2", "u2", 0x7E807E80),
    ("bf16x2", "$3", "u3", 0x7E807E80),
)


# E2M1 -> bf16, one byte ($2, zero-extended) -> its two values scaled by the block's scale, each in a
# 16-bit half of one register ($0: the low nibble's, $1: the high nibble's), the pair a tensor-core
# register operand takes for two neighbouring k. $3: the scale's bf16 2^(s-127) in both halves.
#   mul      byte x 4097 = byte | byte << 12: the low nibble at bits 0-3, the high nibble at bits 16-19
#   and      keep them (0x000F000F)
#   mul, and, bf16x2   as E2M1_PTX: magnitude to bits 6-8, sign to 15, times 2^126
#   bf16x2r  times the scale pair; split: the halves to $0 and $1
E2M1_PAIR_PTX = (
    ("mul", "u", "$2", 4097),
    ("and", "u", "u", 0x000F000F),
    ("mul", "u", "u", 64 + 4096),
    ("and", "u", "u", 0x81C081C0),
    ("bf16x2", "u", "u", 0x7E807E80),
    ("bf16x2r", "u", "u", "$3"),
    ("split", "$0", "u", "$1"),
)


# E2M1 -> bf16 for a tile read across its packed dimension: two bytes of one column from neighbouring rows
# ($2: a 16-bit pair, b0 | b1 << 8) -> $0: their low-nibble values, $1: their high-nibble values, each a bf16
# pair in one register (the values of one weight column at two neighbouring k, as a tensor-core register
# operand holds them). E2M1_PTX's steps on one word, t0 (the caller multiplies by the scales).
E2M1_COLUMN_PTX = (
    ("cvt", "w", "$2", None),  # the 16-bit pair, zero-extended
    *(
        (op, {"$2": "$1"}.get(dst, dst), "w" if src == "$4" else src, imm)
        for op, dst, src, imm in E2M1_PTX
        if dst in ("t0", "u0", "u2", "$0", "$2")
    ),
)


# E2M1 codes . 16-bit integer activations on CUDA cores (DP4A), for the fused decode kernels
# (kernels/decode.py). The activation is carried per block of 32 as integers q = 255 h + l with int8 parts
# h, l in [-127, 127] (kernels/decode.py's _quantize_store); a code c becomes the byte u = 12 + 2 E2M1(c)
# in [0, 24] with two byte permutes, and dp4a.u32.s32 sums four u x int8 products exactly in int32. One
# MX block: its four code words ($1-$4, eight codes each) against its activations' parts ($5-$8: h of codes
# 8j..8j+3 of word j; $9-$12: h of 8j+4..8j+7; $13-$16, $17-$20: l of the same) with the two byte tables
# of u ($21, $22: codes 0-7; $23, $24: codes 8-15; operands, so that they stay in registers) and a start
# value ($25: the caller passes -12 sum(q), so that the sum is of 2 E2M1 q) -> $0 = $25 + the sum of u q
# = $25 + 255 sum(u h) + sum(u l), exact (at most 32 x 24 x 32,512 before the start value). The caller
# scales it once per block. The steps, as (op, dest, a, b, c):
#   prmt  byte i of d = byte (nibble i of c & 7) of the table {a, b}; where nibble i's bit 3 (the code's
#         sign) is set, the byte's sign bit replicated instead, 0 for the table's bytes (all below 128).
#         So the table of positive codes gives u where the sign is 0 and 0 where it is 1, and the table of
#         negative codes, selected by the codes with their signs flipped, the other way round.
#   or    the two permutes' bytes, each from the one that is not 0 (codes 0 and 8 give 12 either way)
#   dp4a  d = c + the four unsigned bytes of a times the four signed bytes of b
#   mad   d = a * b + c (low 32 bits)
U_POS = (0x0F0E0D0C, 0x18141210)  # u of codes 0..7: 12 + 2 x (0, 0.5, 1, 1.5, 2, 3, 4, 6)
U_NEG = (0x090A0B0C, 0x00040608)  # u of codes 8..15: 12 - 2 x the same
U_TABLES = (*U_POS, *U_NEG)  # $21-$24


def _dot_steps(j: int) -> tuple:
    w, h_lo, h_hi, l_lo, l_hi = f"${1 + j}", f"${5 + j}", f"${9 + j}", f"${13 + j}", f"${17 + j}"
    first = j == 0  # the first word starts the sums: h at 0, l at the start value
    return (
        ("xor", "f", w, 0x88888888, None),  # the codes with their signs flipped
        ("shr", "wh", w, 16, None),  # codes 4-7 into the selector's nibbles (prmt reads the low 16 bits)
        ("shr", "fh", "f", 16, None),
        ("prmt", "p0", "$21", "$22", w),
        ("prmt", "n0", "$23", "$24", "f"),
        ("or", "u0", "p0", "n0", None),
        ("prmt", "p1", "$21", "$22", "wh"),
        ("prmt", "n1", "$23", "$24", "fh"),
        ("or", "u1", "p1", "n1", None),
        ("dp4a", "h", "u0", h_lo, 0 if first else "h"),
        ("dp4a", "h", "u1", h_hi, "h"),
        ("dp4a", "l", "u0", l_lo, "$25" if first else "l"),
        ("dp4a", "l", "u1", l_hi, "l"),
    )


E2M1_DOT_PTX = (*(step for j in range(4) for step in _dot_steps(j)), ("mad", "$0", "h", 255, "l"))
Q_PARTS = 255  # q = 255 h + l
Q_MAX = 127 * Q_PARTS + 127  # the largest |q|: h and l both 127
U_ZERO = 12  # the byte of codes 0 and 8
_Q_PARTS, _U_ZERO = tl.constexpr(Q_PARTS), tl.constexpr(U_ZERO)  # the same, for @triton.jit code


def _ptx(program, registers: str, templates: dict[str, str], prologue: tuple[str, ...] = ()) -> str:
    """A program of (op, dest, operands...) steps as one PTX block: its scratch registers declared, each
    step written by its op's template ({0}: the destination, {1}...: the operands)."""
    lines = ["{", f".reg .b32 {registers};", *prologue]
    for op, *operands in program:
        if op not in templates:
            raise ValueError(op)
        lines.append(templates[op].format(*operands))
    return "\n".join(lines + ["}"])


_E2M1_STEPS = {
    "prmt": "prmt.b32 {0}, {1}, zero, {2:#x};",
    "and": "and.b32 {0}, {1}, {2:#x};",
    "mul": "mul.lo.u32 {0}, {1}, {2};",
    "bf16x2": "mov.b32 k, {2:#x};\nmul.rn.bf16x2 {0}, {1}, k;",
}
_DOT_STEPS = {
    "xor": "xor.b32 {0}, {1}, {2:#x};",
    "shr": "shr.u32 {0}, {1}, {2};",
    "prmt": "prmt.b32 {0}, {1}, {2}, {3};",
    "or": "or.b32 {0}, {1}, {2};",
    "dp4a": "dp4a.u32.s32 {0}, {1}, {2}, {3};",
    "mad": "mad.lo.s32 {0}, {1}, {2}, {3};",
}
_E2M1_PAIR_ASM = tl.constexpr(
    _ptx(
        E2M1_PAIR_PTX,
        "u, k",
        {**_E2M1_STEPS, "bf16x2r": "mul.rn.bf16x2 {0}, {1}, {2};", "split": "mov.b32 {{{0}, {2}}}, {1};"},
    )
)
_E2M1_COLUMN_ASM = tl.constexpr(
    _ptx(
        E2M1_COLUMN_PTX,
        "w, t0, u0, u2, zero, k",
        {**_E2M1_STEPS, "cvt": "cvt.u32.u16 {0}, {1};"},
        prologue=("mov.b32 zero, 0;",),
    )
)
_E2M1_ASM = tl.constexpr(
    _ptx(E2M1_PTX, "t0, t1, u0, u1, u2, u3, p, zero, k", _E2M1_STEPS, prologue=("mov.b32 zero, 0;",))
)
_E2M1_DOT_ASM = tl.constexpr(_ptx(E2M1_DOT_PTX, "f, wh, fh, p0, n0, u0, p1, n1, u1, h, l", _DOT_STEPS))


@triton.jit
def _e2m1_interpret(code):
    """4-bit E2M1 codes (int32, 0..15) -> fp32 by arithmetic (the interpreter's path; exact). The magnitude
    code & 7 is 0, 0.5, 1, 1.5, 2, 3, 4, 6: half the code below 4, the code less 2 up to 6, then 6; the
    fewest operations, as the interpreter pays for each one in every program."""
    magnitude = (code & 7).to(tl.float32)
    value = tl.where(magnitude < 4.0, 0.5 * magnitude, tl.where(magnitude < 7.0, magnitude - 2.0, 6.0))
    return tl.where(code >= 8, -value, value)


@triton.jit
def _e2m1_interpret_byte(byte):
    """uint8 codes -> (low-nibble values, high-nibble values) in fp32 by arithmetic (the interpreter's path):
    both nibbles decoded as one tensor."""
    code = byte.to(tl.int32)
    return tl.split(_e2m1_interpret(tl.join(code & 15, code >> 4)))


@triton.jit
def e2m1_pairs(byte):
    """uint8 codes -> (low-nibble values, high-nibble values) in bf16, each shaped like `byte` (GPU only)."""
    return tl.inline_asm_elementwise(
        _E2M1_ASM, "=r,=r,=r,=r,r", [byte], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
    )


@triton.jit
def e2m1_pairs_scaled(byte, scale):
    """uint8 codes and bf16 scales (broadcast to the codes' shape) -> (low-nibble values, high-nibble
    values) times the scale, bf16, each shaped like `byte`; a byte's two values come out in one register,
    as a tensor-core register operand holds two neighbouring k (GPU only)."""
    bits = scale.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.inline_asm_elementwise(
        _E2M1_PAIR_ASM,
        "=h,=h,r,r",
        [byte.to(tl.int32), bits | (bits << 16)],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=1,
    )


@triton.jit
def mxfp4_decode_columns(byte, scale, INTERPRET: tl.constexpr):
    """Codes [K, B, 16] (K rows of B MX blocks along the packed dimension) and their scale bytes [K, B, 1]
    -> (even, odd) [B * 16, K] each: the values of the even and of the odd columns, transposed, so that
    each column's values at neighbouring rows k, k + 1 sit together (E2M1_COLUMN_PTX), as a tensor-core
    register operand [columns, k] holds them. bf16 on the GPU, fp32 in the interpreter."""
    columns: tl.constexpr = byte.shape[1] * 16
    code = tl.trans(tl.reshape(byte, (byte.shape[0], columns)))  # [columns / 2 bytes, K]
    if INTERPRET:
        low, high = _e2m1_interpret_byte(code)
        scale = e8m0_to_fp32(scale)
    else:
        low, high = tl.inline_asm_elementwise(
            _E2M1_COLUMN_ASM, "=r,=r,h", [code], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2
        )
        scale = e8m0_to_bf16(scale)
    scale = tl.trans(tl.reshape(tl.broadcast_to(scale, byte.shape), (byte.shape[0], columns)))
    return low * scale, high * scale


@triton.jit
def _u_interpret(code):
    """4-bit E2M1 codes (int32, 0..15) -> 12 + 2 E2M1(code) by arithmetic (the interpreter's path)."""
    m = code & 7
    twice = tl.where(m < 5, m, tl.where(m == 5, 6, tl.where(m == 6, 8, 12)))  # 2 |E2M1|
    return tl.where(code >= 8, _U_ZERO - twice, _U_ZERO + twice)


@triton.jit
def _quarters(t):
    """[A, B, 4] -> its four [A, B] slices, in order (registers of one thread: no data moves)."""
    even, odd = tl.split(tl.reshape(t, (t.shape[0], t.shape[1], 2, 2)))  # j = 0, 2 and j = 1, 3
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def e2m1_dot_block(word, xa, xb, xc, xd, tables, start, INTERPRET: tl.constexpr):
    """MX blocks [A, B]: their code words (word [A, B, 4] int32, eight codes each) against their
    activations' int8 parts ([A or 1, B, 4] int32 each; element j: xa, xb the h of codes 8j..8j+3 and
    8j+4..8j+7 of word j, four to an int32; xc, xd the l of the same) -> [A, B] int32: start + the sum of
    (12 + 2 E2M1(code)) x (255 h + l) over each block. tables: the four words of U_TABLES (int32 tensors
    the caller loads once); start: [A or 1, B] int32. On the GPU E2M1_DOT_PTX, one block per instance; in
    the interpreter the same integers by arithmetic, all eight codes of every word at once."""
    if INTERPRET:
        i = tl.arange(0, 8)[None, None, None, :]  # a word's codes, low nibble first
        u = _u_interpret((word[:, :, :, None] >> (4 * i)) & 15)  # [A, B, 4, 8]
        at = 24 - 8 * (i % 4)  # byte i % 4 of the part's word, sign-extended by the shifts
        h = (tl.where(i < 4, xa[:, :, :, None], xb[:, :, :, None]) << at) >> 24
        low = (tl.where(i < 4, xc[:, :, :, None], xd[:, :, :, None]) << at) >> 24
        return start + tl.sum(tl.sum(u * (h * _Q_PARTS + low), 3), 2)
    w, a, b, c, d = _quarters(word), _quarters(xa), _quarters(xb), _quarters(xc), _quarters(xd)
    return tl.inline_asm_elementwise(
        _E2M1_DOT_ASM,
        "=r" + ",r" * 25,
        [w[0], w[1], w[2], w[3], a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
        + [c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3], tables[0], tables[1], tables[2], tables[3], start],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def e8m0_to_fp32(scale):
    """uint8 E8M0 scale s -> fp32 2^(s-127): s becomes the exponent field (s << 23); s = 0 gives 2^-127, the
    subnormal 0x400000."""
    return tl.maximum(scale.to(tl.int32) << 23, 0x400000).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_to_bf16(scale):
    """uint8 E8M0 scale s -> bf16 2^(s-127): s becomes the exponent field (s << 7). For s = 0 that gives
    0; the max turns it into 0x0040, the subnormal 2^-127 (every s >= 1 gives at least 0x0080). s = 255
    gives inf, as the reference's exp2(128) does in fp32."""
    return tl.maximum(scale.to(tl.int16) << 7, 0x40).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def mxfp4_blocks(blocks_ptr, r, g, mask, G):
    """The packed codes of rows r [R] and MX blocks g [B] of a weight with G blocks per row -> [R, B, 16]
    uint8: 16 contiguous bytes (one block) per vector load."""
    j = tl.arange(0, 16)
    return tl.load(
        blocks_ptr + ((r[:, None] * G + g[None, :]) * 16)[:, :, None] + j[None, None, :], mask=mask[:, :, None], other=0
    )


@triton.jit
def mxfp4_scales(scales_ptr, r, g, mask, G):
    """The E8M0 scale bytes of the same blocks, as loaded, shaped [R, B, 1] as mxfp4_decode broadcasts them
    over each block's 16 bytes. Apart from the codes so that a main loop can load them a trip ahead and
    read them a trip later: one byte a block is too small for an asynchronous copy, and a plain load read
    in its own trip stalls that trip. Loaded in the decode's shape, they stay in the codes' register
    layout: loaded [R, B], Triton 3.6 moved them there through shared memory every trip of a wgmma tile
    (an extra barrier, and its loads waited on at 128 columns of K)."""
    return tl.load(scales_ptr + (r[:, None] * G + g[None, :])[:, :, None], mask=mask[:, :, None], other=127)


@triton.jit
def scales_taken_here(scale, INTERPRET: tl.constexpr):
    """Scale bytes loaded a trip ahead (mxfp4_scales), taken up in the trip that decodes with them: each
    passed through a register move the compiler cannot see into. Where a thread's two scales belong to
    neighbouring rows of a tile read across its packed dimension, the decode multiplies by them as one
    bf16 pair, and Triton 3.6 packed the two bytes into that pair right after the loads: in the trip that
    issues them, which then waited for them. After the move the packing can only come in the trip that
    uses them. int32 out (the bytes' values); the interpreter has no PTX, and takes them as they are."""
    if INTERPRET:
        return scale.to(tl.int32)
    return tl.inline_asm_elementwise(
        "mov.b32 $0, $1;", "=r,r", [scale.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def mxfp4_decode(byte, scale, INTERPRET: tl.constexpr, PAIRED: tl.constexpr = False):
    """Codes [R, B, 16] and scale bytes [R, B] or [R, B, 1] -> (even, odd) [R, B * 16] each: the values at even and odd
    positions along the row, kept apart (a matmul can contract them against the even and odd columns of
    its other operand, or tl.join interleaves them in registers). bf16 on the GPU, fp32 in the
    interpreter (which has no bf16 arithmetic: it would multiply the raw 16-bit patterns). PAIRED: each
    byte decoded alone, its two values made in one register (E2M1_PAIR_PTX), for a caller that joins
    them as a tensor-core register operand (there E2M1_PTX's four bytes a word cost byte permutes to
    gather and to pair the values again); the same values either way."""
    shape: tl.constexpr = (byte.shape[0], byte.shape[1] * 16)
    if len(scale.shape) == 2:
        scale = scale[:, :, None]
    if INTERPRET:
        low, high = _e2m1_interpret_byte(byte)
        scale = e8m0_to_fp32(scale)
        low, high = low * scale, high * scale
    elif PAIRED:  # a byte's two values in one register, scaled there
        low, high = e2m1_pairs_scaled(byte, tl.broadcast_to(e8m0_to_bf16(scale), byte.shape))
    else:
        low, high = e2m1_pairs(byte)  # [R, B, 16] each: elements 2j and 2j + 1 of the block
        scale = e8m0_to_bf16(scale)
        low, high = low * scale, high * scale
    return tl.reshape(low, shape), tl.reshape(high, shape)


@triton.jit
def mxfp4_tile(blocks_ptr, scales_ptr, r, g, mask, G, INTERPRET: tl.constexpr):
    """Rows r [R] and MX blocks g [B] (32 values each) of an MXFP4 weight with G blocks per row
    -> (even, odd) [R, B * 16] each (mxfp4_decode): codes and scales loaded in the same trip, the scales
    [R, B] (the mma.sync tiles of kernels/moe.py take fewer instructions that way than with mxfp4_scales)."""
    byte = mxfp4_blocks(blocks_ptr, r, g, mask, G)
    scale = tl.load(scales_ptr + r[:, None] * G + g[None, :], mask=mask, other=127)
    return mxfp4_decode(byte, scale, INTERPRET)


@triton.jit
def _mxfp4_dequant_fwd_kernel(
    blocks_ptr,  # [rows, G, 16] uint8
    scales_ptr,  # [rows, G] uint8
    out_ptr,  # [rows, G * 32] bf16 or fp32
    rows,
    G,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)  # [BLOCK_G]
    mask = (r[:, None] < rows) & (g[None, :] < G)
    even, odd = mxfp4_tile(blocks_ptr, scales_ptr, r, g, mask, G, INTERPRET)  # [BLOCK_R, BLOCK_G * 16] each
    values = tl.reshape(tl.join(even, odd), (BLOCK_R, BLOCK_G * 32))  # interleaved: natural order
    c = tl.program_id(1) * BLOCK_G * 32 + tl.arange(0, BLOCK_G * 32)
    out_mask = (r[:, None] < rows) & (c[None, :] < G * 32)
    tl.store(out_ptr + r[:, None] * G * 32 + c[None, :], values.to(out_ptr.dtype.element_ty), mask=out_mask)


def mxfp4_dequant_fwd(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Launcher: [..., R, G, 16] uint8 + [..., R, G] uint8 -> [..., R, G*32] in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"blocks {tuple(blocks.shape)} should be scales {tuple(scales.shape)} + (16,)")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype}")
    G = scales.shape[-1]
    rows = scales[..., 0].numel() if G else 0
    out = torch.empty(*scales.shape[:-1], G * 32, dtype=dtype, device=blocks.device)
    if rows == 0 or G == 0:
        return out
    BLOCK_R, BLOCK_G = 16, min(8, triton.next_power_of_2(G))  # 16 rows x 256 values: 2 KB read, 8 KB written
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(G, BLOCK_G))
    _mxfp4_dequant_fwd_kernel[grid](
        blocks.contiguous(), scales.contiguous(), out, rows, G, INTERPRET=INTERPRET, BLOCK_R=BLOCK_R, BLOCK_G=BLOCK_G
    )
    return out
