"""Hostile and mistaken input through the command line, one table: every row runs `gptoss ...` and
asserts the exit code (2: a wrong argument, 1: anything else, 0: handled), that no traceback
escaped, that the last line on stderr names the culprit, and that no file the user already had
changed (nor was a temporary file left behind). Behaviour that needs more than one line to show
(chat, a crafted pickle, a genuine write failure) follows the table."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROW, TRAIN_CONFIG
from safetensors.torch import load_file, save_file

from gptoss.adapter import apply_lora, save_adapter
from gptoss.cli import main
from gptoss.load import load_model
from gptoss.synthetic import write_checkpoint
from gptoss.train import trainer as trainer_module
from gptoss.train.run_folder import read_checkpoint_header
from gptoss.train.trainer import Trainer


@dataclass
class Fixtures:
    hf: Path  # HF MXFP4 layout, index + shards
    original: Path  # OpenAI original/ layout, one file, no index
    data: Path  # eight good rows
    adapter: Path  # r = 4 on every attention projection, experts of layer 1
    partial: Path  # a run stopped at step 2 of 4 (checkpoint of step 2)
    finished: Path  # a run of 2 steps, finished (adapter, log, checkpoint)


def train_args(fx: Fixtures, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(fx.hf), "--dataset", str(fx.data), "--eval-dataset", "", "--report-prompts", "0",
            "--max-steps", "4", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4", "--lora-expert-layers", "1",
            "--save-every", "2", "--lr", "1e-2", "--output", str(output), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixtures:
    root = tmp_path_factory.mktemp("hostile")
    # shards of at most 30 MB, so the HF folder has an index and several shards
    hf = write_checkpoint(root / "hf", TRAIN_CONFIG, "hf-mxfp4", seed=3, max_shard_bytes=30_000_000)
    original = write_checkpoint(root / "original", TRAIN_CONFIG, "original", seed=3)
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(dict(ROW, user=f"What is {i} plus 30?")) + "\n" for i in range(8)))
    model = load_model(hf, dtype=torch.float32)
    apply_lora(model, r=4, alpha=8, expert_layers=[1])
    adapter = save_adapter(model, root / "adapter")
    fixtures = Fixtures(hf, original, data, adapter, root / "partial", root / "finished")
    original_step = Trainer.train_step

    def stop_after_two(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return original_step(self)

    Trainer.train_step = stop_after_two
    try:
        assert main(train_args(fixtures, fixtures.partial)) == 130
    finally:
        Trainer.train_step = original_step
    assert main(train_args(fixtures, fixtures.finished, "--max-steps", "2")) == 0
    return fixtures


# -- helpers that prepare a case's files inside its own folder -----------------------------------------


def copy(src: Path, tmp: Path, name: str | None = None) -> Path:
    dst = tmp / (name or src.name)
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def edit_json(path: Path, drop=(), **changes) -> None:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    path.write_text(json.dumps(data | changes))


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def edit_tensor(file: Path, name: str, fn) -> None:
    tensors = load_file(str(file))
    tensors[name] = fn(tensors[name])
    save_file(tensors, str(file), metadata={"format": "pt"})


def hf_with(tmp: Path, **config_changes) -> Path:
    folder = copy_hf(tmp)
    edit_json(folder / "config.json", drop=["layer_types"] if "num_hidden_layers" in config_changes else (),
              **config_changes)  # fmt: skip
    return folder


def copy_hf(tmp: Path) -> Path:
    return copy(FX.hf, tmp, "ckpt")


def info(folder) -> list[str]:
    return ["info", "--model", str(folder)]


def gen(folder, *extra: str) -> list[str]:
    return ["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0",
            "--dtype", "fp32", *extra]  # fmt: skip


def app(folder, *extra: str) -> list[str]:
    return ["app", "--model", str(folder), "--dtype", "fp32", "--port", str(free_port()), *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LISTENING: list[socket.socket] = []  # held open for the row that finds its port taken


def taken_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    LISTENING.append(s)
    return s.getsockname()[1]


def adapter_with(tmp: Path, config=None, drop=(), tensors=None) -> Path:
    folder = copy(FX.adapter, tmp, "adapter")
    if config is not None or drop:
        edit_json(folder / "adapter_config.json", drop=drop, **(config or {}))
    if tensors is not None:
        t = load_file(str(folder / "adapter_model.safetensors"))
        save_file(tensors(t), str(folder / "adapter_model.safetensors"))
    return folder


def rename_key(old: str, new: str):
    def fn(t):
        t[new] = t.pop(next(k for k in t if old in k))
        return t

    return fn


def truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def write_rows(tmp: Path, text: str | bytes) -> Path:
    path = tmp / "rows.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def misplace(folder: Path, name: str) -> Path:
    """Point the index's entry for `name` at another shard than the one holding it."""
    weight_map = index_of(folder)
    weight_map[name] = next(f for f in sorted(set(weight_map.values())) if f != weight_map[name])
    edit_json(folder / "model.safetensors.index.json", weight_map=weight_map)
    return folder


def point_outside(tmp: Path, how: str) -> Path:
    """Move the shard holding lm_head.weight out of a copy of the checkpoint and point the index at it by
    an absolute path, a ../ path or a subfolder."""
    folder = copy_hf(tmp)
    weight_map = index_of(folder)
    shard = weight_map["lm_head.weight"]
    where = {"absolute": tmp / "elsewhere.safetensors", "parent": folder.parent / "elsewhere.safetensors",
             "subfolder": folder / "sub" / "elsewhere.safetensors"}[how]  # fmt: skip
    where.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder / shard, where)
    named = {"absolute": str(where), "parent": "../elsewhere.safetensors", "subfolder": "sub/elsewhere.safetensors"}[
        how
    ]
    edit_json(
        folder / "model.safetensors.index.json",
        weight_map={n: named if f == shard else f for n, f in weight_map.items()},
    )
    return folder


