"""Model configuration: one flat dataclass, both on-disk config styles, and presets.

Field names follow the Hugging Face `config.json` of gpt-oss where one exists; the RoPE fields use
the flat names of OpenAI's `original/config.json` (`rope_scaling_factor`, `rope_ntk_alpha`, ...),
because HF nests them in `rope_scaling` / `rope_parameters` under other names (beta_slow = ntk_alpha,
beta_fast = ntk_beta).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from gptoss import tokens
from gptoss.errors import UsageError, check_float, check_int

SLIDING, FULL = "sliding_attention", "full_attention"


def cache_dir() -> Path:
    """Where gptoss keeps synthetic checkpoints, the vocabulary and demo runs: $GPTOSS_CACHE, else ~/.cache/gptoss."""
    return Path(os.environ.get("GPTOSS_CACHE", Path.home() / ".cache" / "gptoss"))


@dataclass
class ModelConfig:
    num_hidden_layers: int = 24
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    vocab_size: int = 201088
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)  # empty -> even layers slide, odd are full
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0  # HF beta_slow
    rope_ntk_beta: float = 32.0  # HF beta_fast
    initial_context_length: int = 4096  # HF rope_scaling.original_max_position_embeddings
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    eos_token_id: int = tokens.RETURN
    pad_token_id: int = tokens.ENDOFTEXT

    def __post_init__(self) -> None:
        try:  # types and ranges first, field by field: the structural checks below rely on them
            for name, (minimum, maximum) in _INT_FIELDS.items():
                check_int(name, getattr(self, name), minimum, maximum)
            for name, (minimum, above, maximum) in _FLOAT_FIELDS.items():
                setattr(self, name, check_float(name, getattr(self, name), minimum, maximum, above=above))
            if not isinstance(self.layer_types, list) or not all(isinstance(t, str) for t in self.layer_types):
                raise UsageError(f"layer_types must be a list of strings, found {self.layer_types!r:.60}")
        except UsageError as e:
            raise UsageError(f"invalid ModelConfig: {e} ({_BOUNDS_WHY})") from None
        if not self.layer_types:
            self.layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)]
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if bad := sorted(set(self.layer_types) - {SLIDING, FULL}):
            problems.append(f"unknown layer_types {bad} (expected {SLIDING!r} or {FULL!r})")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_local_experts}]")
        if problems:
            raise UsageError("invalid ModelConfig: " + "; ".join(problems))

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def mxfp4_compatible(self) -> bool:
        """MXFP4 packs 32 input values per block: both expert input widths must be multiples of 32."""
        return self.hidden_size % 32 == 0 and self.intermediate_size % 32 == 0

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    # -- reading config.json -----------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` in either style: OpenAI `original/` or Hugging Face."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}: expected a gpt-oss config.json there")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download or regenerate it") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> ModelConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"{source} holds a JSON {type(raw).__name__}, not an object: it is not a gpt-oss config")
        raw = dict(raw)
        if raw.get("model_type", "gpt_oss") != "gpt_oss":
            raise ValueError(f"{source} describes a {raw['model_type']!r} model, not gpt-oss (model_type 'gpt_oss')")
        renames = {"num_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok"}
        for old, new in renames.items():
            if old in raw:
                raw.setdefault(new, raw.pop(old))
        # HF: rope_scaling (transformers 4.x) or rope_parameters (5.x, which also holds rope_theta).
        rope = raw.pop("rope_parameters", None) or raw.pop("rope_scaling", None) or {}
        if rope and not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_scaling must be an object, found {type(rope).__name__} {rope!r:.60}")
        if rope:
            rope_type = rope.get("rope_type", rope.get("type", "yarn"))
            if rope_type not in ("yarn", "default"):
                raise ValueError(f"{source}: unsupported rope_type {rope_type!r} (gpt-oss uses 'yarn')")
            if rope.get("truncate", False):
                raise ValueError(f"{source}: YaRN truncate=true is not gpt-oss (its correction range is fractional)")
            if "rope_theta" in rope:
                raw["rope_theta"] = rope["rope_theta"]
            if rope_type == "default":
                raw["rope_scaling_factor"] = 1.0
            else:
                raw["rope_scaling_factor"] = rope.get("factor", cls.rope_scaling_factor)
                raw["rope_ntk_alpha"] = rope.get("beta_slow", cls.rope_ntk_alpha)
                raw["rope_ntk_beta"] = rope.get("beta_fast", cls.rope_ntk_beta)
                if "original_max_position_embeddings" in rope:
                    raw["initial_context_length"] = rope["original_max_position_embeddings"]
        ctx, factor = raw.get("initial_context_length"), raw.get("rope_scaling_factor", 32.0)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ctx, factor))
        if "max_position_embeddings" not in raw and numbers and math.isfinite(ctx * factor):
            raw["max_position_embeddings"] = int(ctx * factor)
        for key in ("eos_token_id", "pad_token_id"):  # HF may give a list of ids
            if isinstance(raw.get(key), list):
                raw[key] = raw[key][0] if raw[key] else None
            if raw.get(key) is None:
                raw.pop(key, None)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "hidden_size" not in kwargs or "num_hidden_layers" not in kwargs:
            raise ValueError(f"{source} lacks hidden_size/num_hidden_layers: it is not a gpt-oss config")
        return cls(**kwargs)

    # -- parameter accounting (the one place; memory models and benchmarks read these) --------------
    @property
    def attention_params(self) -> int:
        """One layer's attention: q, k, v with biases, o_proj with its bias, one sink per query head."""
        d = self.hidden_size
        return (self.q_dim + 2 * self.kv_dim) * (d + 1) + (self.q_dim + 1) * d + self.num_attention_heads

    @property
    def expert_weight_params(self) -> int:
        """One expert's matrices, gate_up [2I, D] and down [D, I] (MXFP4 in the checkpoints)."""
        return 3 * self.intermediate_size * self.hidden_size

    @property
    def expert_bias_params(self) -> int:
        """One expert's biases, gate_up's [2I] and down's [D]."""
        return 2 * self.intermediate_size + self.hidden_size

    @property
    def router_params(self) -> int:
        """One layer's router: [E, D] and its bias."""
        return self.num_local_experts * (self.hidden_size + 1)

    def param_table(self) -> list[tuple[str, int, int]]:
        """(component, total parameters, parameters active per token), from the tensor shapes.

        "Active" counts the routed experts only (k of E) and one vocabulary matrix (the unembedding;
        the embedding is a row lookup), as the gpt-oss model card does.
        """
        d, n, E, k = self.hidden_size, self.num_hidden_layers, self.num_local_experts, self.num_experts_per_tok
        attn, router, vocab = self.attention_params, self.router_params, self.vocab_size * d
        expert = self.expert_weight_params + self.expert_bias_params
        return [
            ("embedding", vocab, 0),
            ("attention (qkv, out, sinks)", n * attn, n * attn),
            ("norms", (2 * n + 1) * d, (2 * n + 1) * d),
            ("router", n * router, n * router),
            ("experts (MXFP4 weights + biases)", n * E * expert, n * k * expert),
            ("unembedding", vocab, vocab),
        ]

    def num_params(self) -> tuple[int, int]:
        table = self.param_table()
        return sum(r[1] for r in table), sum(r[2] for r in table)


