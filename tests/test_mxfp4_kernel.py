"""The Triton MXFP4 dequantization kernel against gptoss.mxfp4.dequantize (exact: no tolerance)."""

import pytest
import torch
from gptoss.kernels.mxfp4 import mxfp4_dequant

from gptoss import mxfp4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_256_bytes_under_several_scales(dtype):
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(6, 1).view(6, 16, 16)  # [6 rows, 16 groups]
    # Scale byte 2 is the smallest that keeps 0.5 x 2^(s-127) a normal number: Triton's interpreter
    # flushes subnormals to zero when it casts fp32 to bf16 (real checkpoints never come close).
    scales = torch.tensor([2, 100, 126, 127, 128, 150], dtype=torch.uint8).view(6, 1).expand(6, 16).contiguous()
    assert torch.equal(mxfp4_dequant(blocks, scales, dtype), mxfp4.dequantize(blocks, scales, dtype))


@pytest.mark.parametrize(
    "shape",
    [
        (3, 5, 7),  # [E, R, G]: rows (15) not a multiple of BLOCK_R (16); C = 224 not a multiple of BLOCK_C (256)
        (1, 1, 1),  # one block of 32 values
        (2, 33, 90),  # the 2880-wide rows of gpt-oss (90 groups), odd row count
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awkward_shapes(shape, dtype):
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8)
    scales = torch.randint(110, 140, shape, dtype=torch.uint8)
    out = mxfp4_dequant(blocks, scales, dtype)
    assert out.shape == (*shape[:-1], shape[-1] * 32)
    assert torch.equal(out, mxfp4.dequantize(blocks, scales, dtype))


def test_bad_inputs():
    with pytest.raises(TypeError, match="uint8"):
        mxfp4_dequant(torch.zeros(1, 1, 16), torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="should be scales"):
        mxfp4_dequant(torch.zeros(1, 2, 16, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.uint8))
