"""Writing gpt-oss checkpoints in the three real layouts (gptoss.checkpoint holds the layout map and the
reader): the config.json of each style, safetensors files written whole or not at all, shards named
and indexed as the published checkpoints are. `gptoss synth` and the trainer's full fine-tune use it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from gptoss import tokens
from gptoss.checkpoint import INDEX_FILE, UINT8, Producer, disk_from_canonical, disk_spec
from gptoss.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# config.json of each style
# ---------------------------------------------------------------------------------------------


def original_config_json(config: ModelConfig) -> dict:
    """The key set of OpenAI's `original/config.json`."""
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "num_experts": config.num_local_experts,
        "experts_per_token": config.num_experts_per_tok,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "swiglu_limit": config.swiglu_limit,
        "head_dim": config.head_dim,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "sliding_window": config.sliding_window,
        "initial_context_length": config.initial_context_length,
        "rope_theta": config.rope_theta,
        "rope_scaling_factor": config.rope_scaling_factor,
        "rope_ntk_alpha": config.rope_ntk_alpha,
        "rope_ntk_beta": config.rope_ntk_beta,
    }


def hf_config_json(config: ModelConfig, quantized: bool = True) -> dict:
    """The key set of the Hugging Face `config.json` (transformers 4.55 style, `rope_scaling`)."""
    cfg = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "experts_per_token": config.num_experts_per_tok,
        "num_experts_per_tok": config.num_experts_per_tok,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initial_context_length": config.initial_context_length,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "layer_types": list(config.layer_types),
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "num_local_experts": config.num_local_experts,
        "output_router_logits": False,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": config.rope_scaling_factor,
            "beta_fast": config.rope_ntk_beta,
            "beta_slow": config.rope_ntk_alpha,
            "original_max_position_embeddings": config.initial_context_length,
            "truncate": False,
        },
        "rope_theta": config.rope_theta,
        "router_aux_loss_coef": 0.9,
        "sliding_window": config.sliding_window,
        "swiglu_limit": config.swiglu_limit,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }
    for key in ("eos_token_id", "pad_token_id"):  # a test-sized vocabulary has no room for them
        if cfg[key] >= config.vocab_size:
            del cfg[key]
    if quantized:
        cfg["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        }
    return cfg


# ---------------------------------------------------------------------------------------------
# Writing a checkpoint
# ---------------------------------------------------------------------------------------------

_DTYPES = {"BF16": torch.bfloat16, "U8": torch.uint8, "F32": torch.float32}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _DTYPES[dtype].itemsize


def write_safetensors(
    path: Path, spec: Mapping[str, tuple[tuple[int, ...], str]], producers: Mapping[str, Producer], progress=None
) -> None:
    """Stream tensors into a safetensors file: header first (from `spec`), then each tensor's bytes.

    Written to `path.tmp` and renamed at the end, so an interrupted write never leaves a file that
    looks complete.
    """
    header, offset = {}, 0
    for name, (shape, dtype) in spec.items():
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, (shape, dtype) in spec.items():
            result = producers[name]()
            chunks = [result] if isinstance(result, torch.Tensor) else result
            written = 0
            for chunk in chunks:
                chunk = chunk.to(_DTYPES[dtype]).contiguous()
                f.write(chunk.view(torch.uint8).numpy().data)
                written += chunk.numel() * chunk.element_size()
            if written != _nbytes(shape, dtype):
                raise RuntimeError(
                    f"{name}: produced {written} bytes, expected {_nbytes(shape, dtype)} for {shape} {dtype}"
                )
            if progress is not None:
                progress.update(written)
    os.replace(tmp, path)


def _shard(spec: dict[str, tuple[tuple[int, ...], str]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in spec.items():
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _shard_names(layout: str, count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    if layout == "original":  # 120b: model--00001-of-00007.safetensors (double dash, 1-based)
        return [f"model--{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    # HF converter's off-by-one: 20b has model-00000..00002-of-00002.safetensors, three files
    return [f"model-{i:05d}-of-{count - 1:05d}.safetensors" for i in range(count)]


def save_checkpoint(
    folder: str | Path,
    config: ModelConfig,
    layout: str,
    tensors: Mapping[str, torch.Tensor | Producer],
    *,
    max_shard_bytes: int | None = None,
    progress: bool = False,
) -> Path:
    """Write the model `tensors` (canonical names: tensors, or producers of them) as a checkpoint of
    `layout` in `folder`, with its shards, index and config files; return the folder. Shard size
    defaults to the real checkpoints': HF 4.8 GB; original one file up to 16 GB (20b), else shards of
    10 GB (120b has seven). Each file is written whole or not at all."""
    spec = disk_spec(config, layout)  # an unknown layout or width is refused before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    canon = {n: t if callable(t) else (lambda t=t: t) for n, t in tensors.items()}
    producers = disk_from_canonical(config, layout, canon)
    total = sum(_nbytes(s, d) for s, d in spec.values())
    if max_shard_bytes is None:
        max_shard_bytes = (total if total <= 16e9 else int(10e9)) if layout == "original" else int(4.8e9)
    shards = _shard(spec, max_shard_bytes)
    names = _shard_names(layout, len(shards))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {layout} to {folder}")
    for file, members in zip(names, shards):
        write_safetensors(folder / file, {n: spec[n] for n in members}, producers, bar)
    if bar is not None:
        bar.close()
    if len(shards) > 1:
        weight_map = {n: file for file, members in zip(names, shards) for n in members}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    if layout == "original":
        (folder / "config.json").write_text(json.dumps(original_config_json(config), indent=2) + "\n")
        labels = {
            n: ("FP4" if n.endswith(".blocks") else "UE8") if d == UINT8 else "BF16" for n, (_, d) in spec.items()
        }
        (folder / "dtypes.json").write_text(json.dumps(labels, indent=2) + "\n")
    else:
        hf = hf_config_json(config, quantized=layout == "hf-mxfp4")
        (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        generation = {
            "bos_token_id": tokens.STARTOFTEXT,
            "do_sample": True,
            "eos_token_id": list(tokens.EOS_TOKEN_IDS),
            "pad_token_id": tokens.ENDOFTEXT,
        }
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder
