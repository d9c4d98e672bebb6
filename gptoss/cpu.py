"""The CPU inference fast path: weights prepacked once for oneDNN's matmul kernels.

`torch.nn.functional.linear` on the CPU hands a plain [out, in] weight to oneDNN, which reorders it
into its blocked layout on every call. For the few-row products of decoding (one row per sequence,
a handful per expert) that reorder costs as much as the product itself. `prepack(model)` does it
once: every plain nn.Linear becomes a PackedLinear, and dense experts become PackedExperts, both
calling oneDNN with the blocked weight. In bf16 the model's outputs stay bitwise those of the
reference path (tested; in fp32, F.linear uses MKL instead, so they agree to rounding). On a 2-core
CPU the few-row matmuls of decoding got 1.4x-2x faster (benchmarks/bench_e2e.py has the totals).

MXFP4 experts that stay MXFP4 (a model larger than half the free memory when dense, as gpt-oss-20b
in 24 GB) become MXFP4Experts: the native C kernels of gptoss.native read the packed codes directly
(a few rows per expert, as in decoding) or decode each used expert once into a reused buffer for a
bf16 matmul (many rows, as in prefill). Their outputs equal the reference's within fp32 summation
order and one rounding (tested). Without the native kernels, MXFP4Experts decode with torch
operations into the same reused buffers (the reference decodes into fresh memory per use).

Small dense experts (the tiny presets) also run as one batched matmul over the experts in use, the
(token, slot) pairs sorted by expert (`sorted_runs`); the reference goes expert by expert.

A prepacked model is for inference on the CPU only: the packed weights are opaque oneDNN tensors
(no autograd, no state_dict, no .to(device)). Modules wrapped by a LoRA adapter are left as they are.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from gptoss import mxfp4
from gptoss.model import Attention, Experts, GptOss, experts_forward, swiglu


@functools.cache
def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build has the oneDNN (mkldnn) ops the fast path needs, and this CPU runs its
    prepacked product in `dtype`: oneDNN's bf16 one needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which
    many AVX2-only CPUs lack. Tried once on a 32 x 32 weight."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        with torch.no_grad():
            packed_linear(torch.ones(1, 32, dtype=dtype), pack_weight(torch.ones(32, 32, dtype=dtype)), None)
    except RuntimeError:
        return False
    return True


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """A dense [out, in] weight -> an opaque oneDNN tensor in the layout its matmul reads."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, bias) for `packed` = pack_weight(w); x [..., in] -> [..., out]."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("prepacked weights are for inference only: load the model without prepack to train")
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


class _InferenceOnly(nn.Module):
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(
            f"{prefix or 'this module'} holds weights prepacked for CPU inference, which are not a checkpoint: "
            "save from a model loaded without prepack"
        )