def fifo_in(folder: Path, name: str, config: bool = False, replace: bool = False) -> Path:
    """`folder` with a named pipe called `name` in it (replacing a file of that name), and the checkpoint's
    config.json beside it when asked."""
    folder.mkdir(parents=True, exist_ok=True)
    if config:
        shutil.copy(FX.hf / "config.json", folder / "config.json")
    if replace:
        (folder / name).unlink()
    os.mkfifo(folder / name)
    return folder


def shard_of(folder: Path, name: str) -> Path:
    return folder / index_of(folder)[name]


FX: Fixtures  # set by the test before a row's set-up runs


# -- the table: (id, set-up(tmp) -> argv, exit code, the culprit the error line names) -------------------

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

CASES = [
    # the checkpoint loader
    ("model-missing", lambda t: info(t / "nothing"), 1, "does not exist"),
    ("model-empty-folder", lambda t: info(t), 1, "holds no *.safetensors"),
    ("model-truncated-shard", lambda t: (truncate(shard_of(c := copy_hf(t), "lm_head.weight")), info(c))[1], 1,
     "truncated"),
    ("config-missing", lambda t: ((c := copy_hf(t)) / "config.json").unlink() or info(c), 1, "no config.json"),
    ("config-invalid-json", lambda t: ((c := copy_hf(t)) / "config.json").write_text("{") and info(c), 1,
     "config.json is not valid JSON"),
    ("config-a-list", lambda t: ((c := copy_hf(t)) / "config.json").write_text("[1, 2]") and info(c), 1,
     "JSON list"),
    ("config-fewer-layers", lambda t: info(hf_with(t, num_hidden_layers=1)), 1, "num_hidden_layers=1"),
    ("config-huge-layers", lambda t: info(hf_with(t, num_hidden_layers=10**9)), 1, "num_hidden_layers"),
    ("config-more-experts", lambda t: info(hf_with(t, num_local_experts=8)), 1, "num_local_experts=8"),
    ("config-string-width", lambda t: info(hf_with(t, hidden_size="64")), 1, "hidden_size must be an integer"),
    ("config-zero-kv-heads", lambda t: info(hf_with(t, num_key_value_heads=0)), 1, "num_key_value_heads"),
    ("config-negative-eps", lambda t: info(hf_with(t, rms_norm_eps=-1e-5)), 1, "rms_norm_eps"),
    ("config-nan-eps", lambda t: info(hf_with(t, rms_norm_eps=float("nan"))), 1, "rms_norm_eps"),
    ("config-wrong-width", lambda t: info(hf_with(t, intermediate_size=32)), 1, "expected shape"),
    ("unknown-tensor", lambda t: (save_file({"foo.bar": torch.zeros(2)}, str((c := copy(FX.original, t)) / "x.safetensors")),
                                  info(c))[1], 1, "foo.bar"),  # fmt: skip
    ("duplicated-tensor", lambda t: (save_file({"norm.scale": torch.ones(64)}, str((c := copy(FX.original, t)) / "x.safetensors")),
                                     info(c))[1], 1, "norm.scale is in both"),  # fmt: skip
    ("two-layouts", lambda t: (shutil.copy(shard_of(FX.hf, "model.layers.0.mlp.experts.down_proj_blocks"),
                                           c := copy(FX.original, t)), info(c))[1], 1, "2 layouts"),  # fmt: skip
    ("file-not-in-index", lambda t: (shutil.copy(FX.original / "model.safetensors", c := copy_hf(t)), info(c))[1], 1,
     "model.safetensors, which model.safetensors.index.json does not list"),
    ("index-wrong-shard", lambda t: info(misplace(copy_hf(t), "model.norm.weight")), 1, "model.norm.weight"),
    ("index-missing-shard", lambda t: (shard_of(c := copy_hf(t), "lm_head.weight").unlink(), info(c))[1], 1,
     "is missing"),
    ("index-absolute-path", lambda t: info(point_outside(t, "absolute")), 1, "which is not a file name inside"),
    ("index-parent-path", lambda t: info(point_outside(t, "parent")), 1, "'../elsewhere.safetensors', which is not a file name"),
    ("index-subfolder-path", lambda t: info(point_outside(t, "subfolder")), 1, "which is not a file name inside"),
    ("index-invalid", lambda t: ((c := copy_hf(t)) / "model.safetensors.index.json").write_text("{") and info(c), 1,
     "not a valid safetensors index"),
    ("wrong-dtype", lambda t: (edit_tensor(shard_of(c := copy_hf(t), n := "model.layers.0.mlp.experts.down_proj_scales"),
                                           n, lambda x: x.float()), info(c))[1], 1, "expected dtype U8"),  # fmt: skip
    ("nan-weights", lambda t: (edit_tensor(shard_of(c := copy_hf(t), "model.norm.weight"), "model.norm.weight",
                                           lambda x: x * float("nan")), gen(c))[1], 1, "model.norm.weight"),  # fmt: skip
    ("nan-scales", lambda t: (edit_tensor(shard_of(c := copy_hf(t), n := "model.layers.1.mlp.experts.gate_up_proj_scales"),
                                          n, lambda x: x.fill_(255)), gen(c))[1], 1,
                   "model.layers.1.mlp.experts.gate_up_proj_scales"),  # fmt: skip
    # synth and demo
    ("synth-shard-zero", lambda t: ["synth", "--out", str(t / "s"), "--max-shard-gb", "0"], 2, "--max-shard-gb"),
    ("synth-shard-nan", lambda t: ["synth", "--out", str(t / "s"), "--max-shard-gb", "nan"], 2, "--max-shard-gb"),
    ("synth-seed-negative", lambda t: ["synth", "--out", str(t / "s"), "--seed=-1"], 2, "--seed"),
    ("synth-over-a-checkpoint", lambda t: ["synth", "--out", str(copy_hf(t))], 1, "already holds a checkpoint"),
    ("synth-overwrite-a-training-run", lambda t: (t / "run").mkdir() or (t / "run" / "adapter_model.safetensors").write_bytes(b"w")
     and ["synth", "--out", str(t / "run"), "--overwrite"], 1, "holds a training run (adapter_model.safetensors): synth never writes over one"),
    ("synth-overwrite-a-run-checkpoint", lambda t: (t / "run").mkdir() or (t / "run" / "checkpoint.safetensors").write_bytes(b"c")
     and ["synth", "--out", str(t / "run"), "--overwrite"], 1, "holds a training run (checkpoint.safetensors)"),
    ("synth-unknown-preset", lambda t: ["synth", "--out", str(t / "s2"), "--preset", "no-such-preset"], 2, "--preset"),
    ("synth-out-is-a-file", lambda t: (t / "s").write_text("x") and ["synth", "--out", str(t / "s")], 1, "is a file"),
    ("demo-tokens-zero", lambda t: ["demo", "--dir", str(t / "d"), "--tokens", "0"], 2, "--tokens"),
    ("demo-work-holds-a-users-run", lambda t: (t / "w" / "lora").mkdir(parents=True) or (t / "w" / "lora" / "adapter_model.safetensors").write_bytes(b"a")
     and ["demo", "--dir", str(t / "d"), "--work", str(t / "w")], 1, "holds a training run the demo did not write (adapter_model.safetensors)"),
    ("demo-tokens-huge", lambda t: ["demo", "--dir", str(t / "d"), "--tokens", str(10**9)], 2, "--tokens"),
    ("demo-lora-steps-zero", lambda t: ["demo", "--dir", str(t / "d"), "--lora-steps", "0"], 2, "--lora-steps"),
    ("demo-base-steps-zero", lambda t: ["demo", "--dir", str(t / "d"), "--base-steps", "0"], 2, "--base-steps"),
    ("demo-base-steps-negative", lambda t: ["demo", "--dir", str(t / "d"), "--base-steps", "-5"], 2, "--base-steps"),
    # adapters
    ("adapter-missing", lambda t: gen(FX.hf, "--adapter", str(t / "none")), 1, "does not exist"),
    ("adapter-no-config", lambda t: ((a := adapter_with(t)) / "adapter_config.json").unlink() or gen(FX.hf, "--adapter", str(a)),
     1, "adapter_config.json is missing"),  # fmt: skip
    ("adapter-invalid-json", lambda t: ((a := adapter_with(t)) / "adapter_config.json").write_text("{r:") and
     gen(FX.hf, "--adapter", str(a)), 1, "adapter_config.json is not valid JSON"),
    ("adapter-r-zero", lambda t: gen(FX.hf, "--adapter", str(adapter_with(t, {"r": 0}))), 1, "r must be at least 1"),
    ("adapter-r-missing", lambda t: gen(FX.hf, "--adapter", str(adapter_with(t, drop=["r"]))), 1, "lacks 'r'"),
    ("adapter-r-string", lambda t: gen(FX.hf, "--adapter", str(adapter_with(t, {"r": "4"}))), 1,
     "r must be an integer"),
    ("adapter-alpha-nan", lambda t: gen(FX.hf, "--adapter", str(adapter_with(t, {"lora_alpha": float("nan")}))), 1,
     "lora_alpha"),
    ("adapter-r-huge", lambda t: gen(FX.hf, "--adapter", str(adapter_with(t, {"r": 2_000_000}))), 1, "r=2000000"),
    ("adapter-r-enormous", lambda t: gen(FX.hf, "--adapter", str(adapter_with(t, {"r": 10**9}))), 1, "r=1000000000"),
    ("adapter-rank-mismatch", lambda t: gen(FX.hf, "--adapter", str(adapter_with(t, {"r": 8}))), 1, "r=8"),
    ("adapter-other-peft-type", lambda t: gen(FX.hf, "--adapter", str(adapter_with(t, {"peft_type": "IA3"}))), 1,
     "peft_type"),
    ("adapter-layer-beyond-model", lambda t: gen(FX.hf, "--adapter", str(adapter_with(
        t, tensors=rename_key("layers.0.self_attn.q_proj.lora_A", A0.replace("layers.0", "layers.9"))))), 1, "layer 9"),
    ("adapter-unknown-module", lambda t: gen(FX.hf, "--adapter", str(adapter_with(
        t, tensors=rename_key("layers.0.self_attn.q_proj.lora_A", A0.replace("q_proj", "gate_proj"))))), 1, "gate_proj"),
    ("adapter-nan", lambda t: gen(FX.hf, "--adapter", str(adapter_with(
        t, tensors=lambda x: x | {A0: x[A0] * float("nan")}))), 1, A0),
    ("adapter-truncated", lambda t: (truncate((a := adapter_with(t)) / "adapter_model.safetensors"),
                                     gen(FX.hf, "--adapter", str(a)))[1], 1, "adapter_model.safetensors"),  # fmt: skip
    # sampling flags of generate and chat: refused before the model loads
    ("temperature-nan", lambda t: gen(FX.hf, "--temperature", "nan"), 2, "--temperature must be a finite number"),
    ("temperature-negative", lambda t: gen(FX.hf, "--temperature", "-1"), 2, "--temperature must be at least 0"),
    ("top-p-zero", lambda t: gen(FX.hf, "--top-p", "0"), 2, "--top-p"),
    ("top-p-above-one", lambda t: gen(FX.hf, "--top-p", "1.5"), 2, "--top-p must be at most 1"),
    ("top-k-negative", lambda t: gen(FX.hf, "--top-k", "-1"), 2, "--top-k"),
    ("max-new-tokens-zero", lambda t: gen(FX.hf, "--max-new-tokens", "0"), 2, "--max-new-tokens"),
    ("max-new-tokens-word", lambda t: gen(FX.hf, "--max-new-tokens", "many"), 2, "--max-new-tokens"),
    ("seed-negative", lambda t: gen(FX.hf, "--seed", "-4"), 2, "--seed"),
    ("prompt-blank", lambda t: ["generate", "--model", str(FX.hf), "--prompt", "  "], 2, "--prompt is empty"),
    ("chat-top-k-negative", lambda t: ["chat", "--model", str(FX.hf), "--top-k", "-5"], 2, "--top-k"),
    ("unknown-flag", lambda t: gen(FX.hf, "--temprature", "1"), 2, "--temprature"),
    # trainer flags: refused before anything loads
    ("lora-r-zero", lambda t: train_args(FX, t / "o", "--lora-r", "0"), 2, "--lora-r"),
    ("lora-r-huge", lambda t: train_args(FX, t / "o", "--lora-r", str(10**9)), 2, "--lora-r"),
    ("lora-alpha-zero", lambda t: train_args(FX, t / "o", "--lora-alpha", "0"), 2, "--lora-alpha"),
    ("save-every-zero", lambda t: train_args(FX, t / "o", "--save-every", "0"), 2, "--save-every"),
    ("eval-every-zero", lambda t: train_args(FX, t / "o", "--eval-every", "0"), 2, "--eval-every"),
    ("batch-size-zero", lambda t: train_args(FX, t / "o", "--batch-size", "0"), 2, "--batch-size"),
    ("grad-accum-zero", lambda t: train_args(FX, t / "o", "--grad-accum", "0"), 2, "--grad-accum"),
    ("epochs-zero", lambda t: train_args(FX, t / "o", "--max-steps", "-1", "--epochs", "0"), 2, "--epochs"),
    ("epochs-nan", lambda t: train_args(FX, t / "o", "--epochs", "nan"), 2, "--epochs"),
    ("max-steps-zero", lambda t: train_args(FX, t / "o", "--max-steps", "0"), 2, "--max-steps"),
    ("lr-negative", lambda t: train_args(FX, t / "o", "--lr=-1e-4"), 2, "--lr"),
    ("lr-nan", lambda t: train_args(FX, t / "o", "--lr", "nan"), 2, "--lr"),
    ("lr-infinite", lambda t: train_args(FX, t / "o", "--lr", "inf"), 2, "--lr"),
    ("max-length-zero", lambda t: train_args(FX, t / "o", "--max-length", "0"), 2, "--max-length"),
    ("expert-layers-words", lambda t: train_args(FX, t / "o", "--lora-expert-layers", "a,b"), 2,
     "--lora-expert-layers"),
    ("expert-layers-beyond-model", lambda t: train_args(FX, t / "o", "--lora-expert-layers", "9"), 2,
     "lora_expert_layers [9]"),
    ("resume-and-overwrite", lambda t: train_args(FX, t / "o", "--resume", "--overwrite"), 2, "contradict"),
    # trainer data
    ("dataset-missing", lambda t: train_args(FX, t / "o", "--dataset", str(t / "none.jsonl")), 1, "not found"),
    ("dataset-empty", lambda t: train_args(FX, t / "o", "--dataset", str(write_rows(t, ""))), 1, "no rows"),
    ("dataset-blank", lambda t: train_args(FX, t / "o", "--dataset", str(write_rows(t, "\n  \n\n"))), 1, "no rows"),
    ("dataset-row-missing-user", lambda t: train_args(FX, t / "o", "--dataset", str(write_rows(
        t, json.dumps(ROW) + "\n" + json.dumps(dict(ROW, user=None)) + "\n"))), 1, "row 1: expected a non-empty string 'user'"),
    ("dataset-row-not-json", lambda t: train_args(FX, t / "o", "--dataset", str(write_rows(t, "{broken\n"))), 1,
     "row 0: not valid JSON"),
    ("dataset-row-not-utf8", lambda t: train_args(FX, t / "o", "--dataset", str(write_rows(t, b"\xff\xfe{}\n"))), 1,
     "row 0: not valid UTF-8"),
    ("dataset-row-a-number", lambda t: train_args(FX, t / "o", "--dataset", str(write_rows(t, "5\n"))), 1,
     "row 0: expected a JSON object"),
    ("dataset-all-malformed-skipped", lambda t: train_args(FX, t / "o", "--skip-malformed", "--dataset",
                                                           str(write_rows(t, "{}\n[]\n"))), 1, "2 of 2 rows are malformed"),  # fmt: skip
    ("max-length-below-every-prompt", lambda t: train_args(FX, t / "o", "--max-length", "16"), 1, "raise --max-length"),
    # the output folder and resuming
    ("output-is-a-file", lambda t: (t / "o").write_text("notes") and train_args(FX, t / "o"), 1, "is a file"),
    ("output-holds-a-finished-run", lambda t: train_args(FX, copy(FX.finished, t, "o"), "--max-steps", "2"), 1,
     "already holds a training run"),
    ("resume-without-checkpoint", lambda t: train_args(FX, t / "o", "--resume"), 1, "no checkpoint.safetensors"),
    ("resume-other-lr", lambda t: train_args(FX, copy(FX.partial, t, "o"), "--resume", "--lr", "2e-2"), 1,
     "lr (saved 0.01, now 0.02)"),
    ("resume-other-rank", lambda t: train_args(FX, copy(FX.partial, t, "o"), "--resume", "--lora-r", "8"), 1,
     "lora_r (saved 4, now 8)"),
    ("resume-other-dataset", lambda t: train_args(FX, copy(FX.partial, t, "o"), "--resume", "--dataset",
                                                  str(write_rows(t, json.dumps(ROW) + "\n"))), 1, "dataset (saved"),  # fmt: skip
    ("resume-truncated-checkpoint", lambda t: (truncate((o := copy(FX.partial, t, "o")) / "checkpoint.safetensors"),
                                               train_args(FX, o, "--resume"))[1], 1, "checkpoint.safetensors"),  # fmt: skip
    ("resume-checkpoint-without-header", lambda t: (save_file({"x": torch.zeros(1)}, str((o := copy(FX.partial, t, "o")) / "checkpoint.safetensors")),
                                                    train_args(FX, o, "--resume"))[1], 1, "not a gptoss training checkpoint"),  # fmt: skip
    ("output-is-the-model-folder", lambda t: train_args(FX, c := copy_hf(t), "--model", str(c)), 1,
     "lies inside --output"),
    # empty paths: '' would be the current folder
    ("train-output-empty", lambda t: train_args(FX, t / "o")[:-1] + [""], 2, "--output"),
    ("train-model-empty", lambda t: train_args(FX, t / "o", "--model", ""), 2, "--model"),
    ("train-dataset-empty", lambda t: train_args(FX, t / "o", "--dataset", ""), 2, "--dataset"),
    ("synth-out-empty", lambda t: ["synth", "--out", ""], 2, "--out"),
    ("synth-out-uncreatable", lambda t: (t / "f").write_text("x") and ["synth", "--out", str(t / "f" / "sub")], 2,
     "cannot create it"),
    ("demo-work-empty", lambda t: ["demo", "--work", ""], 2, "--work"),
    ("generate-model-empty", lambda t: gen(""), 2, "--model"),
    ("generate-adapter-empty", lambda t: gen(FX.hf, "--adapter", ""), 2, "--adapter"),
    ("info-model-empty", lambda t: info(""), 2, "--model"),
    # devices
    ("device-unknown", lambda t: gen(FX.hf, "--device", "banana"), 2, "is not a device"),
    ("device-cuda-without-one", lambda t: gen(FX.hf, "--device", "cuda") if not torch.cuda.is_available()
     else gen(FX.hf, "--device", "cuda:999"), 2, "--device cuda"),  # fmt: skip
    ("device-cuda-index-beyond", lambda t: gen(FX.hf, "--device", "cuda:999"), 2, "--device cuda:999"),
    ("device-mps", lambda t: gen(FX.hf, "--device", "mps"), 2, "mps"),
    ("device-meta", lambda t: gen(FX.hf, "--device", "meta"), 2, "not meta"),
    ("chat-device-unknown", lambda t: ["chat", "--model", str(FX.hf), "--device", "gpu0"], 2, "is not a device"),
    # sizes past any sensible run
    ("max-steps-huge", lambda t: train_args(FX, t / "o", "--max-steps", "1000000000000"), 2, "--max-steps"),
    ("max-steps-negative", lambda t: train_args(FX, t / "o", "--max-steps", "-5"), 2, "--max-steps"),
    ("epochs-huge", lambda t: train_args(FX, t / "o", "--max-steps", "-1", "--epochs", "1e308"), 2, "--epochs"),
    ("epochs-infinite", lambda t: train_args(FX, t / "o", "--max-steps", "-1", "--epochs", "inf"), 2, "--epochs"),
    ("max-new-tokens-past-the-context", lambda t: gen(FX.hf)[:-4] + ["--max-new-tokens", "1000000000", "--dtype",
                                                                       "fp32"], 1, "exceeds the context"),  # fmt: skip
    ("max-new-tokens-negative", lambda t: gen(FX.hf, "--max-new-tokens", "-3"), 2, "--max-new-tokens"),
    ("top-k-word", lambda t: gen(FX.hf, "--top-k", "all"), 2, "--top-k"),
    ("seed-huge", lambda t: gen(FX.hf, "--seed", str(2**64)), 2, "--seed"),
    ("temperature-infinite", lambda t: gen(FX.hf, "--temperature", "inf"), 2, "--temperature"),
    # config fields past any gpt-oss shape (bounded, the reason in the message)
    ("config-rope-theta-huge", lambda t: info(hf_with(t, rope_theta=1e308)), 1, "rope_theta"),
    ("config-yarn-factor-huge", lambda t: info(hf_with(t, rope_scaling={"rope_type": "yarn", "factor": 1e300,
     "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096})), 1, "factor"),  # fmt: skip
    ("config-swiglu-limit-tiny", lambda t: info(hf_with(t, swiglu_limit=1e-300)), 1, "swiglu_limit"),
    ("config-window-huge", lambda t: info(hf_with(t, sliding_window=10**18)), 1, "sliding_window"),
    ("config-vocab-huge", lambda t: info(hf_with(t, vocab_size=10**12)), 1, "vocab_size"),
    ("config-negative-width", lambda t: info(hf_with(t, hidden_size=-64)), 1, "hidden_size"),
    ("config-top-k-zero", lambda t: info(hf_with(t, num_experts_per_tok=0, experts_per_token=0)), 1,
     "num_experts_per_tok"),
    ("config-top-k-above-experts", lambda t: info(hf_with(t, num_experts_per_tok=99, experts_per_token=99)), 1,
     "num_experts_per_tok"),
    ("config-zero-head-dim", lambda t: info(hf_with(t, head_dim=0)), 1, "head_dim"),
    ("config-zero-context", lambda t: info(hf_with(t, max_position_embeddings=0)), 1, "max_position_embeddings"),
    ("config-theta-string", lambda t: info(hf_with(t, rope_theta="150000")), 1, "rope_theta"),
    # generation flags of the wrong kind
    ("generate-dtype-fp16", lambda t: gen(FX.hf, "--dtype", "fp16"), 2, "--dtype"),
    ("generate-experts-unknown", lambda t: gen(FX.hf, "--experts", "int4"), 2, "--experts"),
    ("generate-effort-unknown", lambda t: gen(FX.hf, "--reasoning-effort", "max"), 2, "--reasoning-effort"),
    ("top-p-nan", lambda t: gen(FX.hf, "--top-p", "nan"), 2, "--top-p"),
    ("top-p-negative", lambda t: gen(FX.hf, "--top-p=-0.5"), 2, "--top-p"),
    ("temperature-word", lambda t: gen(FX.hf, "--temperature", "hot"), 2, "--temperature"),
    ("seed-word", lambda t: gen(FX.hf, "--seed", "lucky"), 2, "--seed"),
    # training flags of the wrong kind or size
    ("lora-alpha-negative", lambda t: train_args(FX, t / "o", "--lora-alpha=-16"), 2, "--lora-alpha"),
    ("lora-r-word", lambda t: train_args(FX, t / "o", "--lora-r", "eight"), 2, "--lora-r"),
    ("max-length-one", lambda t: train_args(FX, t / "o", "--max-length", "1"), 2, "--max-length"),
    ("batch-size-negative", lambda t: train_args(FX, t / "o", "--batch-size=-4"), 2, "--batch-size"),
    ("report-prompts-negative", lambda t: train_args(FX, t / "o", "--report-prompts=-1"), 2, "--report-prompts"),
    ("save-every-negative", lambda t: train_args(FX, t / "o", "--save-every=-10"), 2, "--save-every"),
    ("train-dtype-unknown", lambda t: train_args(FX, t / "o", "--dtype", "fp8"), 2, "--dtype"),
    ("train-seed-huge", lambda t: train_args(FX, t / "o", "--seed", str(2**70)), 2, "--seed"),
    # the app's flags: all refused before the page is served
    ("app-port-zero", lambda t: app(FX.hf, "--port", "0"), 2, "--port"),
    ("app-port-negative", lambda t: app(FX.hf, "--port=-80"), 2, "--port"),
    ("app-port-huge", lambda t: app(FX.hf, "--port", "70000"), 2, "--port"),
    ("app-port-word", lambda t: app(FX.hf, "--port", "http"), 2, "--port"),
    ("app-port-taken", lambda t: app(FX.hf, "--port", str(taken_port())), 2, "--port"),
    ("app-host-empty", lambda t: app(FX.hf, "--host", ""), 2, "--host"),
    ("app-host-not-here", lambda t: app(FX.hf, "--host", "192.0.2.1"), 2, "--host"),  # TEST-NET: never local
    ("app-host-malformed", lambda t: app(FX.hf, "--host", "a" * 300), 2, "--host"),
    ("app-model-missing", lambda t: app(t / "nothing"), 1, "does not exist"),
    ("app-adapter-missing", lambda t: app(FX.hf, "--adapter", str(t / "none")), 1, "does not exist"),
    ("app-dtype-fp16", lambda t: app(FX.hf, "--dtype", "fp16"), 2, "--dtype"),
    ("app-device-unknown", lambda t: app(FX.hf, "--device", "tpu"), 2, "--device"),
    # pipes named like the files a command reads: opening one waits for a writer, perhaps forever
    ("model-shard-a-pipe", lambda t: info(fifo_in(t, "model.safetensors", config=True)), 1, "not a regular file"),
    ("dataset-a-pipe", lambda t: train_args(FX, t / "o", "--dataset", str(fifo_in(t, "rows.jsonl") / "rows.jsonl")),
     1, "not a regular file"),  # fmt: skip
    ("adapter-a-pipe", lambda t: gen(FX.hf, "--adapter", str(fifo_in(copy(FX.adapter, t, "adapter"),
                                                                     "adapter_model.safetensors", replace=True))), 1,
     "not a regular file"),  # fmt: skip
]  # fmt: skip


def snapshot(*folders: Path) -> dict[Path, str]:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for f in folders
        if f.exists()
        for p in f.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(case, fx, tmp_path, capsys, monkeypatch):
    global FX
    FX = fx
    name, setup, code, culprit = case
    monkeypatch.delenv("GPTOSS_DEBUG", raising=False)
    argv = setup(tmp_path)
    before = snapshot(tmp_path)
    shared = {p: (p.stat().st_size, p.stat().st_mtime_ns) for f in (fx.hf, fx.adapter) for p in f.rglob("*")}
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r"gptoss( \w+)?: error: ", last), last
    assert culprit in last, last
    assert {p: h for p, h in snapshot(tmp_path).items() if p in before} == before  # nothing the user had changed
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in shared} == shared


# docs/guide.md's reliability table counts the rows by class (first rule that matches)
CLASSES = (
    (
        "empty paths",
        lambda i: i.endswith("-empty") and i.startswith(("train-", "synth-", "demo-", "generate-", "info-")),
    ),
    ("the app", lambda i: i.startswith("app-")),
    ("devices", lambda i: "device" in i),
    (
        "checkpoints and configs",
        lambda i: i.startswith(
            ("model-", "config-", "unknown-tensor", "duplicated-", "two-", "file-not", "index-", "wrong-dtype", "nan-")
        ),
    ),  # fmt: skip
    ("adapters", lambda i: i.startswith("adapter-")),
    ("training data", lambda i: i.startswith(("dataset-", "max-length-below"))),
    ("output folders and resuming", lambda i: i.startswith(("output-", "resume-"))),
    ("synth and demo", lambda i: i.startswith(("synth-", "demo-"))),
    (
        "generation flags",
        lambda i: i.startswith(
            ("temperature-", "top-", "max-new-tokens-", "seed-", "prompt-", "chat-", "unknown-flag", "generate-")
        ),
    ),  # fmt: skip
    ("training flags", lambda i: True),
)


def class_counts() -> dict[str, int]:
    counts = dict.fromkeys((name for name, _ in CLASSES), 0)
    for case in CASES:
        counts[next(name for name, rule in CLASSES if rule(case[0]))] += 1
    return counts


def test_the_guide_reliability_table_counts_the_rows_by_class():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "guide.md").read_text()
    rows = dict(re.findall(r"^\| ([a-z ,]+) \| (\d+) \|$", readme, flags=re.M))
    counts = class_counts()
    assert {name: int(rows.get(name, -1)) for name in counts} == counts, "update the reliability table in docs/guide.md"
    assert int(rows["all rows"]) == len(CASES)


def test_the_table_covers_every_part():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    argv0 = {c[0]: c[1] for c in CASES}
    assert {"model-missing", "adapter-r-zero", "temperature-nan", "lora-r-zero", "resume-other-lr"} <= set(argv0)


# -- what a table row cannot show -------------------------------------------------------------------------


class Payload:
    """Unpickling this creates the file `marker`: a stand-in for any code a crafted pickle runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_pickle_is_never_run(fx, tmp_path, capsys):
    payload = pickle.dumps({"step": 2, "params": Payload(tmp_path / "ran")})
    pickle.loads(payload)  # the payload is live: unpickling it does run code
    assert (tmp_path / "ran").exists()
    (tmp_path / "ran").unlink()
    old = tmp_path / "old"
    old.mkdir()
    (old / "checkpoint.pt").write_bytes(payload)  # an older run's pickle, or a planted one
    assert main(train_args(fx, old, "--resume")) == 1
    assert "is a pickle written by an older gptoss; it is not loaded" in capsys.readouterr().err
    planted = copy(fx.partial, tmp_path, "planted")
    (planted / "checkpoint.safetensors").write_bytes(payload)  # a pickle under the new name
    assert main(train_args(fx, planted, "--resume")) == 1
    assert "checkpoint.safetensors" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "ran").exists()
    assert "weights_only=False" not in Path(trainer_module.__file__).read_text()


def test_resume_continues_and_the_log_has_each_step_once(fx, tmp_path, capsys):
    run = copy(fx.partial, tmp_path, "run")
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')  # steps after the checkpoint, the last cut short
    assert main(train_args(fx, run, "--resume")) == 0
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert read_checkpoint_header(run / "checkpoint.safetensors")["step"] == 4


def test_overwrite_replaces_a_run(fx, tmp_path):
    run = copy(fx.finished, tmp_path, "run")
    (run / "notes.txt").write_text("mine")
    (run / "report.png").write_bytes(b"the previous run's plot")  # written by train/report.py beside report.md
    assert main(train_args(fx, run, "--max-steps", "1", "--overwrite")) == 0
    assert not (run / "report.png").exists()  # --report-prompts 0: no report this time, and none left from before
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1]
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_nan_loss_stops_and_keeps_the_last_checkpoint(fx, tmp_path, capsys, monkeypatch):
    calls = []
    real = trainer_module.next_token_loss

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, n = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 3 else loss), n

    monkeypatch.setattr(trainer_module, "next_token_loss", poisoned)
    out = tmp_path / "o"
    assert main(train_args(fx, out)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss nan at step 3: training stopped; the checkpoint of step 2" in last
    assert read_checkpoint_header(out / "checkpoint.safetensors")["step"] == 2
    assert not (out / "adapter_model.safetensors").exists()  # no adapter from a diverged run


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(fx, tmp_path, capsys, monkeypatch):
    real, calls = trainer_module.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(trainer_module, "save_file", full_disk)
    out = tmp_path / "o"
    assert main(train_args(fx, out, "--save-every", "1")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could not write" in last and "No space left on device" in last and "step 1 is intact" in last
    assert read_checkpoint_header(out / "checkpoint.safetensors")["step"] == 1
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_a_real_write_failure_in_a_fresh_process(fx, tmp_path):
    """The file-size limit (RLIMIT_FSIZE) makes the kernel refuse the checkpoint's write mid-file (EFBIG):
    the resumed run stops in one line and the checkpoint of step 2 is left byte for byte."""
    run = copy(fx.partial, tmp_path, "run")
    checkpoint = (run / "checkpoint.safetensors").read_bytes()
    limit = len(checkpoint) // 2

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "gptoss", *train_args(fx, run, "--resume", "--save-every", "1")],
                            capture_output=True, text=True, preexec_fn=limited, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and "could not write" in last and "File too large" in last, last
    assert (run / "checkpoint.safetensors").read_bytes() == checkpoint
    assert not list(run.glob("*.tmp"))


def test_a_malformed_command_line_is_one_line_with_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptoss", "train", "--model"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--model" in result.stderr
    result = subprocess.run([sys.executable, "-m", "gptoss", "info", "--model", str(tmp_path / "x")],
                            capture_output=True, text=True, env={**os.environ, "GPTOSS_DEBUG": "1"})  # fmt: skip
    assert result.returncode == 1 and "Traceback" in result.stderr  # GPTOSS_DEBUG=1 shows it


# -- chat -------------------------------------------------------------------------------------------------


def _chat(fx, monkeypatch, capsys, stdin: bytes, *flags: str, interrupt_first: bool = False):
    import gptoss.cli as cli

    calls = []
    real = sys.modules["gptoss.generate"].generate

    def spy(model, prompts, **kw):
        calls.append((prompts[0], kw))
        if interrupt_first and len(calls) == 1:
            raise KeyboardInterrupt
        return real(model, prompts, **kw)

    monkeypatch.setattr(sys.modules["gptoss.generate"], "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = cli.main(["chat", "--model", str(fx.hf), "--max-new-tokens", "2", "--dtype", "fp32", *flags])
    return code, calls, capsys.readouterr()


def test_chat_survives_a_line_that_is_not_utf8(fx, monkeypatch, capsys):
    code, calls, out = _chat(fx, monkeypatch, capsys, b"\xff\xfe hello\nWhat is 2 + 2?\n")
    assert code == 0 and "not valid UTF-8" in out.err and len(calls) == 1
    from gptoss import harmony

    assert "What is 2 + 2?" in harmony.decode(calls[0][0])


def test_chat_ctrl_c_stops_the_reply_and_drops_its_message(fx, monkeypatch, capsys):
    from gptoss import harmony

    code, calls, out = _chat(fx, monkeypatch, capsys, b"first question\nsecond question\n", interrupt_first=True)
    assert code == 0 and "(reply stopped" in out.out and len(calls) == 2
    second = harmony.decode(calls[1][0])
    assert "second question" in second and "first question" not in second


def test_chat_ctrl_c_at_the_prompt_ends_the_session(fx, monkeypatch, capsys):
    import gptoss.cli as cli

    def interrupted(stream):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "read_line", interrupted)
    assert cli.main(["chat", "--model", str(fx.hf), "--dtype", "fp32"]) == 0


def test_chat_honours_every_sampling_flag(fx, monkeypatch, capsys):
    flags = ("--top-k", "3", "--top-p", "0.5", "--temperature", "0.7", "--seed", "11")
    code, calls, _ = _chat(fx, monkeypatch, capsys, b"hi\n", *flags)
    assert code == 0
    kw = calls[0][1]
    assert (kw["top_k"], kw["top_p"], kw["temperature"], kw["seed"], kw["max_new_tokens"]) == (3, 0.5, 0.7, 11, 2)


@pytest.mark.parametrize(
    "env, culprit",
    [
        ({"RANK": "1"}, "RANK=1 set without a launcher"),  # a single process that wrote nothing and said done
        ({"WORLD_SIZE": "2"}, "RANK and WORLD_SIZE come together"),  # waited 30 minutes for a peer
        ({"RANK": "0", "WORLD_SIZE": "2"}, "needs MASTER_ADDR and MASTER_PORT"),
        (
            {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
            "expected 0 <= RANK < WORLD_SIZE",
        ),
        ({"RANK": "one", "WORLD_SIZE": "2"}, "must be integers"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "expected 0 <= RANK < WORLD_SIZE"),
    ],
)
def test_a_lone_process_with_launcher_variables_stops_up_front(fx, tmp_path, monkeypatch, capsys, env, culprit):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(train_args(fx, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert culprit in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_overwrite_never_deletes_the_base_model_or_a_model_folder_it_did_not_write(fx, tmp_path, capsys):
    run = copy(fx.finished, tmp_path, "run")
    mine = copy(fx.hf, run, "model")  # the user keeps a model in the run's folder
    assert main(train_args(fx, run, "--max-steps", "1", "--overwrite")) == 1
    assert "holds model/, which this trainer did not write" in capsys.readouterr().err
    assert (mine / "config.json").exists()
    args = train_args(fx, run, "--max-steps", "1", "--overwrite")
    args[args.index("--model") + 1] = str(mine)  # ... and trains from it
    assert main(args) == 1
    assert "lies inside --output" in capsys.readouterr().err and (mine / "config.json").exists()


def test_a_run_lists_what_it_wrote_and_overwrite_removes_only_that(fx, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(fx, run, "--max-steps", "1")) == 0
    listed = json.loads((run / "gptoss_run.json").read_text())["files"]
    assert "adapter_model.safetensors" in listed and "model" not in listed
    (run / "keep.txt").write_text("mine")
    assert main(train_args(fx, run, "--max-steps", "1", "--overwrite")) == 0
    assert (run / "keep.txt").read_text() == "mine" and (run / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "manifest", ["{", "[]", '{"files": "adapter_config.json"}', '{"files": ["../outside.txt", "keep.txt", 7]}']
)
def test_a_broken_or_hostile_run_manifest_never_widens_what_overwrite_removes(fx, tmp_path, manifest):
    run = copy(fx.finished, tmp_path, "run")
    (run / "gptoss_run.json").write_text(manifest)
    (run / "keep.txt").write_text("mine")
    (tmp_path / "outside.txt").write_text("mine too")
    assert main(train_args(fx, run, "--max-steps", "1", "--overwrite")) == 0
    assert (run / "keep.txt").read_text() == "mine" and (tmp_path / "outside.txt").read_text() == "mine too"
    assert json.loads((run / "gptoss_run.json").read_text())["files"]  # the new run's own manifest
