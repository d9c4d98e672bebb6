import pytest
import torch

from gptoss import mxfp4


def e2m1_decode(code: int) -> float:
    """Decode a 4-bit E2M1 code from its bit fields (independent of the lookup table under test)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    if exponent == 0:  # subnormal
        return sign * 0.5 * mantissa
    return sign * 2.0 ** (exponent - 1) * (1 + 0.5 * mantissa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_byte", [1, 100, 126, 127, 128, 150])
def test_all_256_byte_codes(dtype, scale_byte):
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)  # 16 blocks of 16 bytes: every byte once
    scales = torch.full((16,), scale_byte, dtype=torch.uint8)
    out = mxfp4.dequantize(codes, scales, dtype)  # [16 * 32]
    expected = []
    for byte in range(256):  # low nibble is the earlier element
        expected += [e2m1_decode(byte & 0xF), e2m1_decode(byte >> 4)]
    expected = torch.tensor(expected, dtype=torch.float64) * 2.0 ** (scale_byte - 127)
    assert out.dtype == dtype
    assert torch.equal(out.double(), expected)  # exact: no rounding anywhere


def test_every_byte_pair_in_every_position():
    # the decoder reads two bytes at a time: all 65,536 pairs, each at every even offset of a block
    first, second = torch.arange(256).repeat_interleave(256), torch.arange(256).repeat(256)
    pairs = torch.stack((first, second), dim=-1).to(torch.uint8)  # [65536, 2]
    blocks = torch.cat([pairs.roll(shift, 0) for shift in range(8)], dim=-1).view(65536, 1, 16)
    scales = torch.randint(100, 150, (65536, 1), dtype=torch.uint8)
    nibble = torch.tensor([e2m1_decode(c) for c in range(16)], dtype=torch.float64)
    b = blocks.long()
    expected = torch.stack((nibble[b & 0xF], nibble[b >> 4]), dim=-1).view(65536, 32)  # low nibble first
    expected *= 2.0 ** (scales.double() - 127)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32).double(), expected)


def test_worked_example_from_the_spec():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x2A
    for scale, pair in [(128, [-2.0, 2.0]), (127, [-1.0, 1.0])]:
        out = mxfp4.dequantize(blocks, torch.tensor([scale], dtype=torch.uint8), torch.float32)
        assert out[:2].tolist() == pair


def test_grid_values_survive_a_round_trip():
    # values on the grid of a random power-of-two scale per block, with random largest magnitude
    grid = torch.tensor(mxfp4.FP4_VALUES)
    values = grid[torch.randint(0, 16, (5, 7, 3, 32))]
    values *= torch.exp2(torch.randint(-20, 20, (5, 7, 3, 1)).float())
    w = values.flatten(-2)  # [5, 7, 96]
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (5, 7, 3, 16) and scales.shape == (5, 7, 3)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32), w)


def test_quantize_uses_the_ocp_shared_exponent_and_nearest_value():
    w = torch.zeros(1, 32)
    w[0, :6] = torch.tensor([5.0, 0.3, 1.3, -2.6, 0.75, 1.25])  # amax 5 -> exponent floor(log2 5) - 2 = 0
    blocks, scales = mxfp4.quantize(w)
    assert scales.item() == 127
    out = mxfp4.dequantize(blocks, scales, torch.float32)[0, :6]
    # 5.0 is a tie between 4 and 6 -> even code (4.0); 0.3 -> 0.5; 1.3 -> 1.5; -2.6 -> -3; ties 0.75 -> 1, 1.25 -> 1
    assert out.tolist() == [4.0, 0.5, 1.5, -3.0, 1.0, 1.0]
    big = torch.full((1, 32), 7.9)  # amax 7.9 -> exponent 0 -> saturates at 6
    assert mxfp4.dequantize(*mxfp4.quantize(big), torch.float32).unique().tolist() == [6.0]


def test_quantization_error_is_bounded():
    w = torch.randn(64, 256)
    approx = mxfp4.dequantize(*mxfp4.quantize(w), torch.float32)
    block_max = w.view(64, 8, 32).abs().amax(-1, keepdim=True)
    # In units of the block scale, amax lies in [4, 8). Rounding loses at most half the widest gap
    # (4 -> 6), 1 unit <= amax/4; saturating x in (6, amax] at 6 loses amax - 6 <= amax/4 as amax < 8.
    assert ((approx - w).view(64, 8, 32).abs() <= block_max / 4 + 1e-7).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(2, 33))
    with pytest.raises(TypeError, match="uint8"):
        mxfp4.dequantize(torch.zeros(1, 16), torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
