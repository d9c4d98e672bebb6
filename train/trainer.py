"""The LoRA training loop: AdamW on the adapters, warmup then cosine to a floor, gradient
accumulation and clipping, per-layer activation checkpointing, eval loss on the held-out split,
atomic checkpoints with exact resume, and data parallelism under torchrun.

Loss: cross-entropy of the supervised (assistant) tokens, summed and divided by the number of
supervised tokens in the whole accumulated batch, over all processes; the unembedding is applied to
supervised positions only. Data parallelism is PyTorch's DistributedDataParallel over the trainable
parameters (bucketed all-reduces overlapping the backward pass; none between accumulation steps,
`no_sync`), every collective on the training device (NCCL on GPUs, gloo on the CPU): each rank's
loss is scaled by the world size over the global token count, so DDP's mean gives the same loss and
update as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptoss.adapter import apply_lora, default_expert_layers, lora_parameters, replacing, save_adapter
from gptoss.errors import UsageError
from gptoss.load import load_model
from gptoss.model import check_input_ids
from gptoss.train.config import TrainConfig
from gptoss.train.data import Example, collate, load_dataset
from gptoss.train.loss import next_token_loss
from gptoss.train.run_folder import (
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    MANIFEST,
    RUN_FILES,
    RunLock,
    TrainError,
    owned_files,
    read_checkpoint_header,
    unreadable,
)

# settings a resume must share with the saved run (the others, such as eval_every, may change)
RESUME_SETTINGS = (
    "max_steps",
    "epochs",
    "lr",
    "warmup_ratio",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "lora_r",
    "lora_alpha",
    "lora_expert_layers",
    "full_finetune",
    "batch_size",
    "grad_accum",
    "max_length",
    "skip_long",
    "skip_malformed",
    "dtype",
    "seed",
)


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


def launch_ranks(env) -> tuple[int, int]:
    """(WORLD_SIZE, RANK) of this process. torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    together; one of them left over in a shell (RANK=1 alone made a single process skip every write and
    still report success; WORLD_SIZE=2 alone waited 30 minutes for a peer) stops the run up front."""
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    present = [n for n in names if env.get(n)]
    if not present:
        return 1, 0
    lone = f"{', '.join(f'{n}={env[n]}' for n in present)} set without a launcher"
    fix = "unset it for a single-process run, or start the run with torchrun (which sets all four)"
    if not env.get("RANK") or not env.get("WORLD_SIZE"):
        raise TrainError(f"{lone}: RANK and WORLD_SIZE come together; {fix}")
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    except ValueError:
        raise TrainError(f"RANK={env['RANK']!r} and WORLD_SIZE={env['WORLD_SIZE']!r} must be integers; {fix}") from None
    if not (world >= 1 and 0 <= rank < world):
        raise TrainError(f"RANK={rank} with WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE; {fix}")
    if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise TrainError(f"{lone}: WORLD_SIZE={world} needs MASTER_ADDR and MASTER_PORT to find its peers; {fix}")
    return world, rank


def train_dtype(choice: str, device: torch.device) -> tuple[torch.dtype, bool]:
    """--dtype -> (the weights' dtype, bf16 autocast or not). auto: bf16 weights on a GPU, so that every
    Triton kernel takes its bf16 tensor-core path and no frozen weight is cast per call (fp32 weights
    under autocast sent the residual stream, and with it every MoE and attention kernel, down the fp32
    path); fp32 on the CPU. fp32 stays available for parity runs. The adapters are fp32 either way."""
    if choice not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--dtype must be auto, bf16 or fp32, found {choice!r}")
    cuda = device.type == "cuda"
    bf16 = choice == "bf16" or (choice == "auto" and cuda)
    return (torch.bfloat16 if bf16 else torch.float32), cuda and bf16


def weights_fingerprint(model) -> str:
    """sha256 of a sample of the frozen base weights outside the experts (the first 4,096 values of the
    embedding, the unembedding and each layer's q_proj and router, as fp32): two base models of the same
    shape differ here, and it reads the same in bf16 or fp32, on any device. A resume checks it."""
    digest = hashlib.sha256()
    layers = model.model.layers
    picks = [model.model.embed_tokens.weight, model.lm_head.weight]
    picks += [w for layer in layers for w in (layer.self_attn.q_proj.weight, layer.mlp.router.weight)]
    for w in picks:
        digest.update(w.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class Objective(torch.nn.Module):
    """The summed next-token loss of `model` on (ids, mask) as a module's forward: the call
    DistributedDataParallel wraps, so that its hooks see the parameters the backward pass reaches."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
        return next_token_loss(self.model, ids, mask, count, check=False)[0]  # ids checked by device_batch


def device_batch(examples: list[Example], config, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A batch as a step takes it: (ids, mask) on the device and the number of targets. Everything that
    reads the rows happens on the host, where collate makes them: the ids' check and the count; the model
    and the loss then never ask the device (each .item() there waits for it), and the copies are sent
    without waiting (a blocking copy to a GPU synchronises with it too)."""
    ids, mask = collate(examples)
    check_input_ids(ids, config)
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True), int(mask[:, 1:].sum())


def sum_loss(model, examples: list[Example], device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the supervised tokens of a batch, and their count."""
    ids, mask, count = device_batch(examples, model.config, device)
    return next_token_loss(model, ids, mask, count, check=False)


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
        self.world, self.rank = launch_ranks(os.environ)
        # before anything slow, so a refused run costs nothing; on --resume, the saved checkpoint's header
        self.resume_header = self._check_output()
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        dtype, self.autocast = train_dtype(cfg.dtype, self.device)
        self.data = load_dataset(
            cfg.dataset, cfg.max_length, skip_long=cfg.skip_long, skip_malformed=cfg.skip_malformed
        )
        self.eval_data = (
            load_dataset(cfg.eval_dataset, cfg.max_length, skip_long=True, skip_malformed=True)
            if cfg.eval_dataset
            else None
        )
        # LoRA on the CPU: the experts are decoded once at load when that fits (decoding per use costs
        # more than the matmuls). On a GPU, and for full fine-tuning (which leaves the MXFP4 expert
        # weights as they are and saves them so), they stay MXFP4.
        dequantize = "auto" if self.device.type == "cpu" and not cfg.full_finetune else False
        self.model = load_model(cfg.model, device=self.device, dtype=dtype, dequantize=dequantize)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.full_finetune:
            self.model.requires_grad_(True)
            self.named = {n: p for n, p in self.model.named_parameters() if p.is_floating_point()}
        else:
            apply_lora(self.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_expert_layers, seed=cfg.seed)
            self.named = lora_parameters(self.model)
        self.params = list(self.named.values())
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.objective: torch.nn.Module = Objective(self.model)
        if self.world > 1:  # the frozen weights and buffers (MXFP4 experts) are never broadcast or reduced
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(
                self.objective,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.per_step = cfg.batch_size * cfg.grad_accum * self.world
        n = len(self.data.examples)
        self.total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * n / self.per_step))
        self.step = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.tracker = None
        self.report: dict | None = None  # set by the report hook, for the demo
        # what runs before the first step and after the last (the language report), outside the loop
        self.hooks: list = []
        if cfg.report_prompts:
            from gptoss.train.report import ReportHook

            self.hooks.append(ReportHook(cfg.report_prompts, cfg.report_tokens))
        self.settings = self._settings()
        if self.resume_header is not None:
            self._check_settings(self.resume_header)

    # -- the output folder and the run's settings --------------------------------------------------
    def _check_output(self) -> dict | None:
        """Refuse an output that would lose work; on --resume, return the saved checkpoint's header."""
        out, cfg = self.out, self.cfg
        if out.exists() and not out.is_dir():
            raise TrainError(f"--output {out} is a file, not a folder: give a new folder (or a run's, to --resume)")
        present = [name for name in RUN_FILES if (out / name).exists()]
        if cfg.resume:
            if not (out / CHECKPOINT).is_file():
                if (out / LEGACY_CHECKPOINT).exists():
                    raise TrainError(
                        f"{out / LEGACY_CHECKPOINT} is a pickle written by an older gptoss; it is not loaded (a pickle "
                        "can run code): start the run again with --overwrite"
                    )
                raise TrainError(f"--resume: no {CHECKPOINT} in {out} to continue from; drop --resume to start a run")
            return read_checkpoint_header(out / CHECKPOINT)
        if present and not cfg.overwrite:
            raise TrainError(
                f"--output {out} already holds a training run ({', '.join(present)}): pass --resume to continue it "
                "or --overwrite to replace it, or choose another folder"
            )
        model = Path(cfg.model).expanduser()
        if model.exists() and model.resolve().is_relative_to(out.resolve()):  # with or without --overwrite
            raise TrainError(
                f"--model {cfg.model} lies inside --output {out}: a run's files would mix with the model's (and "
                "--overwrite would delete it); choose another --output"
            )
        if cfg.overwrite and present:
            if (out / "model").exists() and "model" not in self._owned():
                raise TrainError(
                    f"--output {out} holds model/, which this trainer did not write (no full fine-tune of this folder "
                    "lists it): --overwrite removes only a run's own files; move model/ or choose another folder"
                )
        return None

    def _owned(self) -> list[str]:
        return owned_files(self.out)

    def _settings(self) -> dict:
        """What a resume must match: the hyper-parameters, the processes, the data and the model."""
        cfg = self.cfg
        settings = {name: getattr(cfg, name) for name in RESUME_SETTINGS}
        if settings["lora_expert_layers"] is None:
            settings["lora_expert_layers"] = default_expert_layers(self.model.config.num_hidden_layers)
        digest = hashlib.sha256()
        for e in self.data.examples:
            digest.update(json.dumps([e.input_ids, e.loss_mask]).encode())
        settings |= {
            "processes": self.world,
            "dataset": f"{len(self.data.examples)} examples, sha256 {digest.hexdigest()[:16]}",
            "model": dataclasses.asdict(self.model.config),
            "base_weights": weights_fingerprint(self.model),
        }
        return json.loads(json.dumps(settings))  # as it reads back from the file (tuples become lists)

    def _check_settings(self, saved: dict) -> None:
        before = saved.get("settings", {})
        # runs saved before the base weights were fingerprinted resume as before (their shapes still checked)
        differ = [
            k for k in self.settings if before.get(k) != self.settings[k] and (k in before or k != "base_weights")
        ]
        if differ:

            def show(v):
                return "a different config" if isinstance(v, dict) else json.dumps(v)

            parts = [f"{k} (saved {show(before.get(k))}, now {show(self.settings[k])})" for k in differ]
            raise TrainError(
                f"--resume: settings differ from the run saved in {self.out / CHECKPOINT}: {'; '.join(parts)}; "
                "resume with the saved settings, or start a new run in another --output"
            )

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Trainable tensors and the optimizer state in safetensors, the step and settings as JSON in its
        header: nothing in it is executable. Written beside and renamed into place, so a failed or
        interrupted save leaves the previous checkpoint as it was."""
        if self.rank != 0 or self.saved_step == self.step:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        optimizer = self.optimizer.state_dict()
        index = {i: name for i, name in enumerate(self.named)}
        tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in self.named.items()}
        for i, state in optimizer["state"].items():
            for key, value in state.items():
                tensors[f"optimizer/{index[i]}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]]
        header = {"format": 1, "step": self.step, "settings": self.settings, "param_groups": groups}
        try:
            with replacing(self.out / CHECKPOINT) as tmp:
                save_file(tensors, str(tmp), metadata={"gptoss": json.dumps(header)})
        except OSError as e:
            kept = f"the checkpoint of step {self.saved_step} is intact" if self.saved_step else "no checkpoint kept"
            raise TrainError(f"{e}; {kept}; free space or fix permissions, then continue with --resume") from None
        self.saved_step = self.step

    def load_checkpoint(self) -> None:
        path, header = self.out / CHECKPOINT, self.resume_header  # the header was read and checked at start
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = set(f.keys())
                tensors = {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError) as e:
            raise unreadable(path, e) from None
        expected = {f"param/{n}" for n in self.named}
        if missing := sorted(expected - names):
            raise TrainError(f"{path} lacks {missing[0]}: it is not a checkpoint of this run's settings")
        state: dict = {}
        with torch.no_grad():
            for i, (name, p) in enumerate(self.named.items()):
                saved = tensors[f"param/{name}"]
                if saved.shape != p.shape or not bool(torch.isfinite(saved).all()):
                    raise TrainError(
                        f"{path}: param/{name} has shape {list(saved.shape)} (expected {list(p.shape)}) "
                        "or non-finite values; the checkpoint is corrupt"
                    )
                p.copy_(saved)
                prefix = f"optimizer/{name}/"
                state[i] = {
                    k.removeprefix(prefix): t.to(self.device) if t.dim() else t
                    for k, t in tensors.items()
                    if k.startswith(prefix)
                }
        groups = [dict(g, params=list(range(len(self.params)))) for g in header["param_groups"]]
        try:
            self.optimizer.load_state_dict({"state": {i: v for i, v in state.items() if v}, "param_groups": groups})
        except (ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{path}: the optimizer state does not fit this run ({e})") from None
        self.step = self.saved_step = header["step"]

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        indices = batch_order(len(self.data.examples), self.step, self.per_step, cfg.seed)
        mine = indices[self.rank :: self.world]  # this process's share of the global batch
        examples = [self.data.examples[i] for i in mine]
        # collectives on the training device: NCCL takes no CPU tensors
        tokens = torch.tensor([sum(sum(e.loss_mask[1:]) for e in examples)], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tokens)
        total_tokens = max(1.0, tokens.item())
        lr = lr_at(self.step, self.total, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        starts = range(0, len(examples), cfg.batch_size)
        for i in starts:
            last = i == starts[-1]  # DDP all-reduces on the last accumulation step only
            quiet = self.objective.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            ids, mask, count = device_batch(examples[i : i + cfg.batch_size], self.model.config, self.device)
            with quiet:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    loss = self.objective(ids, mask, count)
                (loss * self.world / total_tokens).backward()  # DDP averages over the ranks: this makes the sum
            loss_sum += loss.detach().double()
        if self.world > 1:
            dist.all_reduce(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm).item()
        loss_value = loss_sum.item() / total_tokens
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):  # no step: the weights stay good
            what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {grad_norm}"
            kept = (
                f"the checkpoint of step {self.saved_step} in {self.out} is kept"
                if self.saved_step
                else "no checkpoint had been saved"
            )
            raise TrainError(
                f"{what} at step {self.step + 1}: training stopped; {kept}; lower --lr (now {cfg.lr:g}) or check "
                "that step's rows"
            )
        self.optimizer.step()
        self.step += 1
        return {
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(total_tokens),
        }

    def _start_log(self, log_file: Path) -> None:
        """A fresh run starts from an empty folder (--overwrite removes the old run's files here, now that
        everything loaded); a resumed one keeps the log up to its checkpoint's step only."""
        if self.rank != 0:
            return
        if self.cfg.overwrite:
            for name in self._owned():
                path = self.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.cfg.resume:  # what this run may write: what a later --overwrite may remove
            names = [n for n in RUN_FILES if n not in (LEGACY_CHECKPOINT, "model")] + (
                ["model"] if self.cfg.full_finetune else []
            )
            with replacing(self.out / MANIFEST) as tmp:
                tmp.write_text(json.dumps({"files": names}, indent=1) + "\n", encoding="utf-8")
        if self.cfg.resume and log_file.exists():
            kept = []
            for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by the interruption
            with replacing(log_file) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def run(self) -> list[dict]:
        cfg = self.cfg
        if cfg.resume:
            self.load_checkpoint()
        log_file = self.out / "train_log.jsonl"
        self._start_log(log_file)
        if self.rank == 0:
            print(
                f"train: {self.data.summary()}; {self.total} steps of {self.per_step} examples "
                f"({self.world} process(es)); {sum(p.numel() for p in self.params):,} trainable parameters",
                file=sys.stderr,
            )
            try:
                import trackio

                self.tracker = trackio.init(project="gptoss-lora", config=asdict(self.cfg))
            except Exception:  # not installed, or no place to log: the JSON lines are the record
                self.tracker = None
        from tqdm import tqdm

        for hook in self.hooks:
            hook.before_training(self)
        bar = tqdm(total=self.total, initial=self.step, desc="train", disable=self.rank != 0, file=sys.stderr)
        records = []
        try:
            while self.step < self.total:
                start = time.perf_counter()
                record = self.train_step()
                record["step_s"] = time.perf_counter() - start
                if self.eval_data is not None and (self.step % cfg.eval_every == 0 or self.step == self.total):
                    record["eval_loss"] = evaluate(self.model, self.eval_data, cfg, self.device)
                if self.rank == 0:
                    with open(log_file, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                    if self.tracker is not None:
                        self.tracker.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                records.append(record)
                bar.update(1)
                if self.step % cfg.save_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint()  # the last completed step; --resume continues from it
            print(
                f"\ninterrupted: checkpoint of step {self.step} saved in {self.out}; continue with --resume",
                file=sys.stderr,
            )
            raise
        finally:
            bar.close()
        self.save_checkpoint()
        if self.rank == 0:
            if cfg.full_finetune:  # the whole model, in the HF MXFP4 layout (experts are not trained)
                from gptoss.checkpoint_write import save_checkpoint

                save_checkpoint(self.out / "model", self.model.config, "hf-mxfp4", self.model.state_dict())
            else:
                save_adapter(self.model, self.out, base_model=str(cfg.model))
            plot_losses(log_file, self.out / "loss.png")
            for hook in self.hooks:
                hook.after_training(self)
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
    _, rank = launch_ranks(os.environ)
    if rank != 0:  # rank 0 writes the folder and holds its lock
        return Trainer(cfg).run()
    with RunLock(Path(cfg.output)):
        return Trainer(cfg).run()
