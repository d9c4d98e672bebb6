"""One LoRA training step, ours against transformers + peft, same config, batch and adapters.

    python benchmarks/bench_train.py --quick      # tiny config
    python benchmarks/bench_train.py              # tiny and mid
    python benchmarks/bench_train.py --all-positions   # loss on every position of random tokens

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
import statistics
import time
from pathlib import Path

import torch
from gptoss.train.data import collate, load_dataset
from gptoss.train.loss import next_token_loss
from gptoss.train.trainer import sum_loss
from results import PeakRSS, machine, record, table

from gptoss import get_preset, load_model
from gptoss.adapter import apply_lora, default_expert_layers
from gptoss.synthetic import cached_checkpoint

DATA = Path(__file__).resolve().parents[1] / "train" / "data" / "multilingual_reasoning_train.jsonl"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def steps(step_fn, device: str, n=5) -> float:
    step_fn()  # warm-up (on a GPU: the kernels' autotuning and compilation)
    times = []
    for _ in range(n):
        _sync(device)
        start = time.perf_counter()
        step_fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gpu_peak(device: str) -> dict:
    return {"peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9} if device == "cuda" else {}


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

        step_s = steps(step, device)
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

        step_s = steps(step, device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_s": step_s, "peak_rss_gb": mem.gb, **_gpu_peak(device), "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config only")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--all-positions", action="store_true", help="random tokens, loss on every position")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence with --all-positions (default: 128)")
    args = parser.parse_args()
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
                }  # fmt: skip
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
