"""gpt-oss, the reference forward pass in plain PyTorch.

Read top to bottom: RMSNorm -> YaRN rotary embedding -> attention with learned sinks (sliding
window on some layers) -> top-k mixture of experts with the clamped SwiGLU -> the model.
The math follows OpenAI's reference (`gpt_oss/torch/model.py`); module and parameter names
follow the Hugging Face checkpoint (`model.layers.N.self_attn.q_proj.weight`, ...).

Shape legend: B batch, T tokens (queries), S keys, D hidden size, K KV heads, G query heads per
KV head, Dh head dim, E experts, k experts per token, I expert intermediate size, V vocabulary.
Dtype policy: weights and activations in the model dtype (bf16 by default); RMSNorm statistics,
rotary tables, the attention softmax (sinks included) and the router softmax in fp32.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gptoss import mxfp4
from gptoss.checkpointing import checkpointed
from gptoss.config import ModelConfig


class LayerKV(Protocol):
    """One layer's key/value cache as attention uses it (gptoss.generate.LayerCache): takes this
    step's keys, values and positions, returns every cached key, value and position."""

    def update(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class ModelKV(Protocol):
    """The whole model's cache (gptoss.generate.KVCache): one LayerKV per layer."""

    layers: Sequence[LayerKV]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        # the gain stays fp32 whatever the model dtype (it is stored bf16 on disk; both references upcast)
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.backend = "torch"  # "triton": the same math in gptoss.kernels.rmsnorm (one launch each way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from gptoss.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)  # plain gain, no (1 + g)


# ---------------------------------------------------------------------------------------------
# Rotary embedding with YaRN (NTK-by-parts interpolation + attention "concentration")
# ---------------------------------------------------------------------------------------------


def yarn_correction_range(config: ModelConfig) -> tuple[float, float]:
    """NTK-by-parts boundaries (fractional, never rounded) in units of rotary pair index: pairs that
    turn more than rope_ntk_beta times over the original context keep their frequency, those turning
    fewer than rope_ntk_alpha times are interpolated, the ones between blend."""

    def dim_for(rotations: float) -> float:
        ctx = config.initial_context_length
        return config.head_dim * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low, high = dim_for(config.rope_ntk_beta), dim_for(config.rope_ntk_alpha)
    return max(low, 0.0), min(high, config.head_dim - 1.0)


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequency of each rotary pair j = 0 .. Dh/2-1, and the concentration factor.

    Pairs below the correction range keep their original frequency (extrapolation), pairs above it
    are slowed down by the scaling factor (interpolation), pairs inside blend linearly. The range
    stays fractional (8.09 .. 17.40 for gpt-oss); rounding it is a known source of mismatches.
    """
    half = config.head_dim // 2
    base_freq = config.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / config.head_dim)
    extrapolation = 1.0 / base_freq
    factor = config.rope_scaling_factor
    if factor <= 1.0:
        return extrapolation.float(), 1.0
    interpolation = 1.0 / (factor * base_freq)
    low, high = yarn_correction_range(config)
    if high == low:
        high += 1e-3
    ramp = ((torch.arange(half, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = extrapolation * (1 - ramp) + interpolation * ramp
    concentration = 0.1 * math.log(factor) + 1.0  # multiplies cos and sin, so q.k grows by its square
    return inv_freq.float(), concentration


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.concentration = yarn_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [Dh/2] fp32

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] or [B, T] -> cos, sin [..., Dh/2] in fp32 (padding, position -1, gets angle 0)."""
        angles = positions.clamp(min=0).float().unsqueeze(-1) * self.inv_freq  # [..., T, Dh/2]
        return angles.cos() * self.concentration, angles.sin() * self.concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (j, j + Dh/2): the two halves of each head, not adjacent elements.

    x [B, T, ..., Dh]; cos, sin [T, Dh/2] or [B, T, Dh/2] (cast to x's dtype first, as both references do).
    """
    shape = (cos.shape[0] if cos.dim() == 3 else 1, x.shape[1]) + (1,) * (x.dim() - 3) + (x.shape[-1] // 2,)
    cos, sin = cos.to(x.dtype).view(shape), sin.to(x.dtype).view(shape)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention: grouped-query, learned per-head sinks, optional sliding window
# ---------------------------------------------------------------------------------------------


SCORE_ELEMENTS = 1 << 24  # scores one torch attention call holds at most (64 MB in fp32; see Attention.attend)


def attention_with_sinks(
    q: torch.Tensor,  # [B, T, K, G, Dh] rotated queries
    k: torch.Tensor,  # [B, S, K, Dh] rotated keys
    v: torch.Tensor,  # [B, S, K, Dh]
    sinks: torch.Tensor,  # [K*G] one logit per query head
    q_pos: torch.Tensor,  # [T] or [B, T] absolute positions of the queries
    k_pos: torch.Tensor,  # [S] or [B, S] absolute positions of the keys; negative = padding, never seen
    window: int | None,  # None: full causal; w: the w most recent keys, the current one included
) -> torch.Tensor:  # [B, T, K, G, Dh]
    B, T, K, G, Dh = q.shape
    S = k.shape[1]
    # GQA: the G query heads of a KV head are stacked along the query axis, so one matmul per KV head
    q_ = q.float().permute(0, 2, 3, 1, 4).reshape(B, K, G * T, Dh) / math.sqrt(Dh)  # [B, K, G*T, Dh], scaled
    scores = (q_ @ k.float().permute(0, 2, 3, 1)).view(B, K, G, T, S)  # [B, K, G, T, S]
    key, query = k_pos.unsqueeze(-2), q_pos.unsqueeze(-1)  # [.., 1, S], [.., T, 1]
    # a key is seen if it is not later than the query, within the window, and not padding (position -1)
    oldest = -1 if window is None else (query - window).clamp(min=-1)  # keys at or before this are not seen
    visible = (key > oldest) & (key <= query)  # [T, S] or [B, T, S]
    scores = scores.masked_fill(~visible.view(-1, 1, 1, T, S), float("-inf"))
    # The sink is one extra logit per head in the softmax, raw (not scaled by 1/sqrt(Dh)), with no
    # value vector: it only adds to the denominator, and a row whose keys are all masked is still defined.
    sink = sinks.float().view(1, K, G, 1, 1).expand(B, K, G, T, 1)
    probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :S]  # [B, K, G, T, S]
    out = probs.reshape(B, K, G * T, S) @ v.float().transpose(1, 2)  # [B, K, G*T, Dh]
    return out.view(B, K, G, T, v.shape[-1]).permute(0, 3, 1, 2, 4).to(q.dtype)  # [B, T, K, G, Dh]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.num_kv_heads = config.num_key_value_heads
        self.group = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.q_proj = nn.Linear(config.hidden_size, config.q_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_dim, bias=True)
        self.o_proj = nn.Linear(config.q_dim, config.hidden_size, bias=True)
        self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads))
        self.backend = "torch"  # "triton": gptoss.kernels.attention (tiled, scores never stored) and .rope

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        B, T, D = x.shape
        K, G, Dh = self.num_kv_heads, self.group, self.head_dim
        q = self.q_proj(x).view(B, T, K, G, Dh)  # query head h = kv_head * G + g
        k = self.k_proj(x).view(B, T, K, Dh)
        v = self.v_proj(x).view(B, T, K, Dh)
        if self.backend == "triton":  # the same rotation in one kernel per tensor (gptoss.kernels.rope)
            from gptoss.kernels.rope import rotary

            q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_pos = positions
        if cache is not None:  # earlier keys (after RoPE) and values, plus these: see gptoss/generate.py
            k, v, k_pos = cache.update(k, v, positions)  # [B, S, K, Dh] x 2, [B, S]
        out = self.attend(q, k, v, positions, k_pos)  # [B, T, K, G, Dh]
        return self.o_proj(out.reshape(B, T, K * G * Dh))  # [B, T, D]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
    ) -> torch.Tensor:
        """Attention proper on rotated queries and every key and value seen: attention_with_sinks,
        or on the triton backend the same math in gptoss.kernels.attention (tiled: scores never stored).
        The torch path takes the queries in chunks of at most SCORE_ELEMENTS scores each (each query's
        softmax is its own), so a long prompt's workspace grows with its length, not its square."""
        if self.backend == "triton":
            from gptoss.kernels.attention import attention_with_sinks as kernel

            return kernel(q, k, v, self.sinks, q_pos, k_pos, self.window)
        B, T, K, G, _ = q.shape
        rows = max(1, SCORE_ELEMENTS // (B * K * G * k.shape[1]))
        if T <= rows:
            return attention_with_sinks(q, k, v, self.sinks, q_pos, k_pos, self.window)
        chunks = [
            attention_with_sinks(q[:, i : i + rows], k, v, self.sinks, q_pos[..., i : i + rows], k_pos, self.window)
            for i in range(0, T, rows)
        ]
        return torch.cat(chunks, dim=1)


# ---------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------


def swiglu(h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on [..., 2I] -> [..., I].

    Gate and linear columns are interleaved (even = gate, odd = linear), not two halves. The gate
    is clamped from above only, the linear part on both sides, and the linear part gets a +1.
    """
    gate, linear = h.unflatten(-1, (-1, 2)).unbind(-1)  # columns 0, 2, 4, ... and 1, 3, 5, ...
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the raw router logits [T, E], then softmax over those k only: (weights fp32 [T, k], ids [T, k])."""
    top_logits, top_ids = torch.topk(logits, k, dim=-1)
    return torch.softmax(top_logits.float(), dim=-1), top_ids


class Experts(nn.Module):
    """The E experts of one layer, weights kept as the checkpoint holds them, oriented [out, in].

    MXFP4 checkpoints: `gate_up_proj_blocks` [E, 2I, D/32, 16] and `gate_up_proj_scales` [E, 2I, D/32]
    (uint8), `down_proj_blocks` [E, D, I/32, 16] and `down_proj_scales` [E, D, I/32].
    bf16 checkpoints: dense `gate_up_proj` [E, 2I, D] and `down_proj` [E, D, I] (transposed at load
    from Hugging Face's [E, in, out]). Biases `gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, D].
    """

    def __init__(self, config: ModelConfig, quantized: bool = True):
        super().__init__()
        E, D, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.quantized = quantized
        if quantized:
            if not config.mxfp4_compatible:
                raise ValueError(f"MXFP4 experts need hidden_size ({D}) and intermediate_size ({I}) divisible by 32")
            u8 = torch.uint8
            self.register_buffer("gate_up_proj_blocks", torch.zeros(E, 2 * I, D // 32, 16, dtype=u8))
            self.register_buffer("gate_up_proj_scales", torch.zeros(E, 2 * I, D // 32, dtype=u8))
            self.register_buffer("down_proj_blocks", torch.zeros(E, D, I // 32, 16, dtype=u8))
            self.register_buffer("down_proj_scales", torch.zeros(E, D, I // 32, dtype=u8))
        else:
            self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, D))
            self.down_proj = nn.Parameter(torch.zeros(E, D, I))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, D))
        # LoRA adapters by matrix name ("gate_up_proj", "down_proj"): gptoss.adapter.ExpertLoRA modules,
        # attached by gptoss.adapter (empty: no adapter). The torch path, the CPU path and the kernels read them.
        self.lora = nn.ModuleDict()

    @property
    def has_lora(self) -> bool:
        return len(self.lora) > 0

    def dequantize_(self) -> None:
        """Decode all E experts once and keep them dense in the compute dtype (3.8x the memory of
        MXFP4 in bf16): a CPU with the memory to spare then runs plain matmuls instead of decoding
        each routed expert on every use. The MXFP4 buffers are released."""
        if not self.quantized:
            return
        dtype = self.gate_up_proj_bias.dtype
        for which in ("gate_up_proj", "down_proj"):
            blocks, scales = getattr(self, which + "_blocks"), getattr(self, which + "_scales")
            dense = torch.empty((*scales.shape[:-1], scales.shape[-1] * mxfp4.BLOCK), dtype=dtype, device=blocks.device)
            workspace: dict = {}  # expert by expert into the same buffers: the peak is one expert's decode
            for e in range(dense.shape[0]):
                dense[e] = mxfp4.dequantize(blocks[e], scales[e], dtype, workspace)
            delattr(self, which + "_blocks")
            delattr(self, which + "_scales")
            setattr(self, which, nn.Parameter(dense, requires_grad=False))
        self.quantized = False

    def weight(self, which: str, e: int) -> torch.Tensor:
        """Expert e's `which` matrix in the compute dtype: "gate_up_proj" [2I, D] or "down_proj" [D, I].
        MXFP4 is decoded here, per use."""
        dtype = self.gate_up_proj_bias.dtype
        if not self.quantized:
            return getattr(self, which)[e].to(dtype)  # a view when already in the compute dtype
        return mxfp4.dequantize(getattr(self, which + "_blocks")[e], getattr(self, which + "_scales")[e], dtype)

    def linear(self, which: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] through expert e's `which` matrix and bias (and its LoRA update, when attached)."""
        y = F.linear(x, self.weight(which, e), getattr(self, which + "_bias")[e])
        return y + self.lora[which](e, x) if which in self.lora else y

    def forward(
        self, x_TD: torch.Tensor, weights_Tk: torch.Tensor, ids_Tk: torch.Tensor, alpha: float, limit: float
    ) -> torch.Tensor:
        return experts_forward(x_TD, weights_Tk, ids_Tk, self, alpha, limit)


def experts_forward(
    x_TD: torch.Tensor, weights_Tk: torch.Tensor, ids_Tk: torch.Tensor, experts: Experts, alpha: float, limit: float
) -> torch.Tensor:
    """out[t] = sum over slots s of weights[t, s] * expert_{ids[t, s]}(x[t]), x [T, D] -> [T, D].

    Expert by expert: the tokens routed to it go through gate_up, the clamped SwiGLU and down, one
    matmul each, so a used expert is decoded once and an unused one costs nothing. The reference of
    the Triton kernels (gptoss.kernels.moe) and of the CPU fast path (gptoss.cpu)."""
    T, k = ids_Tk.shape
    out = x_TD.new_zeros(T, k, x_TD.shape[1], dtype=torch.float32)  # one row per (token, slot)
    for e in ids_Tk.unique().tolist():
        tokens, slots = torch.where(ids_Tk == e)  # in token order; a token picks an expert at most once
        h = experts.linear("gate_up_proj", e, x_TD[tokens])  # [n, 2I]
        y = experts.linear("down_proj", e, swiglu(h, alpha, limit))  # [n, D]
        # the routing weight multiplies the whole expert output, second bias included; summed in fp32
        out[tokens, slots] = y.float() * weights_Tk[tokens, slots].unsqueeze(-1)
    return out.sum(dim=1).to(x_TD.dtype)


_TOLD: set[str] = set()


def _tell_once(message: str) -> None:
    if message not in _TOLD:
        _TOLD.add(message)
        print(message, file=sys.stderr)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, quantized: bool = True):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=True)
        self.experts = Experts(config, quantized)
        self.backend = "torch"  # "triton": the same math in gptoss.kernels.moe (sorted, fused, MXFP4 in registers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x_TD = x.reshape(B * T, D)
        if self.backend == "triton" and self.experts.quantized:  # adapters or not: they join the kernels
            from gptoss.kernels.moe import moe

            return moe(x_TD, self.router(x_TD), self.top_k, self.experts, self.alpha, self.limit).view(B, T, D)
        if self.backend == "triton":  # merged adapters made this layer's experts dense: said once per process
            _tell_once(
                "gptoss: MoE layers with dense experts (adapters merged into them) run on the torch path, "
                "not the MXFP4 Triton kernels"
            )
        weights_Tk, ids_Tk = route(self.router(x_TD), self.top_k)
        return self.experts(x_TD, weights_Tk, ids_Tk, self.alpha, self.limit).view(B, T, D)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, quantized: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, quantized)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
        # the last step saves nothing for backward: a checkpointed layer's recomputation does not need the
        # MoE output (gptoss.checkpointing), and the triton path skips making it there
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, quantized: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, quantized) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class GptOss(nn.Module):
    """input_ids [B, T] -> logits [B, T, V]. Untied embedding and unembedding; no bias on the latter."""

    def __init__(self, config: ModelConfig, quantized: bool = True):
        super().__init__()
        self.config = config
        self.backend = "torch"
        self.gradient_checkpointing = False
        self.model = Decoder(config, quantized)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the embedding; RMSNorm gains stay fp32)."""
        return self.model.embed_tokens.weight.dtype

    def set_backend(self, backend: str) -> GptOss:
        """ "torch" (the reference) or "triton" (attention, RoPE, MoE and RMSNorm kernels; the MoE kernels
        need MXFP4 experts)."""
        if backend == "triton" and not all(layer.mlp.experts.quantized for layer in self.model.layers):
            raise ValueError("the Triton MoE kernels need MXFP4 experts; this model holds dense (bf16) experts")
        self.backend = backend
        for layer in self.model.layers:
            layer.self_attn.backend = layer.mlp.backend = backend
        for norm in self.modules():
            if isinstance(norm, RMSNorm):
                norm.backend = backend
        return self

    def dequantize_experts(self) -> GptOss:
        """Hold every expert dense in the model dtype from now on (see Experts.dequantize_); torch backend only."""
        for layer in self.model.layers:
            layer.mlp.experts.dequantize_()
        return self.set_backend("torch")

    def hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: ModelKV | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """The final-normed hidden states [B, T, D] (the trainer applies lm_head to supervised positions only).
        `check=False` skips the input checks, which read the ids on the host: a CUDA graph step must not."""
        if check:
            check_input_ids(input_ids, self.config)
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)  # [B, T, D], no scaling
        cos, sin = self.model.rotary_emb(positions)  # [(B,) T, Dh/2] each, fp32
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # as apply_rotary would, once for all layers
        for i, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and torch.is_grad_enabled():  # recompute each layer in backward
                x = checkpointed(layer, x, cos, sin, positions, layer_cache)
            else:
                x = layer(x, cos, sin, positions, layer_cache)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: ModelKV | None = None,
        last_only: bool = False,
        check: bool = True,
    ) -> torch.Tensor:
        """`positions` [T] or [B, T] default to 0..T-1; -1 marks a padding token (never attended to).
        `cache` (a gptoss.generate.KVCache) holds earlier tokens' keys and values and is extended.
        `last_only` returns the logits of the last position only, [B, 1, V] (what decoding needs)."""
        x = self.hidden(input_ids, positions, cache, check)
        if last_only:
            x = x[:, -1:]  # [B, 1, D]
        B, T, D = x.shape
        return self.lm_head(x.reshape(B * T, D)).view(B, T, -1)  # [B, T, V]; 2-D, so no copy of the weight


def check_input_ids(input_ids: torch.Tensor, config: ModelConfig) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        found = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, tokens] tensor, got {found}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids (int64), got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"{input_ids.shape[1]} tokens exceed the context of {config.max_position_embeddings}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), found values in [{lo}, {hi}]")
