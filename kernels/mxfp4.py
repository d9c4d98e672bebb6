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


# E2M1 -> fp32 for products on CUDA cores (the fused decode kernels, kernels/decode.py): four packed
# bytes in ($8) -> the low-nibble values of bytes 0..3 ($0..$3) and the high-nibble values ($4..$7), one
# fp32 per register, each E2M1 * 2^-126 (the block's scale and 2^126 are applied once per block to the
# fp32 partial sum, not per element). The same gather and nibble masks as E2M1_PTX; then per value one
# multiply that places two copies of its nibble: the magnitude at bits 22-24 (the low exponent bits and
# the top mantissa bit of fp32) and the sign at 31, the other value of the 16-bit pair shifted out of the
# register or into bits the mask drops. 2.75 integer instructions per value, no bf16 -> fp32 conversion.
E2M1_F32_PTX = (
    *_nibbles("$8"),
    *(
        step
        for dst, src, factor in (
            ("$0", "u0", (64 + 4096) << 16),  # byte 0's low nibble (bits 0-3): x 2^22 and x 2^28
            ("$1", "u0", 64 + 4096),  # byte 1's (bits 16-19): x 2^6 and x 2^12
            ("$2", "u1", (64 + 4096) << 16),
            ("$3", "u1", 64 + 4096),
            ("$4", "u2", (4 + 256) << 16),  # byte 0's high nibble (bits 4-7): x 2^18 and x 2^24
            ("$5", "u2", 4 + 256),  # byte 1's (bits 20-23): x 2^2 and x 2^8
            ("$6", "u3", (4 + 256) << 16),
            ("$7", "u3", 4 + 256),
        )
        for step in (("mul", "p", src, factor), ("and", dst, "p", 0x81C00000))
    ),
)


def _ptx(program) -> str:
    lines = ["{", ".reg .b32 t0, t1, u0, u1, u2, u3, p, zero, k;", "mov.b32 zero, 0;"]
    for op, dst, src, imm in program:
        if op == "prmt":
            lines.append(f"prmt.b32 {dst}, {src}, zero, {imm:#x};")
        elif op == "and":
            lines.append(f"and.b32 {dst}, {src}, {imm:#x};")
        elif op == "mul":
            lines.append(f"mul.lo.u32 {dst}, {src}, {imm};")
        elif op == "bf16x2":
            lines += [f"mov.b32 k, {imm:#x};", f"mul.rn.bf16x2 {dst}, {src}, k;"]
        else:
            raise ValueError(op)
    return "\n".join(lines + ["}"])


_E2M1_ASM = tl.constexpr(_ptx(E2M1_PTX))
_E2M1_F32_ASM = tl.constexpr(_ptx(E2M1_F32_PTX))
TWO_POW_M126 = tl.constexpr(2.0**-126)  # what E2M1_F32_PTX's values are scaled by
TWO_POW_126 = tl.constexpr(2.0**126)


@triton.jit
def _e2m1_interpret(code):
    """4-bit E2M1 code (int32, 0..15) -> fp32 by arithmetic (the interpreter's path; exact)."""
    sign = tl.where((code & 8) != 0, -1.0, 1.0)
    exponent = (code >> 1) & 3
    mantissa = (code & 1).to(tl.float32)
    normal = (1.0 + 0.5 * mantissa) * tl.exp2((exponent - 1).to(tl.float32))
    return sign * tl.where(exponent == 0, 0.5 * mantissa, normal)


@triton.jit
def e2m1_pairs(byte):
    """uint8 codes -> (low-nibble values, high-nibble values) in bf16, each shaped like `byte` (GPU only)."""
    return tl.inline_asm_elementwise(
        _E2M1_ASM, "=r,=r,=r,=r,r", [byte], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
    )


@triton.jit
def e2m1_f32_words(word, INTERPRET: tl.constexpr):
    """int32 words of four code bytes -> eight fp32 tensors shaped like `word`, each value E2M1 * 2^-126:
    the low-nibble values of bytes 0..3, then the high-nibble values of bytes 0..3 (so output t holds
    element 8 w + e of its block for word w, e = 0, 2, 4, 6, 1, 3, 5, 7). On the GPU the integer program
    E2M1_F32_PTX; in the interpreter the same values by arithmetic (fp32 keeps them exactly: the
    smallest, 0.5 * 2^-126, is a subnormal, which numpy and the GPU's non-flushing fp32 arithmetic keep)."""
    if INTERPRET:
        b0, b1, b2, b3 = word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF, (word >> 24) & 0xFF
        return (
            _e2m1_interpret(b0 & 15) * TWO_POW_M126,
            _e2m1_interpret(b1 & 15) * TWO_POW_M126,
            _e2m1_interpret(b2 & 15) * TWO_POW_M126,
            _e2m1_interpret(b3 & 15) * TWO_POW_M126,
            _e2m1_interpret(b0 >> 4) * TWO_POW_M126,
            _e2m1_interpret(b1 >> 4) * TWO_POW_M126,
            _e2m1_interpret(b2 >> 4) * TWO_POW_M126,
            _e2m1_interpret(b3 >> 4) * TWO_POW_M126,
        )
    return tl.inline_asm_elementwise(
        _E2M1_F32_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [word], dtype=(tl.float32,) * 8, is_pure=True, pack=1
    )


@triton.jit
def e8m0_to_bf16(scale):
    """uint8 E8M0 scale s -> bf16 2^(s-127): s becomes the exponent field (s << 7). For s = 0 that gives
    0; the max turns it into 0x0040, the subnormal 2^-127 (every s >= 1 gives at least 0x0080). s = 255
    gives inf, as the reference's exp2(128) does in fp32."""
    return tl.maximum(scale.to(tl.int16) << 7, 0x40).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def mxfp4_tile(blocks_ptr, scales_ptr, r, g, mask, G, INTERPRET: tl.constexpr):
    """Rows r [R] and MX blocks g [B] (32 values each) of an MXFP4 weight with G blocks per row
    -> (even, odd) [R, B * 16] each: the values at even and odd positions along the row, kept apart
    (a matmul contracts them against the even and odd columns of its other operand, so no register
    shuffle interleaves them). bf16 on the GPU, fp32 in the interpreter (which has no bf16
    arithmetic: it would multiply the raw 16-bit patterns)."""
    j = tl.arange(0, 16)
    byte = tl.load(
        blocks_ptr + ((r[:, None] * G + g[None, :]) * 16)[:, :, None] + j[None, None, :], mask=mask[:, :, None], other=0
    )  # [R, B, 16] uint8, 16 contiguous bytes per block
    scale = tl.load(scales_ptr + r[:, None] * G + g[None, :], mask=mask, other=127)  # [R, B] uint8
    if INTERPRET:
        code = byte.to(tl.int32)
        low, high = _e2m1_interpret(code & 15), _e2m1_interpret(code >> 4)
        scale = tl.maximum(scale.to(tl.int32) << 23, 0x400000).to(tl.float32, bitcast=True)  # fp32 2^(s-127)
    else:
        low, high = e2m1_pairs(byte)  # [R, B, 16] each: elements 2j and 2j + 1 of the block
        scale = e8m0_to_bf16(scale)
    shape: tl.constexpr = (r.shape[0], g.shape[0] * 16)
    return tl.reshape(low * scale[:, :, None], shape), tl.reshape(high * scale[:, :, None], shape)


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
