"""One LoRA training step, ours against transformers + peft, same config, batch and adapters.

    python benchmarks/bench_train.py --quick      # tiny config
    python benchmarks/bench_train.py              # tiny and mid
    python benchmarks/bench_train.py --all-positions   # loss on every position of random tokens
    python benchmarks/bench_train.py --config gpt-oss-20b,gpt-oss-120b   # the recipe at real size

`--config` runs the recipe's step at real size on the device at hand: the model drawn directly on the
device (gptoss.synthetic.random_model: random MXFP4 experts, no checkpoint on disk), one row of
`--seq` tokens (default 2048) packed from the bundled Harmony rows (loss on their assistant tokens),
LoRA r 8 / alpha 16 on q/k/v/o and the experts of the default layers (7, 15, 23 of 24), per-layer
activation checkpointing, AdamW, bf16 weights on a GPU (the trainer's `--dtype auto`). Reported per
config: step time (median of `--steps` after a warm-up), the warm-up step itself (`first_step_s`:
where a GPU compiles and autotunes the kernels), tokens/s, model FLOPs and MFU against
`--peak-tflops`, peak memory (allocated and reserved) beside the memory model's estimate, and a
torch.profiler table of one step's top kernels; then the same step with transformers + PEFT for the
configs in `--compare` (the recipe's way: experts dequantized to dense bf16, eager attention, gradient
checkpointing). A config that cannot fit the device is reported as skipped, with the reason.

Both train LoRA r=8 / alpha 16 on q/k/v/o and on the experts of the default layers (the last of each
third of the depth), with AdamW, without activation checkpointing: fp32 on the CPU; bf16 on a GPU,
where model and batch live on the device, step times are taken between synchronisations and the
peak GPU memory is reported beside the host's.
The batch is the first `--batch` rows of the bundled training set rendered in Harmony, the loss on
the assistant's tokens only (reasoning and answer, about a third of each row), as each
implementation is used for it: our trainer's step (gptoss.train.trainer.sum_loss, which applies the
unembedding to the supervised positions only, fused with the cross-entropy: train/loss.py) and
transformers' `model(input_ids, labels=...)`
with -100 on the other positions. `--all-positions` measures random tokens with the loss on every
position instead, where that difference does not apply. Reported: median step time over 5 steps
after a warm-up, and peak resident memory during the runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
import traceback
from pathlib import Path

import torch
from results import PeakRSS, machine, record, table

from gptoss import get_preset, load_model
from gptoss.adapter import apply_lora, default_expert_layers
from gptoss.config import ModelConfig
from gptoss.model import check_input_ids
from gptoss.synthetic import cached_checkpoint
from gptoss.train.data import collate, load_dataset
from gptoss.train.loss import next_token_loss
from gptoss.train.trainer import sum_loss

DATA = Path(__file__).resolve().parents[1] / "train" / "data" / "multilingual_reasoning_train.jsonl"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def steps(step_fn, device: str, n=5) -> tuple[float, float]:
    """(the median of n timed steps, the first step): the first, left out of the median, is where a GPU
    compiles and autotunes the kernels."""
    times = []
    for _ in range(n + 1):
        _sync(device)
        start = time.perf_counter()
        step_fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), times[0]


def _gpu_peak(device: str) -> dict:
    if device != "cuda":
        return {}
    return {
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
        "reserved_gpu_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


def _reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def ours(folder, batch, layers, dtype, device):
    _reset(device)
    with PeakRSS() as mem:
        model = load_model(
            folder, device=device, dtype=dtype, dequantize="auto" if device == "cpu" else False
        )  # as the trainer
        params = apply_lora(model, 8, 16, layers)
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad()
            if isinstance(batch, list):  # Harmony examples: the trainer's loss
                loss, n = sum_loss(model, batch, device)
                (loss / n).backward()
            else:  # random tokens, every position supervised: the same loss over all of them
                loss, n = next_token_loss(model, batch.to(device))
                (loss / n).backward()
            opt.step()

        step_s, _ = steps(step, device)
    return {"step_s": step_s, "peak_rss_gb": mem.gb, **_gpu_peak(device), "trainable": sum(p.numel() for p in params)}


def theirs(folder, batch, layers, dtype, device):
    import peft
    from transformers import GptOssForCausalLM, Mxfp4Config

    if isinstance(batch, list):
        ids, mask = collate(batch)
        labels = ids.masked_fill(mask == 0, -100)  # transformers shifts the labels itself
    else:
        ids, labels = batch, batch
    ids, labels = ids.to(device), labels.to(device)
    _reset(device)
    with PeakRSS() as mem:
        model = GptOssForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype)
        model = model.to(device)
        targets = [f"{i}.mlp.experts.{w}" for i in layers for w in ("gate_up_proj", "down_proj")]
        config = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=targets
        )
        model = peft.get_peft_model(model, config)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            opt.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()

        step_s, _ = steps(step, device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_s": step_s, "peak_rss_gb": mem.gb, **_gpu_peak(device), "trainable": trainable}


# ---------------------------------------------------------------------------------------------
# The recipe at real size (--config)
# ---------------------------------------------------------------------------------------------


def lora_step_flops(c: ModelConfig, tokens: int, supervised: int, r: int, expert_layers: list[int]) -> dict[str, float]:
    """Useful FLOPs of one LoRA step on one row of `tokens` tokens, by part. Frozen matrices need their
    input gradient only, and every layer's forward runs twice (activation checkpointing): 3x the
    forward. Attention's core: causal, a key window on sliding layers, backward 2.5x the forward, so
    4.5x. The unembedding runs on the supervised positions only (forward and input gradient). LoRA
    factors: forward, recomputation, input and weight gradients, 4x. Norms, rotary and softmaxes: left out.
    The count is the work of the recipe's step as transformers + PEFT does it, the measure both sides are
    held to: our recomputation leaves out the experts' down product (gptoss.checkpointing), a ninth of
    the experts' part, and is still counted as if it ran."""
    D, I, k, E = c.hidden_size, c.intermediate_size, c.num_experts_per_tok, c.num_local_experts
    L, T, Dh, H = c.num_hidden_layers, tokens, c.head_dim, c.num_attention_heads
    qkvo = 2 * (D * (c.q_dim + 2 * c.kv_dim) + c.q_dim * D)
    context = 0.0
    for kind in c.layer_types:  # keys each query sees, summed over positions 0..T-1
        w = c.sliding_window if kind == "sliding_attention" else T
        context += sum(min(t + 1, w) for t in range(T))
    lora_attn = 2 * r * ((D + c.q_dim) + 2 * (D + c.kv_dim) + (c.q_dim + D))
    lora_experts = 2 * r * k * ((D + 2 * I) + (I + D))
    parts = {
        "experts": 3 * L * T * k * 6 * I * D,
        "attention_projections": 3 * L * T * qkvo,
        "router": 3 * L * T * 2 * D * E,
        "attention_core": 4.5 * 4 * Dh * H * context,
        "unembedding": 2 * supervised * 2 * D * c.vocab_size,
        "lora": 4 * T * (L * lora_attn + len(expert_layers) * lora_experts),
    }
    parts["total"] = sum(parts.values())
    return parts