# the smallest value of each integer field; 0 where zero is a real choice (token ids)
# (lowest, highest) of each integer field. The highest are far beyond any gpt-oss shape (20b and 120b
# use 2880 wide, 24-36 layers, 128 experts, 201,088 tokens, 131,072 positions): a checkpoint asking for
# more is corrupt or not gpt-oss, and would only fail later, out of memory or overflowing int32 indices.
_INT_FIELDS = {
    "num_hidden_layers": (1, 1024), "hidden_size": (1, 65536), "intermediate_size": (1, 262144),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "head_dim": (2, 1024),
    "num_local_experts": (1, 4096), "num_experts_per_tok": (1, 4096), "vocab_size": (1, 1 << 24),
    "sliding_window": (1, 1 << 24), "initial_context_length": (1, 1 << 24), "max_position_embeddings": (1, 1 << 24),
    "eos_token_id": (0, 1 << 24), "pad_token_id": (0, 1 << 24),
}  # fmt: skip
# (lower bound, exclusive, upper bound): every float must also be finite. gpt-oss: theta 150,000, YaRN factor
# 32 with betas 32 and 1, eps 1e-5, limit 7, alpha 1.702; beyond these bounds the rotary angles, the
# clamp or the sigmoid lose all precision (a limit of 1e-300 clamps every activation to zero).
_FLOAT_FIELDS = {
    "rope_theta": (1.0, True, 1e9), "rope_scaling_factor": (1.0, False, 1024.0),
    "rope_ntk_alpha": (0.0, True, 1024.0), "rope_ntk_beta": (0.0, True, 1024.0),
    "rms_norm_eps": (1e-12, False, 0.1), "swiglu_limit": (1e-3, False, 1e4), "swiglu_alpha": (1e-3, False, 100.0),
}  # fmt: skip
_BOUNDS_WHY = "bounds far beyond any gpt-oss model: a checkpoint outside them is corrupt or another architecture"

PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_local_experts=32),
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_local_experts=128),
    # Small enough for the CPU test-suite, but with every structural feature of the real model:
    # GQA (4 query heads per KV head), q width != hidden width, intermediate != hidden,
    # sliding and full layers, a window shorter than the test sequences.
    "tiny": ModelConfig(
        num_hidden_layers=4,
        hidden_size=128,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=201088,
        sliding_window=16,
        initial_context_length=4096,
        max_position_embeddings=131072,
    ),
    # A mid-size shape for CPU benchmarks (about 1 B parameters, 2 GB in bf16): 20b's head layout and
    # vocabulary, a third of its width, half its depth and half its experts.
    "mid": ModelConfig(
        num_hidden_layers=12,
        hidden_size=1024,
        intermediate_size=1024,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        num_local_experts=16,
        num_experts_per_tok=4,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], layer_types=list(PRESETS[name].layer_types))


def format_param_table(config: ModelConfig, markdown: bool = False) -> str:
    """The parameter table of `config`, as fixed-width text or a Markdown table."""
    rows = config.param_table()
    total, active = config.num_params()
    rows = rows + [("total", total, active)]
    if markdown:
        lines = ["| component | parameters | active per token |", "|---|---:|---:|"]
        lines += [f"| {name} | {n:,} | {a:,} |" for name, n, a in rows]
        return "\n".join(lines)
    lines = [f"{'component':<34}{'parameters':>18}{'active/token':>18}"]
    lines += [f"{name:<34}{n:>18,}{a:>18,}" for name, n, a in rows]
    return "\n".join(lines)
