"""Rounding to a tensor's dtype as the GPU rounds, under the interpreter too.

On the GPU `x.to(tl.bfloat16)` rounds fp32 to the nearest bf16, ties to even (cvt.rn), as PyTorch does.
Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) truncates instead, so a kernel's bf16 output
there is up to an ulp below PyTorch's. Kernels whose bf16 results the tests compare against the torch
path bit for bit round through `rounded`, which under the interpreter rounds the fp32 bits to the nearest
even bf16 first (then the truncating conversion is exact) and on the GPU is the plain conversion.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def rounded(x, like, INTERPRET: tl.constexpr):
    """fp32 x rounded to the element type of pointer `like` (nearest, ties to even), back in fp32."""
    if INTERPRET and like.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # the nearest bf16, ties to even (normal, finite x)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(like.dtype.element_ty).to(tl.float32)
