"""transformers' GptOssForCausalLM as an oracle: a random model built by transformers, exported in
our canonical tensor names so the very same weights can be written in each checkpoint layout."""

from __future__ import annotations

import torch

from gptoss import mxfp4
from gptoss.checkpoint_write import hf_config_json
from gptoss.config import ModelConfig


def build_hf_model(config: ModelConfig, seed: int = 0, mxfp4_grid: bool = True):
    """A random transformers GptOssForCausalLM (fp32, eager) whose weights are bf16-exact and whose
    experts lie on the MXFP4 grid, so every checkpoint layout represents it without loss."""
    from transformers import GptOssConfig, GptOssForCausalLM

    hf_json = hf_config_json(config, quantized=False)
    hf_json.pop("architectures")
    hf_json.pop("model_type")
    for key in ("pad_token_id", "eos_token_id"):  # the special ids lie outside a small test vocabulary
        hf_json.pop(key, None)
    hf_json["rope_parameters"] = dict(hf_json.pop("rope_scaling"), rope_theta=hf_json.pop("rope_theta"))
    hf_config = GptOssConfig(**hf_json)
    hf_config._attn_implementation = "eager"
    hf_config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = GptOssForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                fan_in = p.shape[1]  # HF stores experts [E, in, out]
            scale = {1: 0.1}.get(p.dim(), fan_in**-0.5)
            if "layernorm" in name or name == "model.norm.weight":
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("sinks") or "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
            if mxfp4_grid and (name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")):
                blocks, scales = mxfp4.quantize(p.transpose(1, 2))  # ours is [E, out, in]
                p.copy_(mxfp4.dequantize(blocks, scales, torch.float32).transpose(1, 2))
            p.copy_(p.bfloat16().float())
    return model


def canonical_tensors(hf_model) -> dict[str, torch.Tensor]:
    """The HF model's weights in canonical (HF MXFP4) names, experts quantized (exactly) to MXFP4."""
    out = {}
    for name, p in hf_model.state_dict().items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            blocks, scales = mxfp4.quantize(p.transpose(1, 2))
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
        else:
            out[name] = p.bfloat16()
    return out