class PackedLinear(_InferenceOnly):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_weight(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


# Expert matrices up to this many elements are "small": a call per expert then costs more than the
# product itself, so several experts run as one batched matmul over their tokens, padded to the
# busiest expert's count (on this machine 2 calls of ~25 us instead of 8 of ~17 us for the tiny preset).
SMALL_EXPERT = 1 << 16
BATCH_FROM = 4  # experts in use, at least


def sorted_runs(ids_Tk: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The T*k (token, slot) pairs sorted by expert: (order [T*k], the pair at each sorted row; runs,
    (expert, first row, end) for each expert in use). Within a run, pairs keep token order."""
    flat = ids_Tk.flatten()
    order = torch.argsort(flat, stable=True)
    ends = torch.bincount(flat, minlength=num_experts).cumsum(0).tolist()
    runs = [(e, a, b) for e, (a, b) in enumerate(zip([0, *ends[:-1]], ends)) if b > a]
    return order, runs


class PackedExperts(_InferenceOnly):
    """Dense experts prepacked for oneDNN, with the reference's interface (linear, the biases, the
    forward of gptoss.model.Experts); small ones also kept dense, for batched matmuls."""

    quantized = False
    has_lora = False

    def __init__(self, experts: Experts):
        super().__init__()
        self.gate_up_proj_bias = experts.gate_up_proj_bias.detach()
        self.down_proj_bias = experts.down_proj_bias.detach()
        matrices = ("gate_up_proj", "down_proj")
        self.packed = {which: [pack_weight(w) for w in getattr(experts, which)] for which in matrices}
        self.small = experts.gate_up_proj[0].numel() <= SMALL_EXPERT
        if self.small:  # also kept dense, for the batched matmul (small by definition)
            self.dense = {which: getattr(experts, which).detach() for which in matrices}

    def linear(self, which: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed[which][e], getattr(self, which + "_bias")[e])

    def forward(
        self, x_TD: torch.Tensor, weights_Tk: torch.Tensor, ids_Tk: torch.Tensor, alpha: float, limit: float
    ) -> torch.Tensor:
        """gptoss.model.experts_forward on rows sorted by expert (sorted_forward); with small experts,
        those in use run as one batched matmul per matrix: run j's rows at rows j*width .. of a
        zero-padded [runs, width, in] batch (width: the busiest expert's count)."""
        order, runs = sorted_runs(ids_Tk, self.gate_up_proj_bias.shape[0])
        if not self.small or len(runs) < BATCH_FROM:
            return sorted_forward(self, x_TD, weights_Tk, order, runs, alpha, limit)
        width = max(b - a for _, a, b in runs)
        slots = torch.tensor([j * width + i for j, (_, a, b) in enumerate(runs) for i in range(b - a)])
        ids = [e for e, _, _ in runs]

        def batched(which: str, rows: torch.Tensor) -> torch.Tensor:  # rows [P, in] sorted -> [P, out]
            padded = rows.new_zeros(len(runs) * width, rows.shape[1]).index_copy_(0, slots, rows)
            weight, bias = self.dense[which], getattr(self, which + "_bias")
            if ids != list(range(weight.shape[0])):  # only the experts in use
                weight, bias = weight[ids], bias[ids]
            out = torch.baddbmm(bias.unsqueeze(1), padded.view(len(runs), width, -1), weight.transpose(1, 2))
            return out.view(len(runs) * width, -1)[slots]

        return sorted_forward(self, x_TD, weights_Tk, order, runs, alpha, limit, batched)


def sorted_forward(experts, x_TD, weights_Tk, order, runs, alpha, limit, matmul=None) -> torch.Tensor:
    """gptoss.model.experts_forward with the (token, slot) pairs sorted by expert (sorted_runs): each
    used expert's rows are one run, multiplied by `experts.linear` (or `matmul(which, rows)` for all
    runs at once), and one SwiGLU covers every row, where the reference loops over experts with a few
    dozen operations each. Bit for bit the reference on the same products (a run keeps token order)."""
    T, k = weights_Tk.shape

    def per_run(which: str, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([experts.linear(which, e, rows[a:b]) for e, a, b in runs])

    matmul = matmul or per_run
    h = matmul("gate_up_proj", x_TD.index_select(0, order // k))  # [T*k, 2I]
    y = matmul("down_proj", swiglu(h, alpha, limit)).float() * weights_Tk.flatten()[order].unsqueeze(-1)
    out = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, slot) order
    return out.view(T, k, -1).sum(dim=1).to(x_TD.dtype)


# Up to this many rows per expert, the native kernel reads the MXFP4 weight directly for every row
# block (decoding in registers); above it, the weight is decoded once into a reused buffer and the
# rows go through one bf16 matmul (long prefills). Measured on a 2-core AVX-512 CPU for a 5760 x 2880
# expert: fused 0.21 ms at 1 row, 0.50 at 4, 2.9 at 16, 5.9 at 32, 9.0 at 48, 12.2 at 64; decode +
# matmul 6.4 ms at 1 row, 8.4 at 32, 9.6 at 48, 10.7 at 64.
FUSED_ROWS = 48


class MXFP4Experts(_InferenceOnly):
    """MXFP4 experts with the reference's interface (linear, the biases, the forward of
    gptoss.model.Experts): the packed codes and scales are the model's own tensors (no copy). Few rows
    go to the native kernel (gptoss.native), which reads the codes directly; many rows, or every call
    when the native kernels are off, decode the expert once into a buffer reused by every call.
    `buffers` is shared by all the layers of a model (prepack passes one): experts run one at a time,
    and per layer they would cost 50 MB each for gpt-oss-20b, 1.2 GB in all."""

    quantized = True
    has_lora = False

    def __init__(self, experts: Experts, buffers: dict[str, dict] | None = None):
        super().__init__()
        self.gate_up_proj_bias = experts.gate_up_proj_bias.detach()
        self.down_proj_bias = experts.down_proj_bias.detach()
        matrices = ("gate_up_proj", "down_proj")
        self.codes = {
            which: (getattr(experts, which + "_blocks"), getattr(experts, which + "_scales")) for which in matrices
        }
        self.buffers = {which: {} for which in matrices} if buffers is None else buffers  # one decoded matrix per kind

    def linear(self, which: str, e: int, x: torch.Tensor) -> torch.Tensor:
        from gptoss import native

        blocks, scales = self.codes[which]
        bias = getattr(self, which + "_bias")[e]
        fast = native.available() and x.dtype in (torch.bfloat16, torch.float32)
        if fast and x.shape[0] <= FUSED_ROWS:
            return native.linear(x, blocks[e], scales[e], bias)
        buffers = self.buffers[which]
        weight = buffers.get("weight")
        shape = (scales.shape[1], scales.shape[2] * mxfp4.BLOCK)
        stale = weight is None or weight.dtype != x.dtype
        if fast:  # a buffer made under inference_mode cannot be written outside it
            if stale or (weight.is_inference() and not torch.is_inference_mode_enabled()):
                weight = buffers["weight"] = torch.empty(shape, dtype=x.dtype)
            weight = native.dequantize(blocks[e], scales[e], x.dtype, out=weight)
        else:  # the torch decode, into the same reused buffers (it checks them itself)
            weight = mxfp4.dequantize(blocks[e], scales[e], x.dtype, buffers)
        return F.linear(x, weight, bias)

    def forward(
        self, x_TD: torch.Tensor, weights_Tk: torch.Tensor, ids_Tk: torch.Tensor, alpha: float, limit: float
    ) -> torch.Tensor:
        """experts_forward; up to FUSED_ROWS bf16 tokens (decoding, short prompts) in one native call
        (gptoss.native.moe), where the loop over experts costs a few dozen torch operations each."""
        from gptoss import native

        if x_TD.dtype == torch.bfloat16 and x_TD.shape[0] <= FUSED_ROWS and native.bf16_dot():
            gate_up = (*self.codes["gate_up_proj"], self.gate_up_proj_bias)
            return native.moe(
                x_TD, weights_Tk, ids_Tk, gate_up, (*self.codes["down_proj"], self.down_proj_bias), alpha, limit
            )
        # many tokens (long prompts): expert by expert, each decoded once; sorted_forward would hold
        # every row's gate_up output at once (batch-8 prefill of gpt-oss-20b: peak RSS 14.9 -> 16.0 GB)
        return experts_forward(x_TD, weights_Tk, ids_Tk, self, alpha, limit)


# Up to this many rows, DirectLinear reads its bf16 weight in place with the native kernel; above, F.linear.
# F.linear first copies the whole weight into oneDNN's layout, which for a large weight is also memory:
# 1.16 GB for gpt-oss-20b's unembedding. Those stay native up to LARGE_ROWS (batch 8 decoding): on a
# 2-core AVX-512 VM the unembedding at 8 rows took 89 ms native against 75 ms for F.linear, for 1.16 GB
# less peak memory; at 4 rows 52 against 64 ms.
DIRECT_ROWS = 4
LARGE_WEIGHT, LARGE_ROWS = 1 << 28, 8


class DirectLinear(_InferenceOnly):
    """A bf16 nn.Linear whose few-row products (decoding) go to gptoss.native.bf16_linear, which reads
    the weight as stored (memory-mapped, never copied) instead of having oneDNN reorder it per call;
    more rows (prefill) take F.linear. For models whose experts stay MXFP4, where copying the other
    weights into oneDNN's layout (2.4 GB for gpt-oss-20b) would cost memory the model needs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gptoss import native

        rows = x.reshape(-1, x.shape[-1])
        limit = LARGE_ROWS if self.weight.numel() * self.weight.element_size() >= LARGE_WEIGHT else DIRECT_ROWS
        if rows.shape[0] > limit or x.dtype != torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        return native.bf16_linear(rows, self.weight, self.bias).view(*x.shape[:-1], self.out_features)


class DecodeAttention(Attention):
    """An Attention whose one-token steps (decoding on the fp32 CPU cache) run the native kernel
    (gptoss.native.decode_attention: one call where the reference takes about 15 torch operations);
    prompts take the reference. It is the prepacked model's own Attention, re-classed: the same
    parameters and submodules, not copies."""

    @classmethod
    def of(cls, attention: Attention) -> DecodeAttention:
        fast = cls.__new__(cls)
        fast.__dict__ = attention.__dict__  # nn.Module keeps its parameters, buffers and children there
        return fast

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
    ) -> torch.Tensor:
        from gptoss import native

        if q.shape[1] == 1 and k.dtype == torch.float32 and self.backend == "torch" and native.available():
            return native.decode_attention(q, k, v, self.sinks, q_pos, k_pos, self.window)
        return super().attend(q, k, v, q_pos, k_pos)


def prepack(model: GptOss, linears: bool = True) -> GptOss:
    """Prepack `model`'s weights for CPU inference, in place (module by module, so the peak memory
    is the model plus one layer's experts); returns it. MXFP4 experts go to the native kernels
    (gptoss.native) when they are built, and to torch decoding into reused buffers, with a note on
    stderr, when not.
    `linears=False` leaves the other weights where they are (no copy): in bf16, with the native bf16
    product built for this CPU, they become DirectLinear."""
    from gptoss import native

    if not available():
        raise RuntimeError("this PyTorch build has no oneDNN (mkldnn) support: run without prepacking")
    if model.device.type != "cpu":
        raise ValueError(f"prepacking is for models on the CPU; this one is on {model.device}")
    if model.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"prepacking supports bf16 and fp32 models, this one is {model.dtype}")
    packable = available(model.dtype)  # oneDNN's product in the model's dtype runs on this CPU
    if linears and not packable:
        raise RuntimeError(
            f"oneDNN's prepacked {model.dtype} product needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which this CPU "
            "lacks: load with prepack='auto' (which leaves those weights as they are) or dtype=torch.float32"
        )
    direct = not linears and model.dtype == torch.bfloat16 and native.bf16_dot()
    buffers: dict[str, dict] = {"gate_up_proj": {}, "down_proj": {}}  # the decode buffers of every layer
    for parent in list(model.modules()):
        if isinstance(parent, nn.Linear):  # a LoRA wrapper: its own factors stay trainable-shaped and plain
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and linears:  # exactly nn.Linear: LoRA wrappers and packed modules are skipped
                setattr(parent, name, PackedLinear(child))
            elif type(child) is nn.Linear and direct and child.in_features % 32 == 0:
                setattr(parent, name, DirectLinear(child))
            elif type(child) is Attention:
                setattr(parent, name, DecodeAttention.of(child))
            elif isinstance(child, Experts) and not child.quantized and not child.has_lora and packable:
                setattr(parent, name, PackedExperts(child))
            elif isinstance(child, Experts) and child.quantized and not child.has_lora and model.dtype != torch.float16:
                if not native.available():
                    native.tell_once()
                setattr(parent, name, MXFP4Experts(child, buffers))
    model.set_backend("torch")
    return model


__all__ = [
    "DecodeAttention",
    "DirectLinear",
    "MXFP4Experts",
    "PackedExperts",
    "PackedLinear",
    "available",
    "pack_weight",
    "packed_linear",
    "prepack",
    "sorted_forward",
    "sorted_runs",
]
