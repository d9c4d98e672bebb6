"""`load_model`: a local folder in any gpt-oss layout, or a hub id, to a ready model."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from gptoss.adapter import load_adapter
from gptoss.checkpoint import INDEX_FILE, CheckpointError, canonical_from_disk, open_checkpoint
from gptoss.config import ModelConfig
from gptoss.model import GptOss, RotaryEmbedding

BACKENDS = ("auto", "torch", "triton")
# Files fetched for a hub id: the HF MXFP4 root only (not original/ or metal/, which duplicate it).
HUB_PATTERNS = ["config.json", "generation_config.json", INDEX_FILE, "model*.safetensors"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


def download(repo_id: str) -> Path:
    """Fetch the files a gpt-oss hub repo needs (about 13 GB for 20b) into the HF cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, unknown repo: all end the same way for the user
        raise CheckpointError(
            f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download it where the hub is reachable and pass the local folder instead"
        ) from None


def resolve_source(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.exists() or not HUB_ID.fullmatch(str(source)):
        return path
    return download(str(source))


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, quantized: bool = True) -> str:
    """ "auto" is Triton on CUDA (for MXFP4 experts), the torch reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and quantized and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton, Linux)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs a CUDA device; on the CPU set TRITON_INTERPRET=1 (slow, for tests)"
            )
        if not quantized:
            raise ValueError(
                "backend='triton' needs MXFP4 experts: an MXFP4 checkpoint (not hf-bf16), loaded without dequantize=True"
            )
    return backend


def available_memory() -> int:
    """Bytes of memory that can be allocated without swapping (Linux MemAvailable, else free pages)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def dense_experts_bytes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Memory that holding every expert matrix dense in `dtype` adds over keeping it MXFP4."""
    n, E, D, I = config.num_hidden_layers, config.num_local_experts, config.hidden_size, config.intermediate_size
    elements = n * E * 3 * I * D
    return int(elements * (torch.finfo(dtype).bits / 8 - 4.25 / 8))


def check_finite(name: str, tensor: torch.Tensor, folder: Path) -> None:
    """Refuse NaN or infinite weights (a corrupt file: they would only surface as NaN logits), and
    MXFP4 scales of 0xFF, the E8M0 code for NaN."""
    if tensor.numel() == 0:
        return
    if tensor.is_floating_point():  # min and max propagate NaN: one pass, no boolean copy (~30 GB/s)
        bad = not all(bool(torch.isfinite(x)) for x in torch.aminmax(tensor))
    elif name.endswith("_scales"):
        bad = int(tensor.max()) == 255
    else:
        return
    if bad:
        raise CheckpointError(
            f"tensor {name} in {folder} holds NaN or infinite values: the file is corrupt; re-download or "
            "regenerate the checkpoint"
        )


def load_model(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    adapter: str | Path | None = None,
    dequantize: bool | str = False,
    prepack: bool | str = False,
) -> GptOss:
    """Load gpt-oss from `source`: a folder in the OpenAI `original/`, HF MXFP4 or HF bf16 layout,
    the root of a downloaded HF repo, or a hub id such as `openai/gpt-oss-20b`.

    Experts stay MXFP4 (uint8, memory-mapped) and are decoded per use; other weights are cast to
    `dtype` (no copy when it is the file's bf16); RMSNorm gains are kept in fp32. `adapter` is a
    PEFT-format LoRA folder (see gptoss.adapter). `dequantize=True` decodes the experts once at
    load and keeps them dense in `dtype` instead (3.8x their MXFP4 memory in bf16; the faster choice
    on a CPU when the model fits, as in Hugging Face's Mxfp4Config(dequantize=True); torch backend);
    "auto" does so when that takes at most half of the memory now available.
    `prepack=True` readies the weights for CPU inference (gptoss.cpu: same outputs, faster, no training);
    "auto" does so on a CPU with oneDNN when the experts are dense; when they stay MXFP4 (memory is
    short) it moves them to the native MXFP4 kernels (gptoss.native) and reads the other bf16 weights
    in place (gptoss.cpu.DirectLinear), copying nothing.
    Returns the model in eval mode, gradients off.
    """
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    device = torch.device(device)
    config, layout, index = open_checkpoint(resolve_source(source))
    if dequantize == "auto":
        dequantize = dense_experts_bytes(config, dtype) <= available_memory() / 2
    elif dequantize not in (True, False):
        raise ValueError(f"dequantize must be True, False or 'auto', got {dequantize!r}")
    backend = resolve_backend(backend, device, quantized=layout != "hf-bf16" and not dequantize)

    with torch.device("meta"):
        model = GptOss(config, quantized=layout != "hf-bf16")
    state = {}
    for name, tensor in canonical_from_disk(config, layout, index.get):
        check_finite(name, tensor, index.folder)
        if tensor.is_floating_point():
            keep_fp32 = name.endswith("layernorm.weight") or name == "model.norm.weight"
            tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
        state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = RotaryEmbedding(config)  # computed, not stored
    model = model.set_backend(backend).requires_grad_(False).eval().to(device)
    if dequantize:
        model.dequantize_experts()
    if adapter is not None:
        load_adapter(model, adapter)
    if prepack == "auto":
        from gptoss.cpu import available
        from gptoss.cpu import prepack as prepack_weights

        if device.type == "cpu" and available():
            # dense experts: everything prepacked; MXFP4 experts: those on the native kernels, the rest
            # read in place (copying it, 2.4 GB for gpt-oss-20b, would cost memory the model needs)
            dense = not any(layer.mlp.experts.quantized for layer in model.model.layers)
            prepack_weights(model, linears=dense and available(model.dtype))
    elif prepack not in (True, False):
        raise ValueError(f"prepack must be True, False or 'auto', got {prepack!r}")
    elif prepack:
        from gptoss.cpu import prepack as prepack_weights

        prepack_weights(model)
    return model
