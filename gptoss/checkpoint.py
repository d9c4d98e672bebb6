"""gpt-oss checkpoints: the three real on-disk layouts, one layout map read both ways, strict checks.

Layouts (see docs/architecture.md and the spec, section 3):
  "original"  OpenAI `original/`: `block.N.attn.qkv.weight` (q, k, v fused), `mlp1_weight.blocks`, ...
              one `model.safetensors` (20b) or `model--0000k-of-0000n.safetensors` shards (120b).
  "hf-mxfp4"  Hugging Face MXFP4: `model.layers.N.mlp.experts.gate_up_proj_blocks`, ...; shards listed
              in `model.safetensors.index.json` (20b: three files named `-of-00002`).
  "hf-bf16"   Hugging Face dequantized: dense experts `gate_up_proj` [E, in, out] in bf16.

Everything is mapped onto the *canonical* names, which are the HF MXFP4 names and also the names of
our modules' parameters and buffers. `layout_map` lists each layout's tensors with their canonical
sources; reading (`canonical_from_disk`, here) and writing (`disk_from_canonical`, here, and
gptoss.checkpoint_write's `save_checkpoint` with the config.json of each style) both walk it. Tensors
are memory-mapped by safetensors; MXFP4 experts stay packed (uint8) and a bf16 file's experts are transposed lazily (a view), never copied at load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptoss import mxfp4
from gptoss.config import ModelConfig

LAYOUTS = ("original", "hf-mxfp4", "hf-bf16")
INDEX_FILE = "model.safetensors.index.json"
FLOAT, UINT8 = "BF16", "U8"  # on-disk dtype labels, as safetensors names them
_FLOAT_DTYPES = {"BF16", "F16", "F32"}  # accepted for a float tensor (real checkpoints are BF16)


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message says what was expected, what was found and what to do."""


# ---------------------------------------------------------------------------------------------
# The name map: canonical (HF MXFP4) name -> OpenAI original name
# ---------------------------------------------------------------------------------------------

_LAYER_TO_ORIGINAL = {
    "input_layernorm.weight": "attn.norm.scale",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}  # q/k/v_proj are fused into attn.qkv (rows q, then k, then v)
_GLOBAL_TO_ORIGINAL = {
    "model.embed_tokens.weight": "embedding.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "unembedding.weight",
}


