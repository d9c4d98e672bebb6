"""One MoE layer (routing + both expert matmuls + SwiGLU + combine), tokens swept 1 .. 16384.

    python benchmarks/bench_moe.py                 # on an H100: gpt-oss-20b and -120b expert shapes
    python benchmarks/bench_moe.py --quick         # fewer token counts
    python benchmarks/bench_moe.py --train         # prefill sizes, forward and backward (a training step's MoE)
    GPTOSS_MOE_CONFIG=64,64,64,4,3 python benchmarks/bench_moe.py   # pin one kernel config

Providers, all in the same process on the same weights and routing:
  triton             gptoss.kernels.moe: sorted pairs, MXFP4 decoded in registers, fused SwiGLU (GPU only)
  torch-mxfp4        the reference: per used expert, dequantize to bf16 then two matmuls
  torch-bf16-loop    the same loop over experts with weights already dense in bf16 (2 B per weight)
  torch-grouped-mm   torch._grouped_mm on dense bf16 weights, pairs sorted by expert (where it exists)
  triton (row tiles fastest)   at 1,024+ tokens: triton with its programs in their order before groups of
                     row tiles (all row tiles against one column tile at a time), on the same tiles
  triton (two stages)  at 4,096 tokens, forward: triton on the tiles its autotuners chose, on two stages (a
                     trip then waits for the copies the trip before sent; CONFIGS' comment in kernels/moe.py)
Routing is top-4 of router logits computed from random activations and a random router, so experts
get roughly equal, randomly varying loads, as in a trained model without heavy skew.
TFLOP/s counts 2 x pairs x (D x 2I + I x D); GB/s counts the MXFP4 bytes of the experts actually used
plus the activations read and written (the minimum any implementation must move), so every provider
is measured against the same work; % roofline is against an H100 SXM (989.5 TFLOP/s, 3.35 TB/s).
copy_pct is GB/s against the copy bandwidth measured at the start of the same run (the decode goal:
75% or more for triton); on a GPU, rows of up to 16 tokens are also replayed as a CUDA graph
(graph_ms, graph_copy_pct: routing and both matmuls without the host, as a decode step pays them) for
the providers that never synchronise (triton, torch-grouped-mm); vs_grouped_mm is torch-grouped-mm's time over this provider's at the same
token count (the prefill goal: 0.5 or more for triton, MXFP4 against dense bf16).
Without a GPU: small shapes, torch providers only, and the GPU figures are reported as not taken.

--train times what a LoRA step pays for the layer: forward, then the backward to the input and the
router logits (the expert weights frozen), at prefill sizes, for the providers with a backward on the
GPU (triton: its two backward kernels; torch-grouped-mm: autograd through torch._grouped_mm). Rows
carry pass = "forward+backward"; TFLOP/s counts twice the forward's products (the input's gradient
goes through both matrices again) and vs_grouped_mm compares like with like.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from results import RESULTS_DIR, copy_bandwidth_gbs, machine, plot, record, roofline, table, time_graph_ms, time_ms

from gptoss import mxfp4
from gptoss.config import ModelConfig, get_preset
from gptoss.model import Experts, experts_forward, route, swiglu

# decode-sized rows are also timed as one CUDA-graph replay (routing inside), for the providers that
# never synchronise with the host; the torch loops read each expert's rows on the host
GRAPH_TOKENS = 16
GRAPHED = ("triton", "torch-grouped-mm")


def random_experts(config: ModelConfig, device: str) -> Experts:
    experts = Experts(config, quantized=True).to(device)
    with torch.no_grad():
        for name, b in experts.named_buffers():
            b.copy_(torch.randint(0, 256, b.shape) if name.endswith("blocks") else torch.randint(119, 123, b.shape))
        experts.gate_up_proj_bias.normal_(0, 0.1)
        experts.down_proj_bias.normal_(0, 0.1)
    return experts.to(torch.bfloat16).requires_grad_(False)


def dense_copy(experts: Experts, config: ModelConfig) -> Experts:
    dense = Experts(config, quantized=False).to(experts.gate_up_proj_bias.device, torch.bfloat16)
    with torch.no_grad():
        dense.gate_up_proj.copy_(mxfp4.dequantize(experts.gate_up_proj_blocks, experts.gate_up_proj_scales))
        dense.down_proj.copy_(mxfp4.dequantize(experts.down_proj_blocks, experts.down_proj_scales))
        dense.gate_up_proj_bias.copy_(experts.gate_up_proj_bias)
        dense.down_proj_bias.copy_(experts.down_proj_bias)
    return dense.requires_grad_(False)


def grouped_mm_moe(x, weights, ids, w1_EDF, b1, w2_EIF, b2):
    """Dense bf16 experts through torch._grouped_mm: sort pairs by expert, two grouped GEMMs, combine.
    No host synchronisation (the per-expert counts by a scatter-add of fixed size, not bincount, whose
    output size is read on the host), so it runs inside a CUDA graph as the Triton provider does."""
    T, k = ids.shape
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w1_EDF.shape[0], dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // k]  # [P, D] rows grouped by expert
    experts = flat[order]
    h = torch._grouped_mm(xs, w1_EDF, offs=offs) + b1[experts]  # [P, 2I]
    y = torch._grouped_mm(swiglu(h), w2_EIF, offs=offs) + b2[experts]  # [P, D]
    y = y.float() * weights.flatten()[order, None]
    return torch.zeros(T, x.shape[1], device=x.device).index_add_(0, order // k, y).to(x.dtype)


ROW_TILES_FASTEST = "triton (row tiles fastest)"  # prefill rows: the programs' order before groups


def row_tiles_fastest(fn):
    """`fn` with the MoE kernels' programs in their order before groups of row tiles: one group of every
    row tile, so row tiles fastest over the whole grid (gptoss.kernels.moe._program_tile), timed beside
    the groups in the same run on the same tiles (the autotuner's choice is kept)."""
    from gptoss.kernels import moe as moe_kernels

    def run():
        saved, moe_kernels.GROUP_ROWS = moe_kernels.GROUP_ROWS, 1 << 30
        try:
            return fn()
        finally:
            moe_kernels.GROUP_ROWS = saved

    return run


TWO_STAGES = "triton (two stages)"  # at TWO_STAGES_TOKENS: the autotuners' choices on two stages
TWO_STAGES_TOKENS = 4096


def on_two_stages(fn):
    """`fn` with every choice the MoE kernels' autotuners hold put on two stages while it runs (Triton
    launches a key's cached choice), the choices and each tuner's best_config put back afterwards, also
    after a failure: the tiles the triton provider timed, with the pipelining the kernels left behind."""
    from gptoss.kernels.moe import KERNELS

    def run():
        choices = {name: dict(tuner.cache) for name, tuner in KERNELS.items()}
        best = {name: getattr(tuner, "best_config", None) for name, tuner in KERNELS.items()}
        try:
            for name, tuner in KERNELS.items():
                for key, config in choices[name].items():
                    two = copy.copy(config)
                    two.num_stages = 2
                    tuner.cache[key] = two
            return fn()
        finally:
            for name, tuner in KERNELS.items():
                tuner.cache.clear()
                tuner.cache.update(choices[name])
                tuner.best_config = best[name]

    return run


def _with_backward(forward, x, logits, grad):
    """A provider's forward, run with gradients to x and the router logits, then the backward of `grad`:
    what a training step pays for the layer (its expert weights frozen). Returns the output, detached."""

    def run():
        xg, lg = x.detach().requires_grad_(), logits.detach().requires_grad_()
        out = forward(xg, lg)
        out.backward(grad)
        return out.detach()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer token counts")
    parser.add_argument(
        "--train", action="store_true", help="prefill sizes, forward and backward to the input and the router logits"
    )
    parser.add_argument("--presets", default=None, help="comma-separated expert shapes (default: 20b,120b on GPU)")
    args = parser.parse_args()
    if args.presets is not None:
        from gptoss.config import PRESETS

        for name in args.presets.split(","):
            if name not in PRESETS:
                parser.error(f"unknown preset {name!r} in --presets: choose from {', '.join(PRESETS)}")

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if gpu:
        names = (args.presets or "gpt-oss-20b,gpt-oss-120b").split(",")
        configs = {n: get_preset(n) for n in names}
        tokens = [1, 4, 16, 64, 256, 1024, 4096, 16384] if not args.quick else [1, 64, 4096]
        if args.train:
            tokens = [1024, 4096, 16384] if not args.quick else [4096]
    else:  # a 2-core CPU: gpt-oss's routing (E=32, top-4) at a small width
        configs = {"small (D=I=256, E=32)": ModelConfig(hidden_size=256, intermediate_size=256, num_local_experts=32)}
        tokens = [1, 4, 16, 64, 256] if not args.quick else [1, 16, 64]
        if args.train:
            tokens = [64, 256] if not args.quick else [64]
    passes = "forward+backward" if args.train else "forward"

    copy_gbs = copy_bandwidth_gbs(device)
    print(f"copy bandwidth on {device}: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows = []
    for name, config in configs.items():
        D, I, E, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
        experts = random_experts(config, device)
        dense = dense_copy(experts, config)
        w1_EDF = dense.gate_up_proj.transpose(1, 2).contiguous()  # [E, D, 2I] for grouped_mm
        w2_EIF = dense.down_proj.transpose(1, 2).contiguous()  # [E, I, D]
        router = torch.randn(E, D, device=device, dtype=torch.bfloat16) / D**0.5
        expert_bytes = 3 * I * D * (0.5 + 1 / 32)  # packed codes + scales of one expert's two matrices
        for T in tokens:
            x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
            logits = x @ router.T
            weights, ids = route(logits, k)
            used = int((torch.bincount(ids.flatten(), minlength=E) > 0).sum())
            flops = 2 * T * k * 3 * I * D * (2 if args.train else 1)
            nbytes = used * expert_bytes + 2 * T * D * 2
            providers = {}
            if not args.train:  # the torch loops read each expert's rows on the host: no training path here
                providers["torch-mxfp4"] = lambda: experts_forward(x, *route(logits, k), experts, 1.702, 7.0)
                providers["torch-bf16-loop"] = lambda: experts_forward(x, *route(logits, k), dense, 1.702, 7.0)
            if hasattr(torch, "_grouped_mm"):
                providers["torch-grouped-mm"] = lambda x=x, logits=logits: grouped_mm_moe(
                    x, *route(logits, k), w1_EDF, dense.gate_up_proj_bias, w2_EIF, dense.down_proj_bias
                )
            if gpu:
                from gptoss.kernels.moe import autotuned, chosen_tiles, moe

                providers["triton"] = lambda x=x, logits=logits: moe(x, logits, k, experts)
            if args.train:  # each call: the forward with gradients, then the backward of a fixed gradient
                grad = torch.randn(T, D, device=device, dtype=torch.bfloat16)
                providers = {p: _with_backward(fn, x, logits, grad) for p, fn in providers.items()}
            if gpu and T >= 1024:  # where the activations outgrow the L2 (see _program_tile); the whole call
                providers[ROW_TILES_FASTEST] = row_tiles_fastest(providers["triton"])  # (--train: its backward too)
            if gpu and T == TWO_STAGES_TOKENS and not args.train:  # after "triton", whose choices it takes; the
                # forward only: --train's step has a minute for three sizes' autotuning of four kernels
                providers[TWO_STAGES] = on_two_stages(providers["triton"])
            reference = experts_forward(x.float(), weights, ids, copy.deepcopy(experts).float(), 1.702, 7.0)
            for provider, fn in providers.items():
                if provider == "triton":
                    before = autotuned()
                with torch.set_grad_enabled(args.train):
                    err = (fn().float() - reference).abs().max().item() / reference.abs().max().item()
                    t = time_ms(fn, reps=5 if not gpu and T >= 256 else 10)
                row = {"shape": name, "tokens": T, "experts_used": used, "provider": provider, "pass": passes}
                row |= {"device": device, **t}
                perf = roofline(flops, nbytes, t["ms"])
                row |= {"tflops": perf["tflops"], "gbs": perf["gbs"], "copy_pct": 100 * perf["gbs"] / copy_gbs}
                row["rel_err_vs_fp32"] = err
                if provider == "triton":  # the tiles its autotuners chose here, and what each tile they timed took
                    row["autotune"] = chosen_tiles(since=before)
                    row["tiles"] = " ".join(
                        f"{k}:{'x'.join(map(str, v['tile'][:3]))}{'s' if len(v['tile']) > 5 else ''}"
                        for k, v in row["autotune"].items()
                    )
                if gpu:
                    row["roofline_pct"] = perf["roofline_pct"]
                    if T <= GRAPH_TOKENS and provider in GRAPHED:  # decode: the GPU's time, not the host's
                        with torch.no_grad():
                            row["graph_ms"] = time_graph_ms(fn)
                        row["graph_copy_pct"] = 100 * roofline(flops, nbytes, row["graph_ms"])["gbs"] / copy_gbs
                rows.append(row)
            same = [r for r in rows if r["shape"] == name and r["tokens"] == T]
            grouped = next((r["ms"] for r in same if r["provider"] == "torch-grouped-mm"), None)
            for r in same:
                r["vs_grouped_mm"] = grouped / r["ms"] if grouped else None
            print(f"{name}: {T} tokens done", flush=True)
    cols = [
        "shape",
        "tokens",
        "experts_used",
        "provider",
        "pass",
        "ms",
        "tflops",
        "gbs",
        "copy_pct",
        "vs_grouped_mm",
        "roofline_pct",
        "rel_err_vs_fp32",
    ]
    if gpu:
        cols[6:6] = ["graph_ms", "graph_copy_pct"]
        cols.append("tiles")  # x: M x N x K; s: swapped
    print(table(rows, cols))
    if not gpu:
        print(
            "no CUDA device: torch providers on the CPU at a small width; the Triton kernel's GPU figures were not taken"
        )
    print(f"machine: {machine()}")
    record("moe", rows, copy_bandwidth_gbs=copy_gbs)
    png = plot(
        rows,
        "tokens",
        "tflops",
        "provider",
        RESULTS_DIR / ("moe-train.png" if args.train else "moe.png"),
        f"MoE layer ({passes}), {device}, {', '.join(configs)}",
    )
    print(f"results appended to {RESULTS_DIR / 'moe.jsonl'}" + (f"; plot {png}" if png else ""))
    print(json.dumps({"bench": "moe", "results": rows}))


if __name__ == "__main__":
    main()
