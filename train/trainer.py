"""The LoRA training loop: AdamW on the adapters, warmup then cosine to a floor, gradient
accumulation and clipping, per-layer activation checkpointing, eval loss on the held-out split,
atomic checkpoints with exact resume, and data parallelism under torchrun.

Loss: cross-entropy of the supervised (assistant) tokens, summed and divided by the number of
supervised tokens in the whole accumulated batch, over all processes; the unembedding is applied to
supervised positions only. The per-rank gradient sums are all-reduced, so N processes give the
same loss and update as one process with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from gptoss.train.data import BUNDLED_HELDOUT, BUNDLED_TRAIN, Example, collate, load_dataset
from gptoss.train.lora import apply_lora, save_adapter
from gptoss.train.loss import linear_cross_entropy

from gptoss.load import load_model


@dataclass
class TrainConfig:
    model: str
    output: str
    dataset: str = str(BUNDLED_TRAIN)
    eval_dataset: str | None = str(BUNDLED_HELDOUT)
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1  # cosine decays to 10% of the peak
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: float = 16
    lora_expert_layers: list[int] | None = None  # None: the last layer of each third (7, 15, 23 of 24)
    full_finetune: bool = False  # train every parameter instead (used by the demo to pre-train a tiny base)
    batch_size: int = 4  # per process and micro-batch
    grad_accum: int = 4  # effective batch = batch_size x grad_accum x processes = 16 by default
    max_length: int = 2048
    skip_long: bool = False
    skip_malformed: bool = False
    save_every: int = 50
    eval_every: int = 50
    eval_batches: int = 4
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    gradient_checkpointing: bool = True
    seed: int = 0
    resume: bool = False
    report_prompts: int = 8  # held-out prompts generated before and after training (0: no report)
    report_tokens: int = 96


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_ratio of the steps, then cosine from lr down to min_lr_ratio * lr."""
    warmup = max(1, math.ceil(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_order(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """The example indices of global step `step`: epochs are seeded shuffles, so any step's batch is
    known without replaying the run (which is what makes resuming exact)."""
    out = []
    start = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.extend(order[offset : offset + per_step - len(out)])
    return out


def sum_loss(model, examples: list[Example], device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised tokens of a batch, and their count."""
    ids, mask = collate(examples)
    ids, mask = ids.to(device), mask.to(device)
    hidden = model.hidden(ids)[:, :-1]  # position t predicts token t + 1
    target = ids[:, 1:]
    supervised = mask[:, 1:].bool()
    # the unembedding only where the loss is taken, fused with the cross-entropy (see train/loss.py)
    loss = linear_cross_entropy(hidden[supervised], model.lm_head.weight, target[supervised])
    return loss, int(supervised.sum())


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, device) -> float:
    total, count = 0.0, 0
    for i in range(0, min(len(data.examples), cfg.eval_batches * cfg.batch_size), cfg.batch_size):
        loss, n = sum_loss(model, data.examples[i : i + cfg.batch_size], device)
        total, count = total + loss.item(), count + n
    return total / max(count, 1)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        self.autocast = cuda and cfg.dtype in ("auto", "bf16")
        # LoRA on the CPU: the experts are decoded once at load when that fits (decoding per use costs
        # more than the matmuls). On a GPU, and for full fine-tuning (which leaves the MXFP4 expert
        # weights as they are and saves them so), they stay MXFP4.
        dequantize = "auto" if self.device.type == "cpu" and not cfg.full_finetune else False
        self.model = load_model(cfg.model, device=self.device, dtype=dtype, dequantize=dequantize)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.full_finetune:
            self.model.requires_grad_(True)
            self.params = [p for p in self.model.parameters() if p.is_floating_point()]
        else:
            self.params = apply_lora(self.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_expert_layers, seed=cfg.seed)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.data = load_dataset(
            cfg.dataset, cfg.max_length, skip_long=cfg.skip_long, skip_malformed=cfg.skip_malformed
        )
        self.eval_data = (
            load_dataset(cfg.eval_dataset, cfg.max_length, skip_long=True, skip_malformed=True)
            if cfg.eval_dataset
            else None
        )
        self.per_step = cfg.batch_size * cfg.grad_accum * self.world
        n = len(self.data.examples)
        self.total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * n / self.per_step))
        self.step = 0
        self.tracker = None
        self.report: dict | None = None

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "params": [p.detach().cpu() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "config": asdict(self.cfg),
        }
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")  # atomic: a crash leaves the previous checkpoint

    def load_checkpoint(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if len(state["params"]) != len(self.params):
            raise ValueError(
                f"{path} holds {len(state['params'])} tensors, this run trains {len(self.params)}: other settings?"
            )
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        indices = batch_order(len(self.data.examples), self.step, self.per_step, cfg.seed)
        mine = indices[self.rank :: self.world]  # this process's share of the global batch
        examples = [self.data.examples[i] for i in mine]
        tokens = torch.tensor([sum(sum(e.loss_mask[1:]) for e in examples)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(tokens)
        total_tokens = max(1.0, tokens.item())
        lr = lr_at(self.step, self.total, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i in range(0, len(examples), cfg.batch_size):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                loss, _ = sum_loss(self.model, examples[i : i + cfg.batch_size], self.device)
            (loss / total_tokens).backward()
            loss_sum += loss.detach().double().cpu()
        if self.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            dist.all_reduce(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm).item()
        self.optimizer.step()
        self.step += 1
        return {
            "step": self.step,
            "loss": loss_sum.item() / total_tokens,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(total_tokens),
        }

    def run(self) -> list[dict]:
        cfg = self.cfg
        if cfg.resume:
            self.load_checkpoint()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            print(f"train: {self.data.summary()}; {self.total} steps of {self.per_step} examples "
                  f"({self.world} process(es)); {sum(p.numel() for p in self.params):,} trainable parameters", file=sys.stderr)  # fmt: skip
            try:
                import trackio

                self.tracker = trackio.init(project="gptoss-lora", config=asdict(self.cfg))
            except Exception:  # not installed, or no place to log: the JSON lines are the record
                self.tracker = None
        from tqdm import tqdm

        report_rows, before = [], None
        if cfg.report_prompts and self.eval_data is not None and self.rank == 0 and not cfg.resume:
            from gptoss.train.report import held_out_prompts, language_report

            report_rows = held_out_prompts(self.eval_data.rows, cfg.report_prompts)
            before = language_report(self.model, report_rows, cfg.report_tokens)  # B = 0: the base model
        bar = tqdm(total=self.total, initial=self.step, desc="train", disable=self.rank != 0, file=sys.stderr)
        log_file = self.out / "train_log.jsonl"
        records = []
        try:
            while self.step < self.total:
                start = time.perf_counter()
                record = self.train_step()
                record["step_s"] = time.perf_counter() - start
                if self.eval_data is not None and (self.step % cfg.eval_every == 0 or self.step == self.total):
                    record["eval_loss"] = evaluate(self.model, self.eval_data, cfg, self.device)
                if self.rank == 0:
                    with open(log_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if self.tracker is not None:
                        self.tracker.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                records.append(record)
                bar.update(1)
                if self.step % cfg.save_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            self.save_checkpoint()  # the last completed step; --resume continues from it
            bar.close()
            print(
                f"\ninterrupted: checkpoint of step {self.step} saved in {self.out}; continue with --resume",
                file=sys.stderr,
            )
            raise
        bar.close()
        self.save_checkpoint()
        if self.rank == 0:
            if cfg.full_finetune:  # the whole model, in the HF MXFP4 layout (experts are not trained)
                from gptoss.synthetic import write_checkpoint

                write_checkpoint(self.out / "model", self.model.config, "hf-mxfp4", tensors=self.model.state_dict())
            else:
                save_adapter(self.model, self.out, base_model=str(cfg.model))
            plot_losses(log_file, self.out / "loss.png")
            if before is not None:
                from gptoss.train.report import language_report, write_report

                after = language_report(self.model, report_rows, cfg.report_tokens)
                seen = {e.reasoning_language for e in self.data.examples}
                unseen = {r["reasoning_language"] for r in before["generations"]} - seen
                path = write_report(self.out, before, after, unseen, "training" if cfg.full_finetune else "adapter")
                self.report = {
                    "before": before["fraction_in_requested_language"],
                    "after": after["fraction_in_requested_language"],
                    "path": str(path),
                }
                print(f"reasoning in the requested language: {self.report['before']:.0%} before, "
                      f"{self.report['after']:.0%} after ({path})", file=sys.stderr)  # fmt: skip
            if self.tracker is not None:
                self.tracker.finish()
        if self.world > 1:
            dist.barrier()
        return records


def plot_losses(log_file: Path, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (supervised tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def train(cfg: TrainConfig) -> list[dict]:
    return Trainer(cfg).run()
