"""The Triton RMSNorm (gptoss.kernels.rmsnorm) against gptoss.model.RMSNorm's torch path, forward and
backward, and what it refuses."""

import pytest
import torch

from gptoss.kernels.rmsnorm import rmsnorm, rmsnorm_fwd
from gptoss.model import RMSNorm


def _norm(D: int, backend: str) -> RMSNorm:
    norm = RMSNorm(D, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, D))  # a gain that is not all ones
    norm.backend = backend
    return norm


@pytest.mark.parametrize(
    "shape",
    [
        (1, 7, 64),  # rows not a multiple of the rows per program
        (2, 5, 96),  # D not a power of two (gpt-oss: 2880)
        (3, 1, 2880),  # the gpt-oss width, one token
        (0, 4, 64),  # nothing
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_match_the_torch_path(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 0.5).to(dtype)
    dy = torch.randn(shape).to(dtype)
    outs, grads = [], []
    for backend in ("torch", "triton"):
        xi = x.clone().requires_grad_(True)
        y = _norm(shape[-1], backend)(xi)
        y.backward(dy)
        outs.append(y)
        grads.append(xi.grad)
    assert outs[1].dtype == dtype and outs[1].shape == x.shape and grads[1].dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(outs[1].float(), outs[0].float(), **tol)
    torch.testing.assert_close(grads[1].float(), grads[0].float(), **tol)


def test_the_gain_gradient_when_the_gain_trains():
    torch.manual_seed(1)
    x, dy = torch.randn(6, 96), torch.randn(6, 96)
    gains = []
    for backend in ("torch", "triton"):
        norm = _norm(96, backend)
        norm(x).backward(dy)
        gains.append(norm.weight.grad)
    torch.testing.assert_close(gains[1], gains[0], atol=1e-5, rtol=1e-5)


def test_a_frozen_gain_gets_no_gradient_and_the_model_uses_the_kernel(monkeypatch):
    from gptoss.kernels import rmsnorm as module

    calls = []
    real = module.rmsnorm_bwd
    monkeypatch.setattr(module, "rmsnorm_bwd", lambda *a: calls.append("bwd") or real(*a))
    norm = _norm(64, "triton").requires_grad_(False)
    x = torch.randn(3, 64, requires_grad=True)
    norm(x).sum().backward()
    assert calls == ["bwd"] and norm.weight.grad is None and x.grad is not None


@pytest.mark.parametrize(
    "x, gain, error, match",
    [
        (torch.zeros(2, 8, dtype=torch.float16), torch.ones(8), TypeError, "bfloat16 or float32, got torch.float16"),
        (torch.zeros(2, 8), torch.ones(8, dtype=torch.bfloat16), ValueError, "gain must be fp32"),
        (torch.zeros(2, 8), torch.ones(7), ValueError, r"gain must be fp32 \[8\]"),
        (torch.zeros(2, 8), torch.ones(2, 8), ValueError, r"gain must be fp32 \[8\]"),
    ],
)
def test_bad_inputs_are_explained(x, gain, error, match):
    with pytest.raises(error, match=match):
        rmsnorm_fwd(x, gain, 1e-5)


def test_the_triton_backend_switches_every_norm():
    from conftest import small_config

    from gptoss.model import GptOss

    model = GptOss(small_config()).set_backend("triton")
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1 and all(n.backend == "triton" for n in norms)
    model.set_backend("torch")
    assert all(n.backend == "torch" for n in norms)
    x = torch.randn(2, 3, model.config.hidden_size)
    assert rmsnorm(x, norms[0].weight, norms[0].eps).shape == x.shape
