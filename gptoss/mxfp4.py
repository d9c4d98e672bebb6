"""MXFP4 (OCP Microscaling, E2M1 elements with a shared E8M0 scale per block of 32).

On disk (both the OpenAI `original/` and the Hugging Face MXFP4 layout):
    blocks [..., rows, in/32, 16] uint8  -- two 4-bit codes per byte, LOW nibble = earlier element
    scales [..., rows, in/32]     uint8  -- E8M0: the block's scale is 2 ** (byte - 127)
Blocks run along the last (input / reduction) dimension of a weight stored [out, in].
A code is sign (bit 3) | exponent (bits 2-1, bias 1) | mantissa (bit 0); see FP4_VALUES.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 32
SCALE_BIAS = 127
# value of each 4-bit code 0..15; codes 8..15 are the negatives of 0..7
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# midpoints between consecutive magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6: the rounding boundaries
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@functools.cache
def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Decode two bytes (four codes) per lookup: row u is the four values of the byte pair whose
    16-bit word, as this machine reads it, is u. One gather per four elements instead of one per
    element, from a 512 KiB (bf16) table."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    byte = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)  # [256, 2]: low nibble first
    first, second = (
        torch.arange(256, device=device).repeat_interleave(256),
        torch.arange(256, device=device).repeat(256),
    )
    pairs = torch.stack((first, second), dim=-1).to(torch.uint8)  # [65536, 2]: every byte pair, in memory order
    word = pairs.view(torch.uint16).view(-1).to(torch.int64)  # [65536]: each pair read as one 16-bit word
    table = torch.empty(65536, 4, dtype=dtype, device=device)
    table[word] = torch.cat((byte[first], byte[second]), dim=-1)
    return table  # [65536, 4]


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, workspace: dict | None = None
) -> torch.Tensor:
    """[..., rows, G, 16] uint8 codes + [..., rows, G] uint8 scales -> [..., rows, G*32] in `dtype`.

    Exact: every E2M1 value times a power of two is representable in bf16 and fp32 (both have an
    8-bit exponent), so the product is formed directly in `dtype`.
    `workspace` (a dict the caller keeps) lets repeated calls reuse their buffers instead of
    allocating fresh memory each time (on the CPU, page-faulting new buffers costs more than the
    decoding); the result then lives in the workspace and is overwritten by the next call.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)} should be scales {tuple(scales.shape)} + (16,)"
        )

    def buffer(name: str, shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
        if workspace is None:
            return torch.empty(shape, dtype=dt, device=blocks.device)
        t = workspace.get(name)
        stale = t is None or t.shape != shape or t.dtype != dt or t.device != blocks.device
        if stale or (t.is_inference() and not torch.is_inference_mode_enabled()):  # made under inference_mode
            t = workspace[name] = torch.empty(shape, dtype=dt, device=blocks.device)
        return t

    exact = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32  # fp16's range is too small
    table = _pair_table(exact, blocks.device)  # [65536, 4]
    words = blocks.contiguous().view(torch.uint16)  # [..., G, 8]: two bytes, four codes each
    codes = buffer("codes", tuple(words.shape), torch.int32).copy_(words)  # gather indices must be int32/64
    values = buffer("values", (*words.shape, 4), exact)  # [..., G, 8, 4]
    torch.index_select(table, 0, codes.view(-1), out=values.view(-1, 4))  # a row gather
    scale = torch.exp2(scales.to(torch.float32) - SCALE_BIAS).to(exact)  # [..., G], a power of two: exact
    out = buffer("out", (*scales.shape, BLOCK), exact)  # [..., G, 32]
    torch.mul(values.view(*scales.shape, BLOCK), scale.unsqueeze(-1), out=out)
    return out.flatten(-2).to(dtype)  # [..., G*32]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, in] float -> (blocks [..., rows, in/32, 16], scales [..., rows, in/32]), both uint8.

    OCP MX rule: shared exponent = floor(log2(amax of the block)) - 2 (2 = largest E2M1 exponent),
    then each element rounds to the nearest E2M1 value (ties to even code, saturating at +-6).
    A block already on the grid of some power-of-two scale comes back with the same values.
    """
    if w.shape[-1] % BLOCK:
        raise ValueError(f"the last dimension ({w.shape[-1]}) must be a multiple of {BLOCK} to quantize to MXFP4")
    x = w.to(torch.float32).unflatten(-1, (-1, BLOCK))  # [..., G, 32]
    amax = x.abs().amax(dim=-1)  # [..., G]
    exponent = torch.floor(torch.log2(amax)) - 2
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -SCALE_BIAS))
    exponent = exponent.clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = x / torch.exp2(exponent).unsqueeze(-1)  # [..., G, 32], magnitudes < 8
    mag = scaled.abs().contiguous()
    mids = torch.tensor(_MIDPOINTS, device=w.device)
    code = torch.bucketize(mag, mids)  # nearest magnitude index; a tie picks the lower one
    tie = (code < len(_MIDPOINTS)) & (mag == mids[code.clamp(max=len(_MIDPOINTS) - 1)])
    code = code + (tie & (code % 2 == 1)).long()  # ...and round ties to the even code instead
    code = code | ((scaled < 0).long() << 3)  # sign bit (a rounded-to-zero negative keeps -0.0)
    code = code.to(torch.uint8).unflatten(-1, (BLOCK // 2, 2))  # [..., G, 16, 2]
    blocks = code[..., 0] | (code[..., 1] << 4)  # low nibble first
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