def packed_row(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [1, seq] and loss mask [1, seq]: the bundled Harmony rows, rendered, end to end."""
    ids, mask = [], []
    for example in load_dataset(DATA, max_length=seq).examples:
        ids += example.input_ids
        mask += example.loss_mask
        if len(ids) >= seq:
            break
    if len(ids) < seq:
        raise SystemExit(f"bench_train: the bundled rows hold {len(ids)} tokens, fewer than --seq {seq}")
    return torch.tensor([ids[:seq]]), torch.tensor([mask[:seq]])


def top_kernels(step_fn, device: str, rows: int = 15) -> list[dict]:
    """One step under torch.profiler: the kernels that took the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step_fn()
        _sync(device)
    events = prof.key_averages()

    def self_us(e) -> float:
        names = ("self_device_time_total", "self_cuda_time_total") if device == "cuda" else ("self_cpu_time_total",)
        return next((getattr(e, n) for n in names if hasattr(e, n)), 0.0)

    ranked = sorted(events, key=self_us, reverse=True)[:rows]
    return [{"kernel": e.key[:90], "calls": e.count, "ms": self_us(e) / 1e3} for e in ranked]


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def ours_real(name, ids, mask, device, dtype, steps_n, profile_step):
    from gptoss.synthetic import random_model

    config = get_preset(name)
    _reset(device)
    build = time.perf_counter()
    model = random_model(config, device=device, dtype=dtype)
    _sync(device)
    build_s = time.perf_counter() - build
    layers = default_expert_layers(config.num_hidden_layers)
    params = apply_lora(model, 8, 16, layers)
    model.train()
    model.gradient_checkpointing = True
    opt = torch.optim.AdamW(params, lr=1e-4)
    check_input_ids(ids, config)  # on the host, as the trainer's device_batch: the step never asks the device
    count = int(mask[:, 1:].sum())
    ids, mask = ids.to(device), mask.to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):  # as the trainer on a GPU
            loss, n = next_token_loss(model, ids, mask, count, check=False)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step_s, first_s = steps(step, device, steps_n)
    result = {
        "step_s": step_s,
        "first_step_s": first_s,
        "build_s": build_s,
        **_gpu_peak(device),
        "backend": model.backend,
    }
    if model.backend == "triton":  # the MoE tiles the autotuners chose, at each kernel's last launch in a step
        from gptoss.kernels.moe import chosen_tiles

        result["moe_tiles"] = {kernel: chosen["tile"] for kernel, chosen in chosen_tiles().items()}
    if profile_step:
        result["top_kernels"] = top_kernels(step, device)
    return result


