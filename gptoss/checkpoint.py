"""gpt-oss checkpoints: the three real on-disk layouts, one layout map read both ways, strict checks.

Layouts (see docs/architecture.md and the spec, section 3):
  "original"  OpenAI `original/`: `block.N.attn.qkv.weight` (q, k, v fused), `mlp1_weight.blocks`, ...
              one `model.safetensors` (20b) or `model--0000k-of-0000n.safetensors` shards (120b).
  "hf-mxfp4"  Hugging Face MXFP4: `model.layers.N.mlp.experts.gate_up_proj_blocks`, ...; shards listed
              in `model.safetensors.index.json` (20b: three files named `-of-00002`).
  "hf-bf16"   Hugging Face dequantized: dense experts `gate_up_proj` [E, in, out] in bf16.

Everything is mapped onto the *canonical* names, which are the HF MXFP4 names and also the names of
our modules' parameters and buffers. `layout_map` lists each layout's tensors with their canonical
sources; reading (`canonical_from_disk`) and writing (`disk_from_canonical`, `save_checkpoint`, with
the config.json of each style) both walk it. Tensors are memory-mapped by safetensors; MXFP4 experts
stay packed (uint8) and a bf16 file's experts are transposed lazily (a view), never copied at load.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptoss import mxfp4, tokens
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
