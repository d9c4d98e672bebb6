"""The trainer's settings, written once: each field of TrainConfig carries the help text of its
`gptoss train` flag, and the flags are made from the fields (add_flags) and read back into a config
(from_flags). Fields marked flag=False (the schedule's shape, the report's length) keep the recipe's
value and are set from Python only. __post_init__ checks every field, naming its flag."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from gptoss.errors import UsageError, check_float, check_int, path_flag
from gptoss.train.data import BUNDLED_HELDOUT, BUNDLED_TRAIN

MAX_STEPS = 10_000_000  # a run of more optimizer steps is a typo (the recipe's epoch is ~63 steps)
MAX_EPOCHS = 100_000.0
DTYPES = ("auto", "bf16", "fp32")


def _setting(default=dataclasses.MISSING, help: str = "", **flag):
    """A field with its flag's help text and options (path=True: '' is refused; flag=False: no flag)."""
    return field(default=default, metadata=dict(help=help, **flag))


@dataclass
class TrainConfig:
    model: str = _setting(help="base checkpoint folder (any layout) or hub id", path=True)
    output: str = _setting(help="folder for the adapter, checkpoint, logs, loss plot and report", path=True)
    dataset: str = _setting(
        str(BUNDLED_TRAIN), "JSONL/Parquet file, folder or hub dataset id (default: bundled)", path=True
    )
    eval_dataset: str | None = _setting(
        str(BUNDLED_HELDOUT),
        "held-out rows for eval loss and the report ('' for none; default: bundled)",
        empty_is_none=True,
    )
    max_steps: int = _setting(-1, "optimizer steps; overrides --epochs when > 0")
    epochs: float = _setting(1.0, "passes over the dataset")
    lr: float = _setting(2e-4, "peak learning rate")
    warmup_ratio: float = _setting(0.03, "share of the steps spent warming up", flag=False)
    min_lr_ratio: float = _setting(0.1, "the cosine decays to this share of the peak", flag=False)
    weight_decay: float = _setting(0.0, "AdamW's weight decay", flag=False)
    max_grad_norm: float = _setting(1.0, "gradient clipping", flag=False)
    lora_r: int = _setting(8, "LoRA rank")
    lora_alpha: float = _setting(16, "LoRA alpha; scaling is alpha / r")
    lora_expert_layers: list[int] | None = _setting(
        None,
        "comma-separated layers whose experts get adapters ('' for none; default: the last layer of each "
        "third, 7,15,23 on 24 layers)",
        layers=True,
    )
    full_finetune: bool = _setting(False, "train every parameter (no adapter); for pre-training tiny bases")
    batch_size: int = _setting(4, "examples per micro-batch and process")
    grad_accum: int = _setting(4, "micro-batches per optimizer step (effective batch 16 by default)")
    max_length: int = _setting(2048, "tokens per example; longer rows are truncated")
    skip_long: bool = _setting(False, "skip over-long rows instead of truncating them")
    skip_malformed: bool = _setting(False, "skip (and count) malformed rows instead of stopping")
    save_every: int = _setting(50, "checkpoint every N steps")
    eval_every: int = _setting(50, "held-out loss every N steps")
    eval_batches: int = _setting(4, "held-out batches per evaluation", flag=False)
    dtype: str = _setting(
        "auto",
        "auto: bf16 weights and autocast on CUDA (every Triton kernel on its bf16 path), "
        "fp32 on CPU; fp32 for parity runs",
        choices=DTYPES,
    )
    gradient_checkpointing: bool = _setting(
        True, "keep activations instead of recomputing each layer", negate="--no-gradient-checkpointing"
    )
    seed: int = _setting(0, "seed for adapter init and data order")
    resume: bool = _setting(False, "continue the run in OUTPUT from its checkpoint, with the same settings")
    overwrite: bool = _setting(False, "replace the run already in OUTPUT (without it, such a folder is refused)")
    report_prompts: int = _setting(8, "held-out prompts generated before and after training (0: no report)")
    report_tokens: int = _setting(96, "tokens generated per report prompt", flag=False)

    def __post_init__(self) -> None:
        """Types and ranges of every field, named with its command-line flag (UsageError)."""

        def flag(name: str) -> str:
            return f"{name} (--{name.replace('_', '-')})"

        for name in ("model", "output", "dataset"):
            if not isinstance(getattr(self, name), (str, os.PathLike)):
                raise UsageError(f"{flag(name)} must be a path, found {type(getattr(self, name)).__name__}")
            if not str(getattr(self, name)).strip():  # '' would mean the current folder
                raise UsageError(f"{flag(name)} is empty: give a path")
        if self.eval_dataset is not None and not isinstance(self.eval_dataset, (str, os.PathLike)):
            raise UsageError(f"{flag('eval_dataset')} must be a path or None")
        if check_int(flag("max_steps"), self.max_steps, -1, MAX_STEPS) == 0:
            raise UsageError(f"{flag('max_steps')} must be at least 1 (or -1: use --epochs), found 0")
        check_float(flag("epochs"), self.epochs, 0.0, MAX_EPOCHS, above=True)
        check_float(flag("lr"), self.lr, 0.0, above=True)
        check_float(flag("warmup_ratio"), self.warmup_ratio, 0.0, 1.0)
        check_float(flag("min_lr_ratio"), self.min_lr_ratio, 0.0, 1.0)
        check_float(flag("weight_decay"), self.weight_decay, 0.0)
        check_float(flag("max_grad_norm"), self.max_grad_norm, 0.0, above=True)
        check_int(flag("lora_r"), self.lora_r, 1, 65536)
        check_float(flag("lora_alpha"), self.lora_alpha, 0.0, above=True)
        if self.lora_expert_layers is not None:
            if not isinstance(self.lora_expert_layers, (list, tuple)):
                raise UsageError(f"{flag('lora_expert_layers')} must be a list of layer numbers")
            for layer in self.lora_expert_layers:
                check_int(flag("lora_expert_layers") + " entries", layer, 0)
        for name in ("batch_size", "grad_accum", "save_every", "eval_every", "eval_batches", "report_tokens"):
            check_int(flag(name), getattr(self, name), 1)
        check_int(flag("max_length"), self.max_length, 2)  # a token and the next one to predict
        check_int(flag("report_prompts"), self.report_prompts, 0)
        check_int(flag("seed"), self.seed, 0, 2**63 - 1)
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise UsageError(f"{flag('dtype')} must be auto, bf16 or fp32, found {self.dtype!r}")
        for name in ("full_finetune", "skip_long", "skip_malformed", "gradient_checkpointing", "resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{flag(name)} must be True or False, found {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: continue the run, or replace it")


def _layers(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated layer numbers like 7,15,23, found {text!r}"
        ) from None


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("negate") or "--" + f.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (but those marked flag=False), with its type, default and help."""
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if meta.get("flag") is False:
            continue
        required = f.default is dataclasses.MISSING
        if f.type == "bool":
            parser.add_argument(
                flag_of(f), dest=f.name, action="store_false" if meta.get("negate") else "store_true", help=meta["help"]
            )
            continue
        kind = {"int": int, "float": float}.get(
            f.type, _layers if meta.get("layers") else path_flag if meta.get("path") else str
        )
        shown = "" if required or f.default is None or "default" in meta["help"] else f" (default: {f.default})"
        parser.add_argument(
            flag_of(f),
            dest=f.name,
            type=kind,
            required=required,
            default=None if required else f.default,
            choices=meta.get("choices"),
            help=meta["help"] + shown,
        )


def from_flags(args: argparse.Namespace, **overrides) -> TrainConfig:
    """The TrainConfig the parsed flags describe (fields without a flag keep their defaults)."""
    values = {}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("flag") is False or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        values[f.name] = None if f.metadata.get("empty_is_none") and not value else value
    return TrainConfig(**values, **overrides)
