"""LoRA for gpt-oss: attention projections and the experts of chosen layers, saved and loaded in
Hugging Face PEFT's exact format.

Attention: q/k/v/o_proj become LoRALinear (same weight and bias, plus lora_A [r, in] and lora_B
[out, r]): y = x W^T + b + s * (x A^T) B^T with s = alpha / r.
Experts: ExpertLoRA modules in gptoss.model.Experts.lora, per-expert factors kept as PEFT stores them
for its 3-D ParamWrapper (ExpertLoRA describes the layout); applied as (x A_e^T) B_e^T, never building
the [E, out, in] delta.
Files: adapter_config.json (target_modules = full q/k/v/o paths, target_parameters =
"N.mlp.experts.gate_up_proj" / "N.mlp.experts.down_proj") and adapter_model.safetensors (fp32),
keys "base_model.model.<module path>.lora_A.weight"; for experts PEFT nests the two wrappers, so
gate_up lives under "mlp.experts.base_layer.lora_*" and down under "mlp.experts.lora_*" when both are
targeted (only one: directly under "mlp.experts.lora_*").
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gptoss.errors import UsageError, check_float, check_int
from gptoss.model import GptOss

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot be attached; the message names the file and what is wrong."""


def default_expert_layers(num_layers: int) -> list[int]:
    """The recipe's layers 7, 15, 23 of 24: the last layer of each third of the depth."""
    return sorted({round((i + 1) * num_layers / 3) - 1 for i in range(3)})


class LoRALinear(nn.Linear):
    """nn.Linear plus a trainable low-rank update; the frozen weight and bias are shared, not copied."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)  # so the adapted model starts equal to the base
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            # autocast multiplies in its dtype anyway: x goes in as it is (an upcast to the fp32 factors'
            # dtype would be a pass over [T, in] cast straight back), and B's product adds to the base
            # output inside its GEMM (addmm), not in a pass of its own over [T, out]
            z = self.lora_A(x) * self.scaling  # the scaling on the rank-r product: r columns, not out
            flat = base.reshape(-1, base.shape[-1])
            return torch.addmm(flat, z.reshape(-1, z.shape[-1]), self.lora_B.weight.t()).view(base.shape)
        delta = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)) * self.scaling)
        return base + delta.to(x.dtype)


class ExpertLoRA(nn.Module):
    """LoRA on one matrix ("gate_up_proj" or "down_proj") of all E experts of a layer, held as PEFT holds
    it for its 3-D ParamWrapper (the one place this layout is described): A [E*r, in], expert e's factor
    A_e its rows e*r .. e*r+r-1; B [out, r*E], expert e's factor B_e its columns e, E+e, 2E+e, ...
    The update of expert e is s * (x A_e^T) B_e^T with s = alpha / r; the [E, out, in] delta is built only
    to merge. Attached in `Experts.lora[which]`; fp32 parameters, as the trainer makes them."""

    def __init__(self, experts: int, r: int, inp: int, out: int, alpha: float, device=None):
        super().__init__()
        self.experts, self.r, self.scaling = experts, r, alpha / r
        self.A = nn.Parameter(torch.empty(experts * r, inp, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # PEFT's default init
        self.B = nn.Parameter(torch.zeros(out, experts * r, device=device))  # the adapted model starts as the base

    @classmethod
    def on(cls, experts, which: str, r: int, alpha: float) -> ExpertLoRA:
        """A fresh adapter for `which` of a gptoss.model.Experts (its shapes and device)."""
        E, I2 = experts.gate_up_proj_bias.shape  # [E, 2I]
        D = experts.down_proj_bias.shape[1]
        out, inp = (I2, D) if which == "gate_up_proj" else (D, I2 // 2)  # gate_up: D -> 2I; down: I -> D
        return cls(E, r, inp, out, alpha, experts.gate_up_proj_bias.device)

    def factors(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's factors: A_e [r, in], B_e [out, r] (views)."""
        r, E = self.r, self.experts
        return self.A[e * r : (e + 1) * r], self.B.view(self.B.shape[0], r, E)[:, :, e]

    def expert_major(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert's factors with expert e's rank at e*r .. e*r+r-1: A [E*r, in] as stored, B
        [out, E*r] reordered (differentiably) from PEFT's [out, r*E]. The Triton kernels' layout."""
        out = self.B.shape[0]
        return self.A, self.B.view(out, self.r, self.experts).transpose(1, 2).reshape(out, -1)

    def delta(self) -> torch.Tensor:
        """Every expert's full update s * B_e A_e: [E, out, in] fp32 (merging only)."""
        B, A = self.B.float().view(self.B.shape[0], self.r, self.experts), self.A.float().view(self.experts, self.r, -1)
        return self.scaling * torch.einsum("ore,eri->eoi", B, A)

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """The update s * (x A_e^T) B_e^T of expert e for x [n, in], in x's dtype."""
        a_e, b_e = self.factors(e)
        return (self.scaling * F.linear(F.linear(x.to(a_e.dtype), a_e), b_e)).to(x.dtype)


@contextlib.contextmanager
def adapter_disabled(model: GptOss):
    """Inside the block the model computes as its base: every LoRA update (attention and experts) is
    scaled by 0 and the scalings are restored on exit. One model serves both, so there is never a second
    copy. The tokens are the base's exactly: an update is 0 * a finite value (load_adapter refuses
    non-finite factors) and y + 0 is y. Not thread-safe: hold the model for the whole block."""
    modules = [m for m in model.modules() if isinstance(m, (LoRALinear, ExpertLoRA))]
    saved = [m.scaling for m in modules]
    for m in modules:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, scaling in zip(modules, saved):
            m.scaling = scaling


def _attach_expert_lora(experts, which: str, r: int, alpha: float) -> None:
    experts.lora[which] = ExpertLoRA.on(experts, which, r, alpha)


def apply_lora(
    model: GptOss,
    r: int = 8,
    alpha: float = 16,
    expert_layers: list[int] | None = None,
    targets=ATTENTION,
    seed: int = 0,
) -> list[nn.Parameter]:
    """Add adapters, freeze everything else; return exactly the trainable parameters."""
    if expert_layers is None:
        expert_layers = default_expert_layers(model.config.num_hidden_layers)
    check_int("lora_r", r, 1)
    check_float("lora_alpha", alpha, 0.0, above=True)
    bad = [i for i in expert_layers if not 0 <= i < model.config.num_hidden_layers]
    if bad:
        layers = model.config.num_hidden_layers
        raise UsageError(f"lora_expert_layers {bad} do not exist: the model has {layers} layers (0..{layers - 1})")
    torch.manual_seed(seed)
    model.requires_grad_(False)
    for i, layer in enumerate(model.model.layers):
        for name in targets:
            setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), r, alpha))
        if i in expert_layers:
            for which in EXPERT_PARAMS:
                _attach_expert_lora(layer.mlp.experts, which, r, alpha)
    model.lora_config = {"r": r, "lora_alpha": alpha, "expert_layers": sorted(expert_layers), "targets": list(targets)}
    params = lora_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())


