import json

import pytest

from gptoss.config import FULL, SLIDING, ModelConfig, get_preset

# The OpenAI original/config.json of gpt-oss-20b (key/value content from the spec, section 1.2).
ORIGINAL_20B = {
    "num_hidden_layers": 24,
    "num_experts": 32,
    "experts_per_token": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "swiglu_limit": 7.0,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1,
    "rope_ntk_beta": 32,
}

# The HF root config.json of gpt-oss-20b as published (transformers 4.55 style).
HF_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
    "experts_per_token": 4,
    "num_experts_per_tok": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "quantization_config": {"quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 4096,
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 201088,
}


@pytest.mark.parametrize(
    "preset, total, active",
    [("gpt-oss-20b", 20_914_757_184, 3_608_307_264), ("gpt-oss-120b", 116_829_156_672, 5_132_849_472)],
)
def test_parameter_counts_match_the_model_card(preset, total, active):
    assert get_preset(preset).num_params() == (total, active)


def _write(tmp_path, raw):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("raw", [ORIGINAL_20B, HF_20B], ids=["original", "hf-rope_scaling"])
def test_both_config_styles_give_the_20b_preset(tmp_path, raw):
    assert ModelConfig.from_json(_write(tmp_path, raw)) == get_preset("gpt-oss-20b")


def test_hf_rope_parameters_style(tmp_path):
    # transformers 5.x folds rope_theta into rope_parameters
    raw = {k: v for k, v in HF_20B.items() if k not in ("rope_scaling", "rope_theta")}
    raw["rope_parameters"] = dict(HF_20B["rope_scaling"], rope_theta=10000.0, beta_fast=16.0, beta_slow=2.0)
    config = ModelConfig.from_json(_write(tmp_path, raw))
    assert (config.rope_theta, config.rope_ntk_beta, config.rope_ntk_alpha) == (10000.0, 16.0, 2.0)


def test_default_layer_pattern_even_layers_slide():
    config = get_preset("gpt-oss-120b")
    assert config.layer_types[:3] == [SLIDING, FULL, SLIDING] and config.layer_types[-1] == FULL


def test_yarn_correction_range_is_not_rounded():
    from gptoss.model import yarn_correction_range

    low, high = yarn_correction_range(get_preset("gpt-oss-20b"))
    assert low == pytest.approx(8.092779115512402, abs=1e-12)
    assert high == pytest.approx(17.39802450158856, abs=1e-12)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}, "not gpt-oss"),
        ({"vocab_size": 10}, "lacks hidden_size"),
        (dict(ORIGINAL_20B, num_key_value_heads=7), "not a multiple"),
        (dict(ORIGINAL_20B, experts_per_token=33), "num_experts_per_tok"),
        (dict(HF_20B, layer_types=["sliding_attention"]), "layer_types has 1 entries"),
        (dict(HF_20B, rope_scaling=dict(HF_20B["rope_scaling"], truncate=True)), "truncate"),
        # every field bounded, with the reason: huge, tiny and absurd values a corrupt file may carry
        (dict(HF_20B, rope_theta=1e308), "rope_theta must be at most 1000000000.0, found 1e.308"),
        (dict(HF_20B, rope_scaling=dict(HF_20B["rope_scaling"], factor=1e300)), "rope_scaling_factor must be at most"),
        (dict(HF_20B, swiglu_limit=1e-300), "swiglu_limit must be at least 0.001"),
        (dict(HF_20B, sliding_window=10**18), "sliding_window must be at most 16777216"),
        (dict(HF_20B, num_hidden_layers=10**6), "num_hidden_layers must be at most 1024"),
        (dict(HF_20B, hidden_size=2**40), "hidden_size must be at most 65536"),
        (dict(HF_20B, vocab_size=2**31), "vocab_size must be at most"),
        (dict(HF_20B, max_position_embeddings=2**40), "max_position_embeddings must be at most"),
        (dict(HF_20B, rms_norm_eps=0.5), "rms_norm_eps must be at most 0.1"),
        (dict(HF_20B, num_local_experts=10**6), "num_local_experts must be at most 4096"),
        (dict(HF_20B, eos_token_id=2**40), "eos_token_id must be at most"),
        (dict(HF_20B, rope_theta=float("nan")), "rope_theta must be a finite number"),
        (dict(HF_20B, swiglu_limit=1e-300), "corrupt or another architecture"),
    ],
)
def test_bad_configs_are_explained(tmp_path, raw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_json(_write(tmp_path, raw))


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model config"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
