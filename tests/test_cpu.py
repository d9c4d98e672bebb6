"""The CPU fast path (gptoss.cpu): prepacked weights give the same outputs and refuse what they cannot do."""

from pathlib import Path

import pytest
import torch
from conftest import small_config
from torch import nn

from gptoss import generate, load_model
from gptoss.cpu import PackedExperts, PackedLinear, available, prepack
from gptoss.synthetic import write_checkpoint

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch build has no oneDNN")
bf16_packs = pytest.mark.skipif(
    not available(torch.bfloat16),
    reason="oneDNN's bf16 product needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, not on this CPU",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cpu"), small_config(), "hf-mxfp4", seed=3)


@bf16_packs
@pytest.mark.parametrize("dequantize", [False, True])
def test_prepacked_bf16_model_gives_bitwise_the_same_logits_and_tokens(checkpoint, dequantize):
    plain = load_model(checkpoint, dequantize=dequantize)
    packed = load_model(checkpoint, dequantize=dequantize, prepack=True)
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(
        packed.model.layers[0].self_attn.q_proj, PackedLinear
    )
    assert isinstance(packed.model.layers[0].mlp.experts, PackedExperts) == dequantize  # MXFP4 experts stay
    ids = torch.randint(0, 300, (3, 13))
    assert torch.equal(plain(ids), packed(ids))  # prefill-sized products
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    kwargs = dict(max_new_tokens=6, temperature=0.0, stop_tokens=())
    assert generate(plain, prompts, **kwargs) == generate(packed, prompts, **kwargs)  # one-row decode products
    one = torch.tensor([[42]])
    assert torch.equal(plain(one), packed(one))


def test_prepacked_fp32_model_matches(checkpoint):
    plain = load_model(checkpoint, dtype=torch.float32, dequantize=True)
    packed = load_model(checkpoint, dtype=torch.float32, dequantize=True, prepack=True)
    ids = torch.randint(0, 300, (2, 9))
    # fp32 F.linear goes through MKL, the packed weight through oneDNN: another summation order
    torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)


@bf16_packs
def test_prepacked_model_is_inference_only(checkpoint):
    model = load_model(checkpoint, prepack=True)
    x = torch.randn(2, 96, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        model.lm_head(x)
    with pytest.raises(RuntimeError, match="not a checkpoint"):
        model.state_dict()
    with pytest.raises(ValueError, match="need MXFP4 experts"):
        load_model(checkpoint, dequantize=True, prepack=True).set_backend("triton")
    with pytest.raises(ValueError, match="bf16 and fp32 models, this one is torch.float16"):
        prepack(load_model(checkpoint, dtype=torch.float16))


@bf16_packs
def test_lora_wrapped_modules_are_left_alone(checkpoint):
    from gptoss.adapter import apply_lora

    model = load_model(checkpoint, dequantize=True)
    apply_lora(model, r=4, alpha=8, expert_layers=[1])
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # non-zero B: the adapters change the output
    model.requires_grad_(False)
    ids = torch.randint(0, 300, (1, 7))
    expected = model(ids)
    prepack(model)
    attn = model.model.layers[0].self_attn
    assert not isinstance(attn.q_proj, PackedLinear) and type(attn.q_proj) is not nn.Linear  # the LoRA wrapper
    assert isinstance(model.model.layers[0].mlp.experts, PackedExperts)  # no expert adapter on layer 0
    assert not isinstance(model.model.layers[1].mlp.experts, PackedExperts)  # layer 1 has one
    assert torch.equal(model(ids), expected)


@bf16_packs
def test_prepack_auto_packs_only_models_with_dense_experts(checkpoint):
    assert isinstance(load_model(checkpoint, dequantize=True, prepack="auto").lm_head, PackedLinear)
    # MXFP4 experts (memory is short): nothing copied; experts on the native kernels, the other bf16
    # weights read in place by the native few-row product (where this CPU has one), else left as they are
    from gptoss import native
    from gptoss.cpu import DirectLinear, MXFP4Experts

    model = load_model(checkpoint, prepack="auto")
    assert type(model.lm_head) is (DirectLinear if native.bf16_dot() else nn.Linear)
    assert isinstance(model.model.layers[0].mlp.experts, MXFP4Experts)  # native kernels or torch decoding
    with pytest.raises(ValueError, match="prepack must be True, False or 'auto'"):
        load_model(checkpoint, prepack="yes")


def test_a_cpu_without_the_bf16_product_keeps_those_weights_as_they_are(checkpoint, monkeypatch):
    # AVX2-only CPUs: oneDNN packs fp32 but refuses bf16 ("needs avx_ne_convert or avx512bw, avx512vl and avx512dq")
    import gptoss.cpu as cpu

    monkeypatch.setattr(cpu, "available", lambda dtype=torch.float32: dtype == torch.float32)
    plain = load_model(checkpoint, dequantize=True)
    auto = load_model(checkpoint, dequantize=True, prepack="auto")  # dense experts, but nothing bf16 packed
    assert type(auto.lm_head) is not PackedLinear and not isinstance(auto.model.layers[0].mlp.experts, PackedExperts)
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(auto(ids), plain(ids))
    with pytest.raises(RuntimeError, match="prepacked torch.bfloat16 product needs AVX-512"):
        load_model(checkpoint, dequantize=True, prepack=True)
    packed = load_model(checkpoint, dtype=torch.float32, dequantize=True, prepack="auto")  # fp32 still packs
    assert isinstance(packed.lm_head, PackedLinear)


def test_available_tells_what_this_cpu_packs():
    assert available(torch.float32)
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    if "avx2" in flags and {"avx512bw", "avx512vl", "avx512dq"} - flags and "avx_ne_convert" not in flags:
        assert not available(torch.bfloat16)  # the probe says so up front, instead of a crash at the first product


def test_prepacked_fp32_model_decodes_as_the_reference_past_the_window(checkpoint):
    """Decoding steps on the native attention kernel, reading the cache's own int32 positions, with
    prompts shorter and longer than the sliding window: the tokens of the reference, and every step's
    logits within the fp32 summation-order tolerance."""
    from gptoss.cpu import DecodeAttention

    plain = load_model(checkpoint, dtype=torch.float32)
    packed = load_model(checkpoint, dtype=torch.float32, prepack="auto")
    assert isinstance(packed.model.layers[0].self_attn, DecodeAttention)
    window = plain.config.sliding_window
    prompts = [list(range(5, 8)), list(range(40, 40 + 2 * window + 3))]
    steps: dict[str, list] = {"plain": [], "packed": []}
    for name, model in (("plain", plain), ("packed", packed)):
        lm_head = model.lm_head.forward
        model.lm_head.forward = lambda x, f=lm_head, n=name: steps[n].append(f(x)) or steps[n][-1]
        tokens = generate(model, prompts, max_new_tokens=8, temperature=0.0, stop_tokens=())
        steps[name].append(tokens)
    assert steps["plain"][-1] == steps["packed"][-1]
    assert len(steps["plain"]) == len(steps["packed"]) == 9
    for a, b in zip(steps["plain"][:-1], steps["packed"][:-1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