def lora_parameters(model: GptOss) -> dict[str, nn.Parameter]:
    """Adapter parameters in PEFT's key names (without the base_model.model. prefix and .weight)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for name in ATTENTION:
            module = getattr(layer.self_attn, name)
            if isinstance(module, LoRALinear):
                out[f"model.layers.{i}.self_attn.{name}.lora_A"] = module.lora_A.weight
                out[f"model.layers.{i}.self_attn.{name}.lora_B"] = module.lora_B.weight
        experts = layer.mlp.experts
        present = [w for w in EXPERT_PARAMS if w in experts.lora]
        for which in present:
            nest = "base_layer." if which == "gate_up_proj" and len(present) == 2 else ""
            out[f"model.layers.{i}.mlp.experts.{nest}lora_A"] = experts.lora[which].A
            out[f"model.layers.{i}.mlp.experts.{nest}lora_B"] = experts.lora[which].B
    return out


def save_adapter(model: GptOss, folder: str | Path, base_model: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (fp32) exactly as PEFT does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.lora_config
    params = lora_parameters(model)
    modules = sorted({k.rsplit(".", 1)[0] for k in params if ".self_attn." in k})
    parameters = [f"{i}.mlp.experts.{w}" for i in cfg["expert_layers"] for w in EXPERT_PARAMS]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": 0.0,
        "target_modules": modules,
        "target_parameters": parameters,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {PREFIX + k + ".weight": p.detach().float().contiguous().cpu() for k, p in params.items()}
    # each file is written beside its final name and renamed into place: an interrupted or failed
    # save leaves the previous adapter whole and no partial file behind
    with replacing(folder / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with replacing(folder / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder


@contextlib.contextmanager
def replacing(path: Path):
    """Yield a temporary path beside `path`; on success rename it onto `path` (atomic), on any failure
    remove it and raise OSError naming `path` (the previous file, if any, is left as it was)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise OSError(f"could not write {path}: {why}") from None
        raise


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json, checked: a LoRA adapter with an integer rank and a finite alpha."""
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} holds a JSON {type(config).__name__}, expected an object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise AdapterError(f"{path}: rank_pattern, alpha_pattern and DoRA adapters are not supported")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"{path} lacks '{key}': it is not a complete PEFT LoRA config")
    try:
        check_int("r", config["r"], 1)
        check_float("lora_alpha", config["lora_alpha"], 0.0, above=True)
    except UsageError as e:
        raise AdapterError(f"{path}: {e}") from None
    return config


def load_adapter(model: GptOss, folder: str | Path) -> GptOss:
    """Attach a PEFT-format LoRA adapter (ours, or one made by peft on transformers' GptOssForCausalLM),
    checked against the model: every tensor must name a layer and a module the model has, with the
    shape the rank gives, and hold finite values."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist; pass the --output folder of a training run")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if (folder / name).exists() and not (folder / name).is_file():  # a pipe would block the read
            raise AdapterError(
                f"{folder / name} is not a regular file (a pipe, a device or a folder); re-save the adapter"
            )
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a PEFT adapter: {name} is missing")
    config = read_adapter_config(folder)
    r, alpha = config["r"], config["lora_alpha"]
    scaling_alpha = alpha * math.sqrt(r) if config.get("use_rslora") else alpha  # rsLoRA: s = alpha / sqrt(r)
    file = folder / "adapter_model.safetensors"
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise AdapterError(
            f"cannot read {file}: {e} -- the file is truncated or corrupt; re-save the adapter"
        ) from None
    layers = model.config.num_hidden_layers
    targets, expert_layers = set(), set()
    for key in sorted(tensors):
        m = re.fullmatch(
            r"base_model\.model\.model\.layers\.(\d+)\.(self_attn\.(\w+)|mlp\.experts(\.base_layer)?)\.lora_[AB]\.weight",
            key,
        )
        if m is None or (m[3] and m[3] not in ATTENTION):
            raise AdapterError(f"{file}: unexpected tensor {key}; expected LoRA weights of q/k/v/o_proj or mlp.experts")
        if int(m[1]) >= layers:
            raise AdapterError(
                f"{file}: tensor {key} is for layer {m[1]}, the model has {layers} layers (0..{layers - 1}): "
                "the adapter was trained on another model"
            )
        if not tensors[key].is_floating_point() or not bool(torch.isfinite(tensors[key]).all()):
            raise AdapterError(f"{file}: tensor {key} holds NaN, infinite or non-float values; the adapter is corrupt")
        # the rank side of every factor against r, before anything of r's size is allocated: A [rank, in],
        # B [out, rank]; the experts' factors hold all E experts' ranks side by side (rank E * r)
        rank = r if m[3] else r * model.config.num_local_experts
        t = tensors[key]
        if t.dim() != 2 or t.shape[0 if key.endswith("lora_A.weight") else 1] != rank:
            raise AdapterError(
                f"{file}: {key} has shape {list(t.shape)}, while r={r} (adapter_config.json) gives it a rank side of "
                f"{rank}: the adapter and its config disagree; re-save the adapter"
            )
        if m[3]:
            targets.add(m[3])
        else:
            expert_layers.add(int(m[1]))
    if not tensors:
        raise AdapterError(f"{file} holds no tensors; re-save the adapter")
    params = config.get("target_parameters") or []
    which_of = {
        i: [w for w in EXPERT_PARAMS if f"{i}.mlp.experts.{w}" in params] or list(EXPERT_PARAMS) for i in expert_layers
    }
    model.requires_grad_(False)
    for i, layer in enumerate(model.model.layers):
        for name in sorted(targets):
            if f"{PREFIX}model.layers.{i}.self_attn.{name}.lora_A.weight" in tensors:
                setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), r, scaling_alpha))
        for which in which_of.get(i, []):
            _attach_expert_lora(layer.mlp.experts, which, r, scaling_alpha)
    model.lora_config = {
        "r": r,
        "lora_alpha": alpha,
        "expert_layers": sorted(expert_layers),
        "targets": sorted(targets),
    }
    ours = lora_parameters(model)
    missing = sorted(set(ours) - {k.removeprefix(PREFIX).removesuffix(".weight") for k in tensors})
    if missing:
        raise AdapterError(f"{file} lacks {PREFIX + missing[0]}.weight (and {len(missing) - 1} more); re-save it")
    with torch.no_grad():
        for key, p in ours.items():
            t = tensors[PREFIX + key + ".weight"]
            if t.shape != p.shape:
                raise AdapterError(
                    f"{file}: {PREFIX + key}.weight has shape {list(t.shape)}, this model with r={r} (adapter_config."
                    f"json) expects {list(p.shape)}: the adapter and its config, or the adapter and the model, disagree"
                )
            p.copy_(t)
    return model


def merge_lora(model: GptOss) -> GptOss:
    """Fold the adapters into the weights: attention in place; adapted experts become dense (bf16 or
    the model dtype), since a LoRA delta is not representable in MXFP4 without re-quantizing."""
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ATTENTION:
                m = getattr(layer.self_attn, name)
                if isinstance(m, LoRALinear):
                    plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                    weight = m.weight.float() + m.scaling * (m.lora_B.weight @ m.lora_A.weight)
                    plain.weight = nn.Parameter(weight.to(m.weight.dtype), requires_grad=False)
                    plain.bias = m.bias
                    setattr(layer.self_attn, name, plain)
            experts = layer.mlp.experts
            if not experts.has_lora:
                continue
            experts.dequantize_()  # dense in the compute dtype (no-op when already dense)
            for which, lora in list(experts.lora.items()):
                dense = getattr(experts, which)
                merged = (dense.float() + lora.delta()).to(dense.dtype)
                setattr(experts, which, nn.Parameter(merged, requires_grad=False))
                del experts.lora[which]
    return model
