"""RMSNorm on the triton backend, forward and backward: one launch each instead of eight and about a dozen.

    y = x * r * g,   r = rsqrt(mean_d(x^2) + eps)   (fp32 arithmetic; y in x's dtype; g fp32)

The torch path (gptoss.model.RMSNorm, the reference the tests compare against) upcasts x, squares,
averages, takes the root, multiplies twice and casts back: eight kernels over [T, D] forward and more
backward, each a full pass over the residual stream. Here one program normalises BLOCK_T rows held in
registers and saves r [T] fp32 for the backward:

    dx = r * (dy g - x_hat * mean_d(dy g x_hat)),   x_hat = x r

The gain's gradient, sum_t dy x_hat, is left to torch from the saved r: LoRA freezes the gains, so a
training step never asks for it.

Kernels: _rmsnorm_fwd_kernel and _rmsnorm_bwd_kernel, grid (cdiv(T, BLOCK_T),), the whole row (D padded
to a power of two) in one block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss.kernels.rounding import rounded


@triton.jit
def _row_block(T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows t [BLOCK_T] and columns d [BLOCK_D], their offsets in a [T, D] tensor and mask."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    return t, d, t.to(tl.int64)[:, None] * D + d[None, :], (t[:, None] < T) & (d[None, :] < D)


@triton.jit(do_not_specialize=["T", "eps"])  # one compilation per dtype and width, one token or many
def _rmsnorm_fwd_kernel(
    x_ptr,  # [T, D] bf16 or fp32
    g_ptr,  # [D] fp32
    y_ptr,  # [T, D] x's dtype
    r_ptr,  # [T] fp32: 1 / rms of each row, for the backward
    T,
    D,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t, d, at, mask = _row_block(T, D, BLOCK_T, BLOCK_D)
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [BLOCK_T]
    g = tl.load(g_ptr + d, mask=d < D, other=0.0)
    y = rounded(x * r[:, None] * g[None, :], y_ptr)
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(r_ptr + t, r, mask=t < T)


@triton.jit(do_not_specialize=["T"])
def _rmsnorm_bwd_kernel(
    dy_ptr,  # [T, D] the output's gradient
    x_ptr,  # [T, D] the forward's input
    g_ptr,  # [D] fp32
    r_ptr,  # [T] fp32 from the forward
    dx_ptr,  # [T, D] x's dtype
    T,
    D,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t, d, at, mask = _row_block(T, D, BLOCK_T, BLOCK_D)
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + d, mask=d < D, other=0.0)
    r = tl.load(r_ptr + t, mask=t < T, other=0.0)
    x_hat = x * r[:, None]
    dyg = dy * g[None, :]
    c = tl.sum(dyg * x_hat, axis=1) / D  # [BLOCK_T]
    dx = rounded((dyg - x_hat * c[:, None]) * r[:, None], dx_ptr)
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): a whole row in one block, about 16 fp32 values a thread."""
    BLOCK_D = triton.next_power_of_2(D)
    num_warps = max(1, min(8, BLOCK_D // 512))
    BLOCK_T = max(1, min(4, 2048 // BLOCK_D))  # short rows: several to a program
    return BLOCK_T, BLOCK_D, num_warps


def _check(x: torch.Tensor, gain: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"RMSNorm kernel: x must be bfloat16 or float32, got {x.dtype}")
    if gain.dtype != torch.float32 or gain.dim() != 1 or gain.shape[0] != x.shape[-1]:
        raise ValueError(f"RMSNorm kernel: gain must be fp32 [{x.shape[-1]}], got {gain.dtype} {tuple(gain.shape)}")


def rmsnorm_fwd(x: torch.Tensor, gain: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] contiguous, gain [D] fp32 -> (y [T, D] in x's dtype, r [T] fp32)."""
    _check(x, gain)
    T, D = x.shape
    y = torch.empty_like(x)
    r = torch.empty(T, dtype=torch.float32, device=x.device)
    if T == 0:
        return y, r
    BLOCK_T, BLOCK_D, num_warps = _blocks(D)
    _rmsnorm_fwd_kernel[(triton.cdiv(T, BLOCK_T),)](
        x, gain, y, r, T, D, eps, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=num_warps
    )
    return y, r


def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, gain: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """dy, x [T, D] contiguous, gain [D] fp32, r [T] fp32 (rmsnorm_fwd's) -> dx [T, D] in x's dtype."""
    T, D = x.shape
    dx = torch.empty_like(x)
    if T == 0:
        return dx
    BLOCK_T, BLOCK_D, num_warps = _blocks(D)
    _rmsnorm_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
        dy, x, gain, r, dx, T, D, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=num_warps
    )
    return dx


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, r = rmsnorm_fwd(rows, gain, eps)
        ctx.save_for_backward(rows, gain, r)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, gain, r = ctx.saved_tensors
        dy_rows = dy.reshape(-1, rows.shape[-1]).contiguous()
        dx = rmsnorm_bwd(dy_rows, rows, gain, r).view(dy.shape) if ctx.needs_input_grad[0] else None
        dg = None
        if ctx.needs_input_grad[1]:  # a trained gain (LoRA freezes them): by torch, from the saved r
            dg = (dy_rows.float() * rows.float() * r[:, None]).sum(0)
        return dx, dg, None


def rmsnorm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """gptoss.model.RMSNorm's forward on the Triton kernels: x [..., D] (bf16 or fp32), gain [D] fp32 ->
    [..., D] in x's dtype; differentiable in x (and in gain, through torch)."""
    return RMSNormFunction.apply(x, gain, eps)