def theirs_real(name, ids, mask, device, dtype, steps_n):
    import peft
    from transformers import GptOssConfig, GptOssForCausalLM

    from gptoss.checkpoint_write import hf_config_json

    config = get_preset(name)
    hf_json = hf_config_json(config, quantized=False)
    for key in ("architectures", "model_type"):
        hf_json.pop(key)
    hf_json["rope_parameters"] = dict(hf_json.pop("rope_scaling"), rope_theta=hf_json.pop("rope_theta"))
    hf_config = GptOssConfig(**hf_json)
    hf_config.use_cache = False
    hf_config._attn_implementation = "eager"  # the recipe's attention
    _reset(device)
    build = time.perf_counter()
    with torch.device(device):  # dense bf16 experts: what Mxfp4Config(dequantize=True) loads
        model = GptOssForCausalLM._from_config(hf_config, dtype=dtype, attn_implementation="eager")
    _sync(device)
    build_s = time.perf_counter() - build
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = default_expert_layers(config.num_hidden_layers)
    targets = [f"{i}.mlp.experts.{w}" for i in layers for w in ("gate_up_proj", "down_proj")]
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=targets
    )
    model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, labels = ids.to(device), ids.masked_fill(mask == 0, -100).to(device)  # transformers shifts the labels

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step_s, first_s = steps(step, device, steps_n)
    base = model.get_base_model().config
    attention = getattr(base, "_attn_implementation", None) or "default"
    experts = getattr(base, "_experts_implementation", None) or "default"
    result = {
        "step_s": step_s,
        "first_step_s": first_s,
        "build_s": build_s,
        **_gpu_peak(device),
        "backend": f"{attention} attention, {experts} experts",
    }
    return result


