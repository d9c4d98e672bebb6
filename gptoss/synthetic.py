"""Random gpt-oss checkpoints written in the exact on-disk layout of the real ones.

This module only makes the random tensors; gptoss.checkpoint writes them, with the same tensor
names, shapes, dtypes, shard naming and index, and config files as the published checkpoints. For
one seed, all three layouts hold the same model: experts are drawn directly as MXFP4 codes and
scales, and the bf16 layout stores their exact dequantized values. Each tensor is made when the
writer streams it (expert by expert for dense experts), so writing the full gpt-oss-20b shape needs
about 1.5 GB of memory, not 13.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from gptoss import mxfp4
from gptoss.checkpoint import canonical_spec
from gptoss.checkpoint_write import save_checkpoint
from gptoss.config import ModelConfig
from gptoss.model import GptOss


def _generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _random_tensor(
    name: str, shape: tuple[int, ...], config: ModelConfig, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One random tensor, scaled so activations stay O(1) through any depth, drawn on `device`."""
    g = _generator(seed, name, device)
    if name.endswith("_blocks"):  # uniformly random E2M1 codes (RMS value 2.93)
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8, device=device)
    if name.endswith("_scales"):  # block scale ~ 1/sqrt(fan_in) / 2.93, with a little spread
        fan_in = shape[-1] * 32
        centre = mxfp4.SCALE_BIAS + round(math.log2(1 / math.sqrt(fan_in) / 2.93))
        return torch.randint(centre - 1, centre + 2, shape, generator=g, dtype=torch.uint8, device=device)
    noise = torch.randn(shape, generator=g, dtype=torch.bfloat16, device=device)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1 + 0.1 * noise
    if name.endswith("bias"):
        return 0.1 * noise
    if name.endswith("sinks") or name == "model.embed_tokens.weight":
        return noise
    return noise / math.sqrt(shape[-1])  # weights [out, in]


def random_model(
    config: ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    backend: str = "auto",
) -> GptOss:
    """A model of `config` with random weights drawn directly on `device`, experts MXFP4: what
    `load_model` gives for the checkpoint `write_checkpoint(folder, config, seed=seed)` writes, without
    the checkpoint (13 GB for gpt-oss-20b, 65 GB for 120b). On the CPU the weights are those of that
    checkpoint exactly; on a GPU they are drawn by the GPU's generator (same distributions, other values).
    Benchmarks build the full shapes this way on a machine with little disk."""
    from gptoss.load import resolve_backend
    from gptoss.model import RotaryEmbedding

    device = torch.device(device)
    with torch.device("meta"):
        model = GptOss(config, quantized=True)
    state = {}
    for name, (shape, _) in canonical_spec(config).items():
        tensor = _random_tensor(name, shape, config, seed, device)
        if tensor.is_floating_point():  # as load_model: RMSNorm gains fp32, the rest `dtype`
            keep_fp32 = name.endswith("layernorm.weight") or name == "model.norm.weight"
            tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
        state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = RotaryEmbedding(config).to(device)  # computed, not stored
    return model.set_backend(resolve_backend(backend, device)).requires_grad_(False).eval()


def cached_checkpoint(preset: str, layout: str = "hf-mxfp4", progress: bool = False) -> Path:
    """The synthetic checkpoint of a preset in cache_dir()/<preset>-<layout>, written (seed 0) if missing."""
    from gptoss.config import cache_dir, get_preset

    folder = cache_dir() / f"{preset}-{layout}"
    if not (folder / "config.json").exists():
        write_checkpoint(folder, get_preset(preset), layout, progress=progress)
    return folder


def write_checkpoint(
    folder: str | Path,
    config: ModelConfig,
    layout: str = "hf-mxfp4",
    seed: int = 0,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int | None = None,
    progress: bool = False,
) -> Path:
    """A checkpoint of `config` in `layout` in `folder` (gptoss.checkpoint_write.save_checkpoint): random
    weights from `seed`, made tensor by tensor as the writer streams them, or `tensors` given in
    canonical names (HF MXFP4 names: experts as `*_blocks`/`*_scales`). Returns the folder."""
    producers = (
        tensors
        if tensors is not None
        else {
            name: lambda n=name, s=shape: _random_tensor(n, s, config, seed)
            for name, (shape, _) in canonical_spec(config).items()
        }
    )
    return save_checkpoint(folder, config, layout, producers, max_shard_bytes=max_shard_bytes, progress=progress)
