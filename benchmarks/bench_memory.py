"""The LoRA trainer's peak memory for one 2048-token example: estimated from the shapes
(gptoss.train.memory) for gpt-oss-20b and -120b on one GPU, with the torch attention and with the
Triton kernels, and estimated against measured for the tiny and mid shapes on this CPU.

    python benchmarks/bench_memory.py            # the table, and the CPU measurement of tiny and mid
    python benchmarks/bench_memory.py --quick    # tiny only, 512 tokens

The CPU step is the trainer's: fp32, torch backends, LoRA on q/k/v/o and the default expert layers,
per-layer checkpointing, every position supervised, backward and one AdamW step. Measured: the
highest resident memory while the model loads and trains (sampled every 10 ms), less what the
process held before loading; in all, and anonymous memory alone (the memory-mapped checkpoint pages
the loader reads are file-backed, host-side and reclaimable: a GPU run does not hold them on the GPU).
"""

from __future__ import annotations

import argparse
import json

import torch
from results import RESULTS_DIR, PeakRSS, machine, record, table

from gptoss import load_model
from gptoss.adapter import apply_lora
from gptoss.config import get_preset
from gptoss.synthetic import cached_checkpoint
from gptoss.train.loss import next_token_loss
from gptoss.train.memory import PARTS, GiB, training_peak


def estimates(tokens: int) -> list[dict]:
    rows = []
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        c = get_preset(name)
        for label, attention in (("before: torch attention", "torch"), ("after: attention kernel", "triton")):
            moe = "triton"  # the MoE kernels in both, expert adapters beside them
            parts = training_peak(c, tokens, attention=attention, moe=moe, dtype_bytes=2)
            rows.append({"config": name, "path": label, **{k: v / GiB for k, v in parts.items()}})
    return rows


def measure(name: str, tokens: int) -> dict:
    with PeakRSS() as base:
        pass
    folder = cached_checkpoint(name, "hf-mxfp4", progress=True)
    with PeakRSS() as mem:
        model = load_model(folder, dtype=torch.float32, backend="torch")
        params = apply_lora(model)  # the trainable parameters, everything else frozen
        model.gradient_checkpointing = True
        ids = torch.randint(0, model.config.vocab_size, (1, tokens))
        loss, _ = next_token_loss(model, ids)  # every position a target: tokens - 1 of them
        loss.backward()
        torch.optim.AdamW(params, lr=1e-4).step()
    estimate = training_peak(model.config, tokens, attention="torch", moe="torch", dtype_bytes=4, supervised=tokens - 1)
    return {
        "config": name,
        "tokens": tokens,
        "estimate_gib": estimate["peak"] / GiB,
        "measured_gib": (mem.peak - base.peak) / GiB,
        "ratio": (mem.peak - base.peak) / estimate["peak"],
        "measured_anon_gib": (mem.peak_anon - base.peak_anon) / GiB,
        "anon_ratio": (mem.peak_anon - base.peak_anon) / estimate["peak"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny only, 512 tokens")
    args = parser.parse_args()
    rows = estimates(2048)
    cols = ["config", "path", *PARTS]
    print("GiB, one 2048-token example, bf16, one GPU (estimated from the shapes):")
    print(table(rows, cols))
    checks = [measure("tiny", 512)] if args.quick else [measure("tiny", 2048), measure("mid", 2048)]
    print("\nCPU, fp32, torch paths: estimated vs measured peak (GiB)")
    print(
        table(checks, ["config", "tokens", "estimate_gib", "measured_gib", "ratio", "measured_anon_gib", "anon_ratio"])
    )
    print(f"machine: {machine()}")
    record("memory", rows + checks)
    print(f"results appended to {RESULTS_DIR / 'memory.jsonl'}")
    print(json.dumps({"bench": "memory", "results": rows + checks}))


if __name__ == "__main__":
    main()
