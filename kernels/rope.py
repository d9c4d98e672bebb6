"""Rotary position embedding on the triton backend: one launch per tensor each way.

Rotates the pairs (j, j + Dh/2) of every head of every token (gptoss.model.apply_rotary, the reference):

    y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin      (x1, x2: the two halves of a head)

The torch path splits, multiplies four times, subtracts, adds and concatenates: eight launches for the
queries and eight for the keys of every layer, forward, and as many backward. The backward of a
rotation is the rotation by the opposite angle, so the same kernel runs it with sin negated (`sign`).
Each product, difference and sum is rounded to x's dtype as the torch path's tensors round them (the
model casts cos and sin to its dtype once, as the reference does): in bf16 the result is the
reference's, bit for bit, and the same as the fused decode step's rotation (kernels/decode.py).

Kernel: _rope_kernel, grid (tokens,): one token's heads [H, Dh] per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss.kernels.rounding import rounded


@triton.jit(do_not_specialize=["T", "H", "cos_batch", "HALF", "sign"])  # one compilation per dtype and head count
def _rope_kernel(
    x_ptr,  # [N, H, Dh] N = B * T tokens, contiguous
    cos_ptr,  # [T, Dh/2] or [B, T, Dh/2]
    sin_ptr,
    y_ptr,  # [N, H, Dh] x's dtype
    T,
    H,
    cos_batch,  # elements between batches in cos / sin: 0 (one table for every batch) or T * Dh/2
    HALF,  # Dh / 2
    sign,  # 1.0: rotate; -1.0: rotate back (the backward)
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    n = tl.program_id(0)
    b, t = n // T, n % T
    j = tl.arange(0, BLOCK_HALF)
    at = b.to(tl.int64) * cos_batch + t * HALF + j
    cos = tl.load(cos_ptr + at, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + at, mask=j < HALF, other=0.0).to(tl.float32) * sign
    h = tl.arange(0, BLOCK_H)
    first = n.to(tl.int64) * H * 2 * HALF + h[:, None] * 2 * HALF + j[None, :]  # [BLOCK_H, BLOCK_HALF]
    mask = (h < H)[:, None] & (j < HALF)[None, :]
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + first + HALF, mask=mask, other=0.0).to(tl.float32)
    c, s = cos[None, :], sin[None, :]
    y1 = rounded(rounded(x1 * c, y_ptr) - rounded(x2 * s, y_ptr), y_ptr)
    y2 = rounded(rounded(x2 * c, y_ptr) + rounded(x1 * s, y_ptr), y_ptr)
    tl.store(y_ptr + first, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + first + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """x [B, T, ..., Dh] (bf16 or fp32), cos and sin [T, Dh/2] or [B, T, Dh/2] -> x rotated (sign 1) or
    rotated back (sign -1), in x's dtype."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"rotary kernel: x must be bfloat16 or float32, got {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"rotary kernel: x must be [B, T, ..., Dh], got {tuple(x.shape)}")
    B, T, Dh = x.shape[0], x.shape[1], x.shape[-1]
    half = Dh // 2
    tables = (T, half) if cos.dim() == 2 else (B, T, half)
    if Dh % 2 or cos.shape != tables or sin.shape != tables:
        raise ValueError(
            f"rotary kernel: need an even head size and cos, sin [T, Dh/2] or [B, T, Dh/2] = {tables}, "
            f"got x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    H = x[0, 0].numel() // Dh  # heads of a token
    _rope_kernel[(B * T,)](
        x,
        cos.contiguous(),
        sin.contiguous(),
        y,
        T,
        H,
        0 if cos.dim() == 2 else T * half,
        half,
        float(sign),
        BLOCK_H=triton.next_power_of_2(H),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
    return y


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rope(x, cos, sin)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rope(dy, cos, sin, sign=-1), None, None  # the tables are constants of the positions


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """gptoss.model.apply_rotary on the Triton kernel, differentiable in x."""
    return RotaryFunction.apply(x, cos, sin)
