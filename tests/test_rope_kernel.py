"""The Triton rotary embedding (gptoss.kernels.rope) against gptoss.model.apply_rotary, forward and backward."""

import pytest
import torch
import triton
import triton.language as tl

from gptoss.kernels.rope import rope, rotary
from gptoss.kernels.rounding import rounded
from gptoss.model import apply_rotary


def _tables(B: int, T: int, half: int, per_batch: bool, dtype):
    positions = torch.randint(0, 500, (B, T) if per_batch else (T,))
    angle = positions.float().unsqueeze(-1) * torch.logspace(0, -3, half)
    return (angle.cos() * 1.3).to(dtype), (angle.sin() * 1.3).to(dtype)  # a concentration, as YaRN's


@pytest.mark.parametrize(
    "shape",
    [
        (2, 5, 2, 4, 16),  # queries [B, T, K, G, Dh]
        (2, 5, 3, 16),  # keys [B, T, K, Dh], a head count that is not a power of two
        (1, 3, 8, 8, 64),  # the gpt-oss head, 64 query heads
        (1, 4, 2, 12),  # Dh / 2 = 6: not a power of two
    ],
)
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_and_its_gradient_match_the_torch_path(shape, per_batch, dtype):
    torch.manual_seed(0)
    cos, sin = _tables(shape[0], shape[1], shape[-1] // 2, per_batch, dtype)
    x = torch.randn(shape).to(dtype)
    dy = torch.randn(shape).to(dtype)
    outs, grads = [], []
    for fn in (apply_rotary, rotary):
        xi = x.clone().requires_grad_(True)
        y = fn(xi, cos, sin)
        y.backward(dy)
        outs.append(y)
        grads.append(xi.grad)
    assert outs[1].dtype == dtype and outs[1].shape == x.shape
    if dtype == torch.bfloat16:  # each operation rounded as the torch path's bf16 tensors round it
        assert torch.equal(outs[1], outs[0])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(outs[1].float(), outs[0].float(), **tol)
    torch.testing.assert_close(grads[1].float(), grads[0].float(), **tol)


def test_rotating_back_undoes_the_rotation():
    torch.manual_seed(1)
    cos, sin = _tables(1, 6, 8, False, torch.float32)
    norm = torch.sqrt(cos**2 + sin**2)  # a rotation times 1.3: divide it out
    cos, sin = cos / norm, sin / norm
    x = torch.randn(1, 6, 3, 16)
    torch.testing.assert_close(rope(rope(x, cos, sin), cos, sin, sign=-1), x, atol=1e-5, rtol=1e-5)


def test_no_tokens():
    cos, sin = _tables(2, 0, 8, False, torch.float32)
    assert rope(torch.zeros(2, 0, 3, 16), cos, sin).shape == (2, 0, 3, 16)


@pytest.mark.parametrize(
    "x, tables, error, match",
    [
        (torch.zeros(1, 2, 3, 8, dtype=torch.float16), (2, 4), TypeError, "bfloat16 or float32, got torch.float16"),
        (torch.zeros(1, 2, 3, 7), (2, 3), ValueError, "even head size"),
        (torch.zeros(1, 2, 3, 8), (3, 4), ValueError, r"cos, sin \[T, Dh/2\] or \[B, T, Dh/2\] = \(2, 4\)"),
        (torch.zeros(1, 2, 3, 8), (2, 8), ValueError, r"= \(2, 4\)"),
        (torch.zeros(2, 8), (2, 4), ValueError, r"x must be \[B, T, \.\.\., Dh\]"),
    ],
)
def test_bad_inputs_are_explained(x, tables, error, match):
    cos = torch.zeros(tables)
    with pytest.raises(error, match=match):
        rope(x, cos, cos)


@triton.jit
def _probe_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < N, other=0.0)
    tl.store(y_ptr + i, rounded(x, y_ptr).to(y_ptr.dtype.element_ty), mask=i < N)


def test_rounding_to_bf16_is_torchs_under_the_interpreter_too():
    # the interpreter's own fp32 -> bf16 conversion truncates; kernels/rounding.py rounds to nearest even
    ties = [
        1 + 2**-8,
        1 + 3 * 2**-8,
        -(1 + 2**-8),
        1 + 2**-8 + 2**-10,
        0.0,
        -0.0,
    ]  # (the interpreter flushes subnormals)
    x = torch.cat((torch.tensor(ties), torch.randn(4000) * torch.logspace(-20, 20, 4000)))
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _probe_kernel[(1,)](x, y, x.numel(), BLOCK=4096)
    assert torch.equal(y, x.to(torch.bfloat16))
