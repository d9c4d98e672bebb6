import pytest
import torch

from gptoss.config import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_config(**overrides) -> ModelConfig:
    """A few-layer config with a small vocabulary and every structural feature of gpt-oss:
    GQA, q width != hidden width, intermediate != hidden, a prime number of experts, a window
    shorter than the test sequences, sliding and full layers."""
    base = dict(
        num_hidden_layers=3,
        hidden_size=96,
        intermediate_size=64,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=7,
        num_experts_per_tok=3,
        vocab_size=300,
        sliding_window=5,
    )
    base.update(overrides)
    return ModelConfig(**base)