def real_size(args) -> None:
    from gptoss.train.memory import training_peak

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the trainer's --dtype auto
    ids, mask = packed_row(args.seq)
    supervised = int(mask[:, 1:].sum())
    compare = [c for c in args.compare.split(",") if c]
    rows = []
    for name in args.config.split(","):
        config = get_preset(name)
        layers = default_expert_layers(config.num_hidden_layers)
        flops = lora_step_flops(config, args.seq, supervised, 8, layers)
        predicted = training_peak(
            config,
            args.seq,
            attention="triton" if device == "cuda" else "torch",
            moe="triton" if device == "cuda" else "torch",
            dtype_bytes=2 if device == "cuda" else 4,
            supervised=supervised,
        )["peak"]
        runs = [("gptoss", lambda: ours_real(name, ids, mask, device, dtype, args.steps, args.profile))]
        if name in compare:
            runs.append(("transformers+peft", lambda: theirs_real(name, ids, mask, device, dtype, args.steps)))
        for impl, run in runs:
            print(f"{name}: {impl} ...", flush=True)
            row = {
                "impl": impl,
                "config": name,
                "device": device,
                "dtype": str(dtype),
                "tokens": args.seq,
                "supervised": supervised,
                "step_tflop": flops["total"] / 1e12,
            }
            if impl == "gptoss":
                row["predicted_peak_gb"] = predicted / 2**30
            try:
                row |= run()
            except Exception as e:  # noqa: BLE001 - one run's failure is its row; the others still run
                first = (str(e).splitlines() or [""])[0][:200]
                if _oom(e):
                    row["skipped"] = f"does not fit this device: out of memory ({first})"
                else:
                    traceback.print_exc()
                    row["failed"] = f"{type(e).__name__}: {first}"
                print(f"{name}: {impl}: {row.get('skipped') or row['failed']}", flush=True)
            gc.collect()
            _reset(device)
            if "step_s" in row:
                row["tokens_per_s"] = args.seq / row["step_s"]
                row["mfu"] = flops["total"] / row["step_s"] / (args.peak_tflops * 1e12)
                if "peak_gpu_gb" in row:
                    row["peak_gpu_gib"] = row["peak_gpu_gb"] * 1e9 / 2**30
            rows.append(row)
    cols = [
        "impl",
        "config",
        "device",
        "tokens",
        "step_tflop",
        "step_s",
        "tokens_per_s",
        "mfu",
        "first_step_s",
        "build_s",
    ]
    if device == "cuda":
        cols += ["peak_gpu_gib", "reserved_gpu_gib", "predicted_peak_gb"]
    print(table(rows, cols))
    for row in rows:
        if "skipped" in row or "failed" in row:
            print(f"{row['config']} {row['impl']}: {row.get('skipped') or row['failed']}")
        if row.get("moe_tiles"):  # (M, N, K, warps, stages[, 1: swapped])
            print(f"  {row['config']} {row['impl']}: MoE tiles {row['moe_tiles']}")
        for k in row.get("top_kernels", []):
            print(f"  {row['config']} {row['impl']}: {k['ms']:9.2f} ms {k['calls']:6d}x {k['kernel']}")
    for name in dict.fromkeys(r["config"] for r in rows):
        timed = {r["impl"]: r for r in rows if r["config"] == name and "step_s" in r}
        if len(timed) == 2:
            print(
                f"{name}: transformers+peft step / ours = {timed['transformers+peft']['step_s'] / timed['gptoss']['step_s']:.2f}x"
            )
    print(f"machine: {machine()}")
    record("train", rows, mode="real-size", peak_tflops=args.peak_tflops)
    print(json.dumps({"bench": "train", "results": rows}))
    if any("failed" in row for row in rows):
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default=None,
        metavar="PRESETS",
        help="comma-separated presets: the recipe's step at real size on this device (see above)",
    )
    parser.add_argument(
        "--compare",
        default="gpt-oss-20b",
        metavar="PRESETS",
        help="with --config: presets also run with transformers + peft (default: gpt-oss-20b; '' for none)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="with --config: timed steps after the warm-up (default: 3)"
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --config: a torch.profiler table of one step of ours (default: on)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="with --config: the dense bf16 peak MFU is taken against (default: 989, H100/H200 SXM)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny config only")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--all-positions", action="store_true", help="random tokens, loss on every position")
    parser.add_argument(
        "--seq",
        type=int,
        default=None,
        help="tokens per sequence: with --all-positions (default: 128), with --config (default: 2048)",
    )
    args = parser.parse_args()
    for flag, value in (("--batch", args.batch), ("--steps", args.steps), ("--seq", args.seq)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive whole number, found {value}")
    if not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        parser.error(f"--peak-tflops must be a positive number, found {args.peak_tflops}")
    if args.config is not None:
        from gptoss.config import PRESETS

        for name in [*args.config.split(","), *(c for c in args.compare.split(",") if c)]:
            if name not in PRESETS:
                parser.error(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
        args.seq = args.seq or 2048
        return real_size(args)
    args.seq = args.seq or 128
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.all_positions:
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, 199_000, (args.batch, args.seq + 1), generator=gen)
        tokens, supervised, workload = batch.numel(), args.batch * args.seq, "random tokens, loss on all"
    else:
        batch = load_dataset(DATA, max_length=1024).examples[: args.batch]
        ids, mask = collate(batch)
        tokens, supervised, workload = ids.numel(), int(mask[:, 1:].sum()), "Harmony rows, loss on the assistant"
    rows = []
    for name in ["tiny"] if args.quick else ["tiny", "mid"]:
        config = get_preset(name)
        folder = cached_checkpoint(name, "hf-mxfp4")
        layers = default_expert_layers(config.num_hidden_layers)
        for impl, fn in (("gptoss", ours), ("transformers+peft", theirs)):
            print(f"{name}: {impl} ...", flush=True)
            result = fn(folder, batch, layers, dtype, device)
            rows.append(
                {
                    "impl": impl,
                    "config": name,
                    "workload": workload,
                    "batch": args.batch,
                    "tokens": tokens,
                    "supervised": supervised,
                    "device": device,
                    "dtype": str(dtype),
                    **result,
                }
            )
            gc.collect()
    cols = ["impl", "config", "device", "workload", "tokens", "supervised", "trainable", "step_s", "peak_rss_gb"]
    print(table(rows, cols + (["peak_gpu_gb"] if device == "cuda" else [])))
    for name in dict.fromkeys(r["config"] for r in rows):
        a, b = (
            next(r for r in rows if r["config"] == name and r["impl"] == i) for i in ("gptoss", "transformers+peft")
        )
        print(f"{name}: transformers+peft step / ours = {b['step_s'] / a['step_s']:.2f}x")
    print(f"machine: {machine()}")
    record("train", rows)
    print(json.dumps({"bench": "train", "results": rows}))


if __name__ == "__main__":
    main()
