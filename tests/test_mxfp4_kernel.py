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


def _run_e2m1_program(program, word: int, regs: dict[str, int] | None = None) -> dict[str, int]:
    """Each PTX instruction of the decode, modelled bit for bit on 32-bit registers."""
    # the input operand: $4, after E2M1_PTX's four outputs (regs: other programs' inputs)
    regs = {"$4": word} if regs is None else dict(regs)
    for op, dst, src, imm in program:
        x = regs[src]
        if op == "bf16x2r":  # mul.rn.bf16x2 by a register
            op, imm = "bf16x2", regs[imm]
        if op == "split":  # mov.b32 {d, imm}, x: the low half to d, the high half to imm
            regs[dst], regs[imm] = x & 0xFFFF, x >> 16
            continue
        if op == "cvt":  # cvt.u32.u16: the 16-bit operand, zero-extended
            regs[dst] = x & 0xFFFF
            continue
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
                wrong += _differs(low[i], values[b & 15]) + _differs(high[i], values[b >> 4])
    return wrong


def _differs(got: float, want: float) -> bool:
    """A decoded value is not the expected one, the sign of -0 included."""
    return got != want or math.copysign(1, got) != math.copysign(1, want)


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


def _bf16_bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.bfloat16).view(torch.int16)) & 0xFFFF


def _wrong_pairs(program) -> int:
    """How many values E2M1_PAIR_PTX-like `program` gets wrong over every byte and several scales (2^-10 to
    2^10: products exact in bf16), against FP4_VALUES x scale (sign of -0 included)."""
    values, wrong = mxfp4.FP4_VALUES, 0
    for exponent in (-10, -1, 0, 3, 10):
        bits, scale = _bf16_bits(2.0**exponent), 2.0**exponent
        for b in range(256):
            regs = _run_e2m1_program(program, 0, {"$2": b, "$3": bits | bits << 16})
            low, high = _bf16_pair(regs["$0"])[0], _bf16_pair(regs["$1"])[0]
            wrong += _differs(low, values[b & 15] * scale) + _differs(high, values[b >> 4] * scale)
    return wrong


def test_e2m1_pair_ptx_program_decodes_every_byte():
    # the swapped MoE tiles decode a byte into one register holding both its values, scaled there
    from gptoss.kernels.mxfp4 import E2M1_PAIR_PTX

    assert _wrong_pairs(E2M1_PAIR_PTX) == 0


@pytest.mark.parametrize(
    "mutation",
    [
        (0, 4097, 4096 + 16),  # the high nibble not moved to the second half
        (2, 64 + 4096, 64 + 2048),  # the sign bit lands one place off
        (4, 0x7E807E80, 0x7E807F00),  # the second value scaled by 2^127, not 2^126
    ],
)
def test_e2m1_pair_ptx_model_catches_a_mutation(mutation):
    from gptoss.kernels.mxfp4 import E2M1_PAIR_PTX

    index, old, new = mutation
    assert E2M1_PAIR_PTX[index][3] == old
    mutated = tuple((*step[:3], new) if i == index else step for i, step in enumerate(E2M1_PAIR_PTX))
    assert _wrong_pairs(mutated) > 0


def _wrong_columns(program) -> int:
    """How many values E2M1_COLUMN_PTX-like `program` gets wrong over 256 x 86 pairs of bytes (two rows
    of one column), against FP4_VALUES (sign of -0 included)."""
    values, wrong = mxfp4.FP4_VALUES, 0
    for b0 in range(256):
        for b1 in range(0, 256, 3):
            regs = _run_e2m1_program(program, 0, {"$2": b0 | b1 << 8})
            (l0, l1), (h0, h1) = _bf16_pair(regs["$0"]), _bf16_pair(regs["$1"])
            wrong += _differs(l0, values[b0 & 15]) + _differs(l1, values[b1 & 15])
            wrong += _differs(h0, values[b0 >> 4]) + _differs(h1, values[b1 >> 4])
    return wrong


def test_e2m1_column_ptx_program_decodes_every_byte_pair():
    # the swapped backward tiles decode a column's bytes at two neighbouring rows into the register pair
    # their operand takes
    from gptoss.kernels.mxfp4 import E2M1_COLUMN_PTX

    assert _wrong_columns(E2M1_COLUMN_PTX) == 0


@pytest.mark.parametrize(
    "mutation",
    [
        (1, 0x4140, 0x4041),  # the two rows' bytes swapped
        (5, 4 + 256, 4 + 128),  # the high nibble's sign on the wrong bit
        (7, 0x81C081C0, 0x81C0C1C0),  # a stray bit kept
    ],
)
def test_e2m1_column_ptx_model_catches_a_mutation(mutation):
    from gptoss.kernels.mxfp4 import E2M1_COLUMN_PTX

    index, old, new = mutation
    assert E2M1_COLUMN_PTX[index][3] == old
    mutated = tuple((*step[:3], new) if i == index else step for i, step in enumerate(E2M1_COLUMN_PTX))
    assert _wrong_columns(mutated) > 0


