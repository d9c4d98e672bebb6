"""One LoRA training step, ours against transformers + peft, same config, batch and adapters.

    python benchmarks/bench_train.py --quick      # tiny config
    python benchmarks/bench_train.py              # tiny and mid

Both train LoRA r=8 / alpha 16 on q/k/v/o and on the experts of the default layers (the last of each
third of the depth), with AdamW, on the same random token batch (loss on every position), without
activation checkpointing, fp32 on the CPU (bf16 on a GPU). Reported: median step time over 5 steps
after a warm-up, and peak resident memory during the runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F
from gptoss.train.lora import apply_lora, default_expert_layers
from results import PeakRSS, machine, record, table

from gptoss import get_preset, load_model
from gptoss.synthetic import cached_checkpoint


def steps(step_fn, n=5) -> float:
    step_fn()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(folder, ids, layers, dtype):
    with PeakRSS() as mem:
        model = load_model(folder, dtype=dtype)
        params = apply_lora(model, 8, 16, layers)
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad()
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()

        step_s = steps(step)
    return {"step_s": step_s, "peak_rss_gb": mem.gb, "trainable": sum(p.numel() for p in params)}


def theirs(folder, ids, layers, dtype):
    import peft
    from transformers import GptOssForCausalLM, Mxfp4Config

    with PeakRSS() as mem:
        model = GptOssForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype)
        targets = [f"{i}.mlp.experts.{w}" for i in layers for w in ("gate_up_proj", "down_proj")]
        config = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=targets
        )
        model = peft.get_peft_model(model, config)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            opt.zero_grad()
            logits = model(ids[:, :-1]).logits
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()

        step_s = steps(step)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_s": step_s, "peak_rss_gb": mem.gb, "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config only")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: 128)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    rows = []
    for name in ["tiny"] if args.quick else ["tiny", "mid"]:
        config = get_preset(name)
        folder = cached_checkpoint(name, "hf-mxfp4")
        ids = torch.randint(0, 199_000, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
        layers = default_expert_layers(config.num_hidden_layers)
        for impl, fn in (("gptoss", ours), ("transformers+peft", theirs)):
            print(f"{name}: {impl} ...", flush=True)
            rows.append(
                {
                    "impl": impl,
                    "config": name,
                    "batch": args.batch,
                    "seq": args.seq,
                    "dtype": str(dtype),
                    **fn(folder, ids, layers, dtype),
                }
            )
            gc.collect()
    print(table(rows, ["impl", "config", "batch", "seq", "trainable", "step_s", "peak_rss_gb"]))
    for name in {r["config"] for r in rows}:
        a, b = (
            next(r for r in rows if r["config"] == name and r["impl"] == i) for i in ("gptoss", "transformers+peft")
        )
        print(f"{name}: transformers+peft step / ours = {b['step_s'] / a['step_s']:.2f}x")
    print(f"machine: {machine()}")
    record("train", rows)
    print(json.dumps({"bench": "train", "results": rows}))


if __name__ == "__main__":
    main()
