"""Rounding to a tensor's dtype as the GPU rounds, under the interpreter too.

On the GPU `x.to(tl.bfloat16)` rounds fp32 to the nearest bf16, ties to even (cvt.rn), as PyTorch does.
Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) truncates instead, so a kernel's bf16 output
there is up to an ulp below PyTorch's. Kernels that round where the torch path rounds (the fused decode
step, RMSNorm, RoPE) do it through `rounded`: under the interpreter it first rounds the fp32 bits to the
nearest even bf16 (the truncating conversion is then exact); on the GPU it is the plain conversion.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gptoss.kernels.mxfp4 import INTERPRET

_INTERPRET = tl.constexpr(INTERPRET)  # for @triton.jit code


@triton.jit
def rounded(x, like):
    """fp32 x rounded to the element type of pointer `like` (nearest, ties to even), back in fp32."""
    if _INTERPRET and like.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # the nearest bf16, ties to even (normal, finite x)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(like.dtype.element_ty).to(tl.float32)
