"""Whole-model parity with Hugging Face transformers' GptOssForCausalLM (an oracle nobody here wrote).

The same random weights (bf16-exact, experts on the MXFP4 grid) are written in each of the three
on-disk layouts; our logits must match transformers' in fp32 within 1e-4.
"""

import copy

import pytest
import torch
from conftest import small_config
from hf_oracle import build_hf_model, canonical_tensors

from gptoss import load_model
from gptoss.synthetic import write_checkpoint

pytest.importorskip("transformers")

LAYOUTS = ["original", "hf-mxfp4", "hf-bf16"]
CONFIGS = {
    # prime number of experts, GQA groups of 3, window 5 shorter than the 23-token sequence
    "gqa-prime-experts": small_config(),
    # one KV head for all query heads, top-1 routing, two layers
    "mqa-top1": small_config(num_key_value_heads=1, num_experts_per_tok=1, num_hidden_layers=2),
    # as many KV heads as query heads, top-k = E, the full 128-token window with a longer sequence
    "mha-topk-all": small_config(num_key_value_heads=6, num_local_experts=5, num_experts_per_tok=5, sliding_window=128),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def oracle(request, tmp_path_factory):
    config = CONFIGS[request.param]
    hf = build_hf_model(config, seed=len(request.param))
    T = 150 if config.sliding_window == 128 else 23
    ids = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    folder = tmp_path_factory.mktemp(request.param)
    tensors = canonical_tensors(hf)
    for layout in LAYOUTS:  # small shards so the sharded readers are exercised too
        write_checkpoint(folder / layout, config, layout, tensors=tensors, max_shard_bytes=200_000)
    return config, hf, ids, expected, folder


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_logits_match_transformers(oracle, layout):
    config, _, ids, expected, folder = oracle
    model = load_model(folder / layout, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.float32
    err = (logits - expected).abs().max().item()
    assert err < 1e-4, f"max |ours - transformers| = {err:.2e}"


def test_bf16_is_as_accurate_as_transformers_bf16(oracle):
    # bf16 keeps 8 significant bits, so logits drift by ~1e-2 through a few layers, and a token whose
    # router logits nearly tie can pick another expert (a "routing flip", error ~1) in either
    # implementation. A fixed absolute bound would be arbitrary; the justified criterion is relative to
    # transformers' own bf16 mode on the same weights, measured against the fp32 oracle:
    #  - the typical token (median of per-token mean |error|) is within 1.5x of transformers' bf16;
    #  - at most 10% of tokens are outliers (over 10x that median): routing flips stay rare.
    config, hf, ids, expected, folder = oracle
    model = load_model(folder / "hf-mxfp4", dtype=torch.bfloat16)
    with torch.no_grad():
        ours = model(ids)
        theirs = copy.deepcopy(hf).bfloat16()(ids).logits
    assert ours.dtype == torch.bfloat16
    our_err = (ours.float() - expected).abs().mean(-1).flatten()  # per token
    their_median = (theirs.float() - expected).abs().mean(-1).median().item()
    assert our_err.median().item() < 1.5 * their_median, f"median error {our_err.median():.4f} vs {their_median:.4f}"
    outliers = (our_err > 10 * their_median).float().mean().item()
    assert outliers <= 0.1, f"{outliers:.0%} of tokens far off the fp32 oracle"


def test_odd_widths_from_transformers_own_save(tmp_path):
    # Widths that are not multiples of 32 cannot be MXFP4, but the bf16 layout holds them; here the
    # checkpoint is written by transformers' save_pretrained, an independent writer of that layout.
    config = small_config(
        hidden_size=90,
        intermediate_size=45,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=10,
        num_local_experts=5,
        num_experts_per_tok=5,
        sliding_window=4,
    )
    hf = build_hf_model(config, seed=3, mxfp4_grid=False)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, config.vocab_size, (1, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        logits = load_model(tmp_path, dtype=torch.float32)(ids)
    assert (logits - expected).abs().max().item() < 1e-4


def test_transformers_reads_our_mxfp4_checkpoint(tmp_path):
    # transformers' own MXFP4 loader (dequantizing on the CPU) reads a checkpoint our synthetic writer
    # produced: the on-disk layout (names, shapes, dtypes, index, config) is the real one.
    from transformers import GptOssForCausalLM, Mxfp4Config

    config = small_config()
    write_checkpoint(tmp_path, config, "hf-mxfp4", seed=9, max_shard_bytes=200_000)
    theirs = GptOssForCausalLM.from_pretrained(
        tmp_path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    ids = torch.randint(0, config.vocab_size, (2, 19))
    with torch.no_grad():
        expected = theirs.eval()(ids).logits
        ours = load_model(tmp_path, dtype=torch.float32)(ids)
    assert (ours - expected).abs().max().item() < 1e-4
