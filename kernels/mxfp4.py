"""MXFP4 -> bf16/fp32 dequantization kernel.

Computes out[r, c] = E2M1(code of element c of row r) * 2^(scales[r, c // 32] - 127) for a weight
stored as `blocks` [..., R, C/32, 16] uint8 (two codes per byte, low nibble first) and `scales`
[..., R, C/32] uint8. Reference: gptoss.mxfp4.dequantize (same signature).

Grid: (cdiv(rows, BLOCK_R), cdiv(C, BLOCK_C)). Each program reads BLOCK_R x BLOCK_C/2 bytes once,
splits every byte into its two nibbles and interleaves them (tl.join), so the kernel streams the
packed bytes and the scales exactly once: 0.53 bytes read per value written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def e2m1_to_float(code):
    """4-bit E2M1 code (int32, 0..15) -> fp32: sign | 2-bit exponent (bias 1) | 1-bit mantissa."""
    sign = tl.where((code & 8) != 0, -1.0, 1.0)
    exponent = (code >> 1) & 3
    mantissa = (code & 1).to(tl.float32)
    normal = (1.0 + 0.5 * mantissa) * tl.exp2((exponent - 1).to(tl.float32))
    return sign * tl.where(exponent == 0, 0.5 * mantissa, normal)


@triton.jit
def _mxfp4_dequant_fwd_kernel(
    blocks_ptr,  # [rows, C/2] uint8
    scales_ptr,  # [rows, C/32] uint8
    out_ptr,  # [rows, C] bf16 or fp32
    rows,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,  # a multiple of 32
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    half = tl.program_id(1).to(tl.int64) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)  # byte columns
    mask = (r[:, None] < rows) & (half[None, :] < C // 2)
    byte = tl.load(blocks_ptr + r[:, None] * (C // 2) + half[None, :], mask=mask, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + r[:, None] * (C // 32) + half[None, :] // 16, mask=mask, other=127)
    factor = tl.exp2(scale.to(tl.float32) - 127.0)  # [BLOCK_R, BLOCK_C/2]
    low = e2m1_to_float(byte & 15) * factor  # elements 0, 2, 4, ...
    high = e2m1_to_float(byte >> 4) * factor  # elements 1, 3, 5, ...
    values = tl.reshape(tl.join(low, high), (BLOCK_R, BLOCK_C))  # interleave: [.., c/2, 2] -> [.., c]
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    out_mask = (r[:, None] < rows) & (c[None, :] < C)
    tl.store(out_ptr + r[:, None] * C + c[None, :], values.to(out_ptr.dtype.element_ty), mask=out_mask)


def mxfp4_dequant_fwd(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Launcher: [..., R, G, 16] uint8 + [..., R, G] uint8 -> [..., R, G*32] in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"blocks {tuple(blocks.shape)} should be scales {tuple(scales.shape)} + (16,)")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype}")
    C = scales.shape[-1] * 32
    lead = scales.shape[:-1]
    rows = scales[..., 0].numel()
    out = torch.empty(*lead, C, dtype=dtype, device=blocks.device)
    if rows == 0:
        return out
    BLOCK_R, BLOCK_C = 16, min(256, triton.next_power_of_2(C))
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _mxfp4_dequant_fwd_kernel[grid](
        blocks.contiguous(), scales.contiguous(), out, rows, C, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C
    )
    return out


def mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Functional alias (weights are frozen, so there is no backward)."""
    return mxfp4_dequant_fwd(blocks, scales, dtype)
