"""The Triton MXFP4 dequantization kernel against gptoss.mxfp4.dequantize (exact: no tolerance)."""

import math

import pytest
import torch

from gptoss import mxfp4
from gptoss.kernels.mxfp4 import mxfp4_dequant_fwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_256_bytes_under_several_scales(dtype):
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(6, 1).view(6, 16, 16)  # [6 rows, 16 groups]
    # Scale byte 2 is the smallest that keeps 0.5 x 2^(s-127) a normal number: Triton's interpreter
    # flushes subnormals to zero when it casts fp32 to bf16 (real checkpoints never come close).
    scales = torch.tensor([2, 100, 126, 127, 128, 150], dtype=torch.uint8).view(6, 1).expand(6, 16).contiguous()
    assert torch.equal(mxfp4_dequant_fwd(blocks, scales, dtype), mxfp4.dequantize(blocks, scales, dtype))


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
    out = mxfp4_dequant_fwd(blocks, scales, dtype)
    assert out.shape == (*shape[:-1], shape[-1] * 32)
    assert torch.equal(out, mxfp4.dequantize(blocks, scales, dtype))


def test_bad_inputs():
    with pytest.raises(TypeError, match="uint8"):
        mxfp4_dequant_fwd(torch.zeros(1, 1, 16), torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="should be scales"):
        mxfp4_dequant_fwd(torch.zeros(1, 2, 16, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.uint8))