def canonical_spec(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the model in canonical (HF MXFP4) names: name -> (shape, on-disk dtype)."""
    d, V, E = config.hidden_size, config.vocab_size, config.num_local_experts
    I2, I = 2 * config.intermediate_size, config.intermediate_size
    spec = {"model.embed_tokens.weight": ((V, d), FLOAT)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        spec |= {
            p + "input_layernorm.weight": ((d,), FLOAT),
            p + "self_attn.q_proj.weight": ((config.q_dim, d), FLOAT),
            p + "self_attn.q_proj.bias": ((config.q_dim,), FLOAT),
            p + "self_attn.k_proj.weight": ((config.kv_dim, d), FLOAT),
            p + "self_attn.k_proj.bias": ((config.kv_dim,), FLOAT),
            p + "self_attn.v_proj.weight": ((config.kv_dim, d), FLOAT),
            p + "self_attn.v_proj.bias": ((config.kv_dim,), FLOAT),
            p + "self_attn.o_proj.weight": ((d, config.q_dim), FLOAT),
            p + "self_attn.o_proj.bias": ((d,), FLOAT),
            p + "self_attn.sinks": ((config.num_attention_heads,), FLOAT),
            p + "post_attention_layernorm.weight": ((d,), FLOAT),
            p + "mlp.router.weight": ((E, d), FLOAT),
            p + "mlp.router.bias": ((E,), FLOAT),
            p + "mlp.experts.gate_up_proj_blocks": ((E, I2, d // 32, 16), UINT8),
            p + "mlp.experts.gate_up_proj_scales": ((E, I2, d // 32), UINT8),
            p + "mlp.experts.gate_up_proj_bias": ((E, I2), FLOAT),
            p + "mlp.experts.down_proj_blocks": ((E, d, I // 32, 16), UINT8),
            p + "mlp.experts.down_proj_scales": ((E, d, I // 32), UINT8),
            p + "mlp.experts.down_proj_bias": ((E, d), FLOAT),
        }
    spec["model.norm.weight"] = ((d,), FLOAT)
    spec["lm_head.weight"] = ((V, d), FLOAT)
    return spec


@dataclass(frozen=True)
class DiskTensor:
    """One tensor of a layout's files and where it comes from in canonical names.

    kind "same": the canonical tensor `sources[0]` as it is; "qkv": q, k and v (`sources`) concatenated
    row-wise (original layout); "dense": the MXFP4 expert matrix `sources` = (blocks, scales)
    dequantized, in HF's [E, in, out] orientation (hf-bf16 layout)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    sources: tuple[str, ...]
    kind: str = "same"


def layout_map(config: ModelConfig, layout: str) -> list[DiskTensor]:
    """Every tensor a checkpoint of `layout` holds, in file order, with its canonical sources: the one
    map that reading (canonical_from_disk) and writing (disk_from_canonical) both walk."""
    canon = canonical_spec(config)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout != "hf-bf16" and not config.mxfp4_compatible:
        raise CheckpointError(
            f"hidden_size={config.hidden_size} and intermediate_size={config.intermediate_size} must be multiples "
            f"of 32 for an MXFP4 layout ({layout}); only the hf-bf16 layout holds other widths"
        )
    if layout == "hf-mxfp4":
        return [DiskTensor(name, shape, dtype, (name,)) for name, (shape, dtype) in canon.items()]
    out = []
    if layout == "hf-bf16":  # dense experts in HF's [E, in, out] orientation
        d, E, I = config.hidden_size, config.num_local_experts, config.intermediate_size
        dense = {"gate_up_proj": (E, d, 2 * I), "down_proj": (E, I, d)}
        for name, (shape, dtype) in canon.items():
            base = name.rsplit(".", 1)[-1]
            if base.endswith("_scales"):
                continue
            if base.endswith("_blocks"):
                matrix = name.removesuffix("_blocks")
                shape = dense[base.removesuffix("_blocks")]
                out.append(DiskTensor(matrix, shape, FLOAT, (name, matrix + "_scales"), "dense"))
            else:
                out.append(DiskTensor(name, shape, dtype, (name,)))
        return out
    for name, (shape, dtype) in canon.items():  # original: renamed, q, k and v fused row-wise
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            out.append(DiskTensor(_GLOBAL_TO_ORIGINAL[name], shape, dtype, (name,)))
        elif m[2] in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            kind = m[2].rsplit(".", 1)[1]
            rows = config.q_dim + 2 * config.kv_dim
            sources = tuple(f"model.layers.{m[1]}.self_attn.{p}_proj.{kind}" for p in "qkv")
            out.append(DiskTensor(f"block.{m[1]}.attn.qkv.{kind}", (rows,) + shape[1:], dtype, sources, "qkv"))
        elif ".k_proj." not in m[2] and ".v_proj." not in m[2]:
            out.append(DiskTensor(f"block.{m[1]}.{_LAYER_TO_ORIGINAL[m[2]]}", shape, dtype, (name,)))
    return out


def disk_spec(config: ModelConfig, layout: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor a checkpoint of `layout` holds, in file order: disk name -> (shape, dtype)."""
    return {t.name: (t.shape, t.dtype) for t in layout_map(config, layout)}


def canonical_from_disk(
    config: ModelConfig, layout: str, get: Callable[[str], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical or module name, tensor) from a checkpoint's tensors, converting as needed.

    For "hf-bf16" the experts come out dense as `gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I]
    (our [out, in] orientation; HF stores [E, in, out]), as transposed views.
    """
    for t in layout_map(config, layout):
        if t.kind == "same":
            yield t.sources[0], get(t.name)
        elif t.kind == "dense":
            yield t.name, get(t.name).transpose(1, 2)
        else:  # qkv: rows q, then k, then v
            qkv, start = get(t.name), 0
            for source, size in zip(t.sources, (config.q_dim, config.kv_dim, config.kv_dim)):
                yield source, qkv.narrow(0, start, size)
                start += size


# A producer makes one tensor, or yields it in consecutive chunks along dim 0 (to stream large ones).
Producer = Callable[[], "torch.Tensor | Iterable[torch.Tensor]"]


def disk_from_canonical(config: ModelConfig, layout: str, canon: Mapping[str, Producer]) -> dict[str, Producer]:
    """The inverse of canonical_from_disk: producers of canonical tensors -> producers of `layout`'s
    tensors, in file order (dense experts expert by expert, so a large one is never whole in memory)."""

    def convert(t: DiskTensor) -> Producer:
        if t.kind == "same":
            return canon[t.sources[0]]
        if t.kind == "qkv":
            return lambda: torch.cat([canon[s]() for s in t.sources])

        def dense():  # [1, in, out] bf16 per expert
            blocks, scales = (canon[s]() for s in t.sources)
            for e in range(blocks.shape[0]):
                yield mxfp4.dequantize(blocks[e : e + 1], scales[e : e + 1], torch.bfloat16).transpose(1, 2)

        return dense

    return {t.name: convert(t) for t in layout_map(config, layout)}


# ---------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------


def _layout_marker(name: str) -> str | None:
    """The layout a tensor name belongs to only (the HF names of attention and norms are shared)."""
    if name.startswith("block.") or name in _GLOBAL_TO_ORIGINAL.values():
        return "original"
    if name.endswith(("_blocks", "_scales")):
        return "hf-mxfp4"
    if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
        return "hf-bf16"
    return None


def detect_layout(folder: Path, names: set[str], files: dict[str, Path] | None = None) -> str:
    """The one layout the tensor names belong to; a folder mixing two layouts is refused."""
    found: dict[str, str] = {}
    for name in sorted(names):
        layout = _layout_marker(name)
        if layout is not None:
            found.setdefault(layout, name)
    if len(found) > 1:
        where = "; ".join(
            f"{layout}: {name}" + (f" in {files[name].name}" if files else "") for layout, name in found.items()
        )
        raise CheckpointError(
            f"{folder} holds tensors of {len(found)} layouts ({where}): keep one checkpoint per folder and "
            "move the other files out"
        )
    if found:
        return next(iter(found))
    sample = ", ".join(sorted(names)[:3]) or "no tensors"
    raise CheckpointError(
        f"{folder} does not hold a gpt-oss checkpoint: none of its tensor names ({sample}, ...) belong to "
        "the OpenAI original/ or Hugging Face gpt-oss layouts"
    )


def resolve_folder(source: str | Path) -> Path:
    """The folder that holds the weights: `source`, or `source/original` for a repo root without root weights."""
    path = Path(source).expanduser()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint folder {path} does not exist; pass a local folder or a hub id like openai/gpt-oss-20b"
        )
    for folder in (path, path / "original"):
        if folder.is_dir() and (any(folder.glob("*.safetensors")) or (folder / INDEX_FILE).exists()):
            return folder
    raise CheckpointError(
        f"{path} holds no *.safetensors files (nor does {path / 'original'}); is the download complete?"
    )


class TensorIndex:
    """name -> file for every tensor of a checkpoint folder, with lazily opened, memory-mapped files."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._handles: dict[Path, object] = {}
        index = folder / INDEX_FILE
        present = sorted(folder.glob("*.safetensors"))
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError("weight_map is not an object of tensor name -> file name")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
            for file in set(weight_map.values()):  # shards sit beside the index: never a path out of the folder
                if Path(file).name != file or file in ("", ".", "..") or "\\" in file:
                    raise CheckpointError(
                        f"{index} names shard {file!r}, which is not a file name inside {folder}: an index lists the "
                        "shards beside it; re-download the index"
                    )
            self.files = {name: folder / file for name, file in weight_map.items()}
            shards = sorted(set(self.files.values()))
            for file in shards:
                if not file.exists():
                    raise CheckpointError(
                        f"shard {file.name} listed in {index.name} is missing from {folder}; re-download it"
                    )
            if stray := [f.name for f in present if f not in shards]:
                raise CheckpointError(
                    f"{folder} holds {stray[0]}, which {index.name} does not list: one checkpoint per folder; "
                    "move that file out (or re-download the index)"
                )
            for file in shards:  # the index and the shards' own headers must agree, tensor by tensor
                held, listed = set(self._open(file).keys()), {n for n, f in self.files.items() if f == file}
                if absent := sorted(listed - held):
                    raise CheckpointError(
                        f"{index.name} places tensor {absent[0]} in {file.name}, which does not hold it: the index "
                        "and the shards disagree; re-download the index"
                    )
                if extra := sorted(held - listed):
                    raise CheckpointError(
                        f"{file.name} holds tensor {extra[0]}, which {index.name} "
                        f"{'places in ' + self.files[extra[0]].name if extra[0] in self.files else 'does not list'}"
                        ": the index and the shards disagree; re-download the index"
                    )
        else:
            self.files = {}
            for file in present:
                for name in self._open(file).keys():
                    if name in self.files:
                        raise CheckpointError(
                            f"tensor {name} is in both {self.files[name].name} and {file.name} in {folder}: two "
                            "checkpoints in one folder? keep one and move the other file out"
                        )
                    self.files[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():  # a FIFO, a device or a folder named like a shard: opening a FIFO blocks forever
                raise CheckpointError(
                    f"{file} is not a regular file (a pipe, a device or a folder named like a shard); put the "
                    "checkpoint's file there"
                )
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"cannot read {file}: {e} -- the file is truncated or corrupt; re-download it"
                ) from None
        return self._handles[file]

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self._open(self.files[name]).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._open(self.files[name]).get_tensor(name)  # memory-mapped, not copied

    def validate(self, spec: dict[str, tuple[tuple[int, ...], str]], layout: str) -> None:
        """Check presence, shape and dtype of every expected tensor; raise on the first problem."""
        if unknown := sorted(set(self.files) - set(spec)):
            raise CheckpointError(
                f"tensor {unknown[0]} in {self.files[unknown[0]].name}"
                f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''} is not part of a gpt-oss "
                f"checkpoint ({layout} layout) with this config.json: remove the foreign tensor, or use the config that came with it"
            )
        missing = [n for n in spec if n not in self.files]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(
                f"tensor {missing[0]}{more} missing from the {layout} checkpoint in {self.folder}: "
                "the config and the weights disagree, or a shard is absent"
            )
        for name, (shape, dtype) in spec.items():
            found_shape, found_dtype = self.meta(name)
            file = self.files[name].name
            if found_shape != shape:
                raise CheckpointError(
                    f"tensor {name} in {file}: expected shape {list(shape)}, found {list(found_shape)}; "
                    "does config.json belong to these weights?"
                )
            ok = found_dtype in _FLOAT_DTYPES if dtype == FLOAT else found_dtype == dtype
            if not ok:
                raise CheckpointError(f"tensor {name} in {file}: expected dtype {dtype}, found {found_dtype}")


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has weights but no config.json; copy the model's config.json beside them")
    try:
        return ModelConfig.from_json(path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def open_checkpoint(source: str | Path) -> tuple[ModelConfig, str, TensorIndex]:
    """Find, identify and validate a local checkpoint: (config, layout, index)."""
    folder = resolve_folder(source)
    index = TensorIndex(folder)
    layout = detect_layout(folder, set(index.files), index.files)
    config = read_config(folder)
    check_counts(config, layout, index)
    index.validate(disk_spec(config, layout), layout)
    return config, layout, index


def check_counts(config: ModelConfig, layout: str, index: TensorIndex) -> None:
    """config.json's layer and expert counts against the tensors, before any per-tensor check."""
    layers = {int(m[1]) for n in index.files if (m := re.match(r"(?:model\.layers|block)\.(\d+)\.", n))}
    if layers != set(range(config.num_hidden_layers)):
        held = "no layers" if not layers else f"layers {sorted(layers)}"
        if layers and layers == set(range(max(layers) + 1)):
            held = f"{len(layers)} layers (0..{max(layers)})"
        raise CheckpointError(
            f"config.json says num_hidden_layers={config.num_hidden_layers}, the tensors in {index.folder} hold "
            f"{held}: the config and the weights disagree; use the config.json that "
            "came with these weights"
        )
    router = "block.0.mlp.gate.weight" if layout == "original" else "model.layers.0.mlp.router.weight"
    if router in index.files:
        experts = index.meta(router)[0][0]
        if experts != config.num_local_experts:
            raise CheckpointError(
                f"config.json says num_local_experts={config.num_local_experts}, the router {router} in "
                f"{index.files[router].name} scores {experts} experts: the config and the weights disagree; use the "
                "config.json that came with these weights"
            )