def _dot_model(program, regs: dict[str, int]) -> dict[str, int]:
    """E2M1_DOT_PTX's instructions, each modelled bit for bit on 32-bit registers."""
    regs = dict(regs)

    def val(x):
        return x if isinstance(x, int) else regs[x]

    for op, dst, a, b, c in program:
        if op == "xor":
            regs[dst] = regs[a] ^ b
        elif op == "shr":  # shr.u32
            regs[dst] = regs[a] >> b
        elif op == "prmt":  # prmt.b32 d, a, b, c: selector nibble i of c (low 16 bits) picks byte i of d
            pool, sel, out = regs[a].to_bytes(4, "little") + regs[b].to_bytes(4, "little"), regs[c], 0
            for i in range(4):
                nibble = (sel >> (4 * i)) & 15
                byte = pool[nibble & 7]
                if nibble & 8:  # the selected byte's sign bit, replicated
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << (8 * i)
            regs[dst] = out
        elif op == "or":
            regs[dst] = regs[a] | regs[b]
        elif op == "dp4a":  # dp4a.u32.s32: unsigned bytes of a . signed bytes of b, plus c, mod 2^32
            ua = regs[a].to_bytes(4, "little")
            sb = regs[b].to_bytes(4, "little")
            total = val(c) + sum(x * (y - 256 if y > 127 else y) for x, y in zip(ua, sb))
            regs[dst] = total & 0xFFFFFFFF
        elif op == "mad":  # mad.lo.s32
            regs[dst] = (regs[a] * b + regs[c]) & 0xFFFFFFFF
        else:
            raise AssertionError(op)
    return regs


def _packed(values) -> int:
    """Four int8 values -> the int32 word holding them, value 0 in the low byte."""
    return int.from_bytes(bytes(v & 0xFF for v in values), "little")


def _wrong_dots(program, trials: int = 400) -> int:
    """How many of `trials` MX blocks (random codes, every code in every position over the trials, random
    int8 parts with the extremes +-127 often, a random start value) give another sum than start +
    sum((12 + 2 E2M1(code)) (255 h + l))."""
    from gptoss.kernels.mxfp4 import U_TABLES

    g = torch.Generator().manual_seed(0)
    wrong = 0
    for t in range(trials):
        codes = torch.randint(0, 16, (32,), generator=g)
        codes[t % 32] = t % 16
        h = torch.randint(-127, 128, (32,), generator=g)
        low = torch.randint(-127, 128, (32,), generator=g)
        if t % 5 == 0:  # the extremes
            h[: t % 32] = 127 if t % 2 else -127
            low[t % 32 :] = -127 if t % 2 else 127
        regs = {}
        for j in range(4):  # word j: codes 8j..8j+7, low nibble first; its parts: h, l of 8j..8j+3, 8j+4..8j+7
            c = codes[8 * j : 8 * j + 8].tolist()
            regs[f"${1 + j}"] = int.from_bytes(bytes(c[2 * i] | c[2 * i + 1] << 4 for i in range(4)), "little")
            regs[f"${5 + j}"] = _packed(h[8 * j : 8 * j + 4].tolist())
            regs[f"${9 + j}"] = _packed(h[8 * j + 4 : 8 * j + 8].tolist())
            regs[f"${13 + j}"] = _packed(low[8 * j : 8 * j + 4].tolist())
            regs[f"${17 + j}"] = _packed(low[8 * j + 4 : 8 * j + 8].tolist())
        for k, word in enumerate(U_TABLES):
            regs[f"${21 + k}"] = word
        start = int(torch.randint(-(2**24), 2**24, (), generator=g))
        regs["$25"] = start & 0xFFFFFFFF
        got = _dot_model(program, regs)["$0"]
        got = got - (1 << 32) if got >= 1 << 31 else got
        want = start + sum((12 + 2 * mxfp4.FP4_VALUES[c]) * (255 * a + b) for c, a, b in zip(codes.tolist(), h, low))
        wrong += got != want
    return wrong


def test_e2m1_dot_ptx_program_sums_every_code_exactly():
    # The fused decode kernels' dot product on the GPU is the integer program E2M1_DOT_PTX
    # (kernels/mxfp4.py), which the interpreter cannot run: modelled exactly, every block's sum is exact
    from gptoss.kernels.mxfp4 import E2M1_DOT_PTX

    assert _wrong_dots(E2M1_DOT_PTX) == 0


@pytest.mark.parametrize(
    "mutation",
    [
        (("xor", 0x88888888), 0x88888880),  # one code's sign left unflipped: both tables give 0 there
        (("shr", 16), 12),  # codes 4-7 read from the wrong nibbles
        (("mad", 255), 256),  # the parts recombined with the wrong base
    ],
)
def test_e2m1_dot_ptx_model_catches_a_mutation(mutation):
    from gptoss.kernels.mxfp4 import E2M1_DOT_PTX

    (op, old), new = mutation
    mutated = tuple((o, d, a, new if (o, b) == (op, old) else b, c) for o, d, a, b, c in E2M1_DOT_PTX)
    assert mutated != E2M1_DOT_PTX and _wrong_dots(mutated, trials=40) > 0


def test_e2m1_dot_tables_hold_twelve_plus_twice_each_value():
    from gptoss.kernels.mxfp4 import U_NEG, U_POS

    pos = (U_POS[0] | U_POS[1] << 32).to_bytes(8, "little")
    neg = (U_NEG[0] | U_NEG[1] << 32).to_bytes(8, "little")
    assert [b - 12 for b in pos] == [2 * v for v in mxfp4.FP4_VALUES[:8]]
    assert [b - 12 for b in neg] == [2 * v for v in mxfp4.FP4_VALUES[8:]]
    assert max(pos + neg) < 128  # prmt's sign replication gives 0 for every table byte


@pytest.mark.parametrize("scale", [0, 1, 127, 254, 255])
def test_e8m0_extremes_match_the_reference(scale):
    # s = 0 is 2^-127 (a bf16 subnormal), 255 is inf in the reference's fp32 exp2; fp32 output so the
    # interpreter's bf16 handling of subnormals does not enter
    blocks = torch.full((1, 1, 16), 0x21, dtype=torch.uint8)  # codes 1 (0.5) and 2 (1.0)
    scales = torch.full((1, 1), scale, dtype=torch.uint8)
    assert torch.equal(
        mxfp4_dequant_fwd(blocks, scales, torch.float32), mxfp4.dequantize(blocks, scales, torch.float32)
    )