def _run_e2m1_program(program, word: int) -> dict[str, int]:
    """Each PTX instruction of the decode, modelled bit for bit on 32-bit registers."""
    # the input operand: $4 after E2M1_PTX's four outputs, $8 after the eight of E2M1_F32_PTX
    regs = {"$4": word, "$8": word}
    for op, dst, src, imm in program:
        x = regs[src]
        if op == "prmt":  # prmt.b32 d, a, 0, selector: byte i of d is byte (selector nibble i) of the pair {0, a}
            pool = x.to_bytes(4, "little") + bytes(4)
            regs[dst] = int.from_bytes(bytes(pool[(imm >> (4 * i)) & 7] for i in range(4)), "little")
        elif op == "and":
            regs[dst] = x & imm
        elif op == "mul":  # mul.lo.u32
            regs[dst] = (x * imm) & 0xFFFFFFFF
        elif op == "bf16x2":  # mul.rn.bf16x2 by a constant: the products are exact here (powers of two)
            halves = torch.tensor([x & 0xFFFF, x >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
            factor = torch.tensor([imm & 0xFFFF, imm >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
            product = (halves.double() * factor.double()).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
            regs[dst] = int(product[0]) | int(product[1]) << 16
        else:
            raise AssertionError(op)
    return regs


def _bf16_pair(word: int) -> list[float]:
    return torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).tolist()


def _wrong_values(program) -> int:
    """How many decoded values of 256 x 86 byte pairs differ from FP4_VALUES (sign of -0 included)."""
    values, wrong = mxfp4.FP4_VALUES, 0
    for b0 in range(256):
        for b1 in range(0, 256, 3):  # every byte value reaches every position of the word
            word = (b0, b1, (7 * b0 + 3) % 256, (13 * b1 + 5) % 256)  # four different bytes
            regs = _run_e2m1_program(program, int.from_bytes(bytes(word), "little"))
            low = _bf16_pair(regs["$0"]) + _bf16_pair(regs["$1"])
            high = _bf16_pair(regs["$2"]) + _bf16_pair(regs["$3"])
            for i, b in enumerate(word):
                for got, code in ((low[i], b & 15), (high[i], b >> 4)):
                    want = values[code]
                    wrong += got != want or math.copysign(1, got) != math.copysign(1, want)
    return wrong


def test_e2m1_ptx_program_decodes_every_byte_pair():
    # The GPU decodes E2M1 with the integer program E2M1_PTX (kernels/mxfp4.py), which the interpreter
    # cannot run. Its steps, modelled exactly, must give every value (and the sign of -0) of every byte pair.
    from gptoss.kernels.mxfp4 import E2M1_PTX

    assert _wrong_values(E2M1_PTX) == 0


@pytest.mark.parametrize(
    "mutation",
    [
        ("mul", 4 + 256, 4 + 128),  # the high nibble's sign lands on the wrong bit
        ("and", 0x81C081C0, 0x81C0C1C0),  # a stray bit kept in the second value
        ("prmt", 0x4342, 0x4341),  # the wrong byte gathered
    ],
)
def test_e2m1_ptx_model_catches_a_mutation(mutation):
    from gptoss.kernels.mxfp4 import E2M1_PTX

    op, old, new = mutation
    mutated = tuple((o, d, s, new if (o, imm) == (op, old) else imm) for o, d, s, imm in E2M1_PTX)
    assert mutated != E2M1_PTX and _wrong_values(mutated) > 0


def _wrong_f32_values(program) -> int:
    """E2M1_F32_PTX: how many of 256 x 86 byte pairs' fp32 outputs differ from FP4_VALUES * 2^-126 (their
    bit patterns, so the sign of -0 and the subnormal 0.5 * 2^-126 count)."""
    import struct

    wrong = 0
    for b0 in range(256):
        for b1 in range(0, 256, 3):
            word = (b0, b1, (7 * b0 + 3) % 256, (13 * b1 + 5) % 256)
            regs = _run_e2m1_program(program, int.from_bytes(bytes(word), "little"))
            for i, b in enumerate(word):
                for out, code in ((f"${i}", b & 15), (f"${i + 4}", b >> 4)):
                    want = struct.unpack("<I", struct.pack("<f", mxfp4.FP4_VALUES[code] * 2.0**-126))[0]
                    wrong += regs[out] != want
    return wrong


def test_e2m1_f32_ptx_program_decodes_every_byte_pair():
    # The fused decode kernels' E2M1 -> fp32 program, modelled exactly: every value of every byte pair,
    # as the bits of fp32 E2M1 * 2^-126
    from gptoss.kernels.mxfp4 import E2M1_F32_PTX

    assert _wrong_f32_values(E2M1_F32_PTX) == 0


@pytest.mark.parametrize(
    "mutation",
    [
        ("mul", (64 + 4096) << 16, (64 + 2048) << 16),  # the sign of byte 0's low nibble on the wrong bit
        ("mul", 4 + 256, 8 + 256),  # byte 1's high-nibble magnitude one bit too high
        ("and", 0x81C00000, 0x83C00000),  # a stray bit kept: the sign copy's neighbour
        ("prmt", 0x4342, 0x4341),  # the wrong byte gathered
    ],
)
def test_e2m1_f32_ptx_model_catches_a_mutation(mutation):
    from gptoss.kernels.mxfp4 import E2M1_F32_PTX

    op, old, new = mutation
    mutated = tuple((o, d, s, new if (o, imm) == (op, old) else imm) for o, d, s, imm in E2M1_F32_PTX)
    assert mutated != E2M1_F32_PTX and _wrong_f32_values(mutated) > 0


@pytest.mark.parametrize("scale", [0, 1, 127, 254, 255])
def test_e8m0_extremes_match_the_reference(scale):
    # s = 0 is 2^-127 (a bf16 subnormal), 255 is inf in the reference's fp32 exp2; fp32 output so the
    # interpreter's bf16 handling of subnormals does not enter
    blocks = torch.full((1, 1, 16), 0x21, dtype=torch.uint8)  # codes 1 (0.5) and 2 (1.0)
    scales = torch.full((1, 1), scale, dtype=torch.uint8)
    assert torch.equal(
        mxfp4_dequant_fwd(blocks, scales, torch.float32), mxfp4.dequantize(blocks, scales, torch.float32)
    )
