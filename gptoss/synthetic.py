"""Random gpt-oss checkpoints written in the exact on-disk layout of the real ones.

Same tensor names, shapes, dtypes, shard naming and index, and config files as the published
checkpoints (see gptoss/checkpoint.py for the layouts). For one seed, all three layouts hold the
same model: experts are drawn directly as MXFP4 codes and scales, and the bf16 layout stores their
exact dequantized values. Files are streamed tensor by tensor (expert by expert for dense experts),
so writing the full gpt-oss-20b shape needs about 1.5 GB of memory, not 13.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from gptoss import mxfp4
from gptoss.checkpoint import INDEX_FILE, LAYOUTS, UINT8, canonical_spec, disk_spec
from gptoss.config import ModelConfig

_DTYPES = {"BF16": torch.bfloat16, "U8": torch.uint8, "F32": torch.float32}
_TORCH_TO_ST = {torch.bfloat16: "BF16", torch.uint8: "U8", torch.float32: "F32", torch.float16: "F16"}
# A producer makes one tensor, or yields it in consecutive chunks along dim 0.
Producer = Callable[[], torch.Tensor | Iterable[torch.Tensor]]


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _random_tensor(name: str, shape: tuple[int, ...], config: ModelConfig, seed: int) -> torch.Tensor:
    """One random tensor, scaled so activations stay O(1) through any depth."""
    g = _generator(seed, name)
    if name.endswith("_blocks"):  # uniformly random E2M1 codes (RMS value 2.93)
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if name.endswith("_scales"):  # block scale ~ 1/sqrt(fan_in) / 2.93, with a little spread
        fan_in = shape[-1] * 32
        centre = mxfp4.SCALE_BIAS + round(math.log2(1 / math.sqrt(fan_in) / 2.93))
        return torch.randint(centre - 1, centre + 2, shape, generator=g, dtype=torch.uint8)
    noise = torch.randn(shape, generator=g, dtype=torch.bfloat16)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1 + 0.1 * noise
    if name.endswith("bias"):
        return 0.1 * noise
    if name.endswith("sinks") or name == "model.embed_tokens.weight":
        return noise
    return noise / math.sqrt(shape[-1])  # weights [out, in]


def _canonical_producers(
    config: ModelConfig, seed: int, tensors: Mapping[str, torch.Tensor] | None
) -> dict[str, Producer]:
    producers: dict[str, Producer] = {}
    for name, (shape, _) in canonical_spec(config).items():
        if tensors is not None:
            producers[name] = lambda n=name: tensors[n]
        else:
            producers[name] = lambda n=name, s=shape: _random_tensor(n, s, config, seed)
    return producers


def _disk_producers(config: ModelConfig, layout: str, canon: dict[str, Producer]) -> dict[str, Producer]:
    """Map canonical producers onto the tensors of `layout` (inverse of checkpoint.canonical_from_disk)."""
    if layout == "hf-mxfp4":
        return canon
    out: dict[str, Producer] = {}
    if layout == "hf-bf16":
        for name in disk_spec(config, layout):
            if name.endswith(("gate_up_proj", "down_proj")):

                def dense(n=name):  # expert by expert: [1, in, out] bf16
                    blocks, scales = canon[n + "_blocks"](), canon[n + "_scales"]()
                    for e in range(blocks.shape[0]):
                        yield mxfp4.dequantize(blocks[e : e + 1], scales[e : e + 1], torch.bfloat16).transpose(1, 2)

                out[name] = dense
            else:
                out[name] = canon[name]
        return out
    # original: rename, and fuse q, k, v row-wise
    from gptoss.checkpoint import _GLOBAL_TO_ORIGINAL, _LAYER_TO_ORIGINAL

    for name, producer in canon.items():
        if name in _GLOBAL_TO_ORIGINAL:
            out[_GLOBAL_TO_ORIGINAL[name]] = producer
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        if rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            parts = [canon[f"model.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"block.{layer}.attn.qkv.{kind}"] = lambda parts=parts: torch.cat([p() for p in parts])
        elif rest in _LAYER_TO_ORIGINAL:
            out[f"block.{layer}.{_LAYER_TO_ORIGINAL[rest]}"] = producer
    order = disk_spec(config, layout)
    return {name: out[name] for name in order}


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
    """Write a checkpoint of `config` in `layout` to `folder` and return the folder.

    Random weights from `seed`, or `tensors` given in canonical names (HF MXFP4 names: experts as
    `*_blocks`/`*_scales`). Shard size defaults to the real checkpoints': HF 4.8 GB; original one
    file up to 16 GB (20b), else shards of 10 GB (120b has seven).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = disk_spec(config, layout)
    producers = _disk_producers(config, layout, _canonical_producers(config, seed, tensors))
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
        (folder / "config.json").write_text(json.dumps(config.to_original_json(), indent=2) + "\n")
        labels = {
            n: ("FP4" if n.endswith(".blocks") else "UE8") if d == UINT8 else "BF16" for n, (_, d) in spec.items()
        }
        (folder / "dtypes.json").write_text(json.dumps(labels, indent=2) + "\n")
    else:
        hf = config.to_hf_json(quantized=layout == "hf-mxfp4")
        (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        generation = {
            "bos_token_id": 199998,
            "do_sample": True,
            "eos_token_id": [200002, 199999, 200012],
            "pad_token_id": 199999,
        }
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder
