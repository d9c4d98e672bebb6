"""Checks that only mean something on a CUDA GPU (compiled kernels, bf16 tensor-core dots, the real
2880-wide shapes); they skip on the CPU, where the interpreter tests cover the same logic."""

import copy

import pytest
import torch

from gptoss import mxfp4
from gptoss.config import ModelConfig
from gptoss.model import Experts, experts_forward, route

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton compiles kernels there)"),
]


def _experts(config):
    experts = Experts(config, quantized=True).cuda()
    with torch.no_grad():
        for name, b in experts.named_buffers():
            b.copy_(torch.randint(0, 256, b.shape) if name.endswith("blocks") else torch.randint(119, 123, b.shape))
        experts.gate_up_proj_bias.normal_(0, 0.1)
        experts.down_proj_bias.normal_(0, 0.1)
    return experts.to(torch.bfloat16)


def test_dequant_kernel_exact_at_20b_shape():
    from gptoss.kernels.mxfp4 import mxfp4_dequant

    blocks = torch.randint(0, 256, (4, 5760, 90, 16), dtype=torch.uint8, device="cuda")
    scales = torch.randint(100, 140, (4, 5760, 90), dtype=torch.uint8, device="cuda")
    assert torch.equal(mxfp4_dequant(blocks, scales), mxfp4.dequantize(blocks, scales))


@pytest.mark.parametrize("tokens", [1, 64, 1024])  # decode, small prefill, large prefill (tiles of every size)
def test_moe_kernel_bf16_at_20b_shape(tokens):
    from gptoss.kernels.moe import moe

    config = ModelConfig()  # gpt-oss-20b: D = I = 2880, 32 experts, top-4
    experts = _experts(config)
    x = torch.randn(tokens, 2880, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(tokens, 32, device="cuda")
    weights, ids = route(logits, 4)
    reference = experts_forward(x.detach().float(), weights, ids, copy.deepcopy(experts).float(), 1.702, 7.0)
    out = moe(x, logits, 4, experts)
    # bf16 tensor-core dots with fp32 accumulation over 2880 terms: within 2% of the largest output
    assert (out.float() - reference).abs().max() <= 2e-2 * reference.abs().max()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
