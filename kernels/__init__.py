"""Triton kernels for the MXFP4 mixture of experts (installed as `gptoss.kernels`).

One op per file, each with its launcher, autograd Function and a header comment; the pure-torch
reference of every op lives in `gptoss/` and is what the kernel tests compare against.
"""
