"""The trainer: loss masks, malformed rows, a falling loss, exact resume, and two processes under
torchrun equal to one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROW, TRAIN_CONFIG
from safetensors.torch import load_file

from gptoss import harmony
from gptoss.synthetic import write_checkpoint
from gptoss.train import data as train_data
from gptoss.train.data import MalformedRowError, load_dataset, render_example
from gptoss.train.run_folder import read_checkpoint_header
from gptoss.train.trainer import TrainConfig, Trainer, lr_at


def test_loss_mask_covers_exactly_the_assistant_turn():
    ids, mask = render_example(ROW, max_length=4096)
    supervised = harmony.decode([t for t, m in zip(ids, mask) if m])
    assert supervised == (
        "<|channel|>analysis<|message|>Wir addieren 12 und 30. Die Summe ist 42.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>12 plus 30 is 42.<|return|>"
    )
    prompt = harmony.decode([t for t, m in zip(ids, mask) if not m])
    assert prompt.endswith("<|start|>user<|message|>What is 12 plus 30?<|end|><|start|>assistant")
    assert "reasoning language: German\n\nYou are a helpful assistant." in prompt
    assert mask == sorted(mask)  # one contiguous supervised span at the end


def test_messages_form_renders_like_the_flat_form():
    messages = {
        "reasoning_language": "German",
        "messages": [
            {
                "role": "system",
                "content": "reasoning language: German\n\nYou are a helpful assistant.",
                "thinking": None,
            },
            {"role": "user", "content": ROW["user"], "thinking": None},
            {"role": "assistant", "content": ROW["final"], "thinking": ROW["analysis"]},
        ],
    }
    assert render_example(messages, 4096) == render_example(ROW, 4096)


def test_truncation_skipping_and_counts(tmp_path):
    path = tmp_path / "rows.jsonl"
    long = dict(ROW, analysis="Wir addieren. " * 200)
    path.write_text("\n".join(json.dumps(r) for r in (ROW, long, ROW)) + "\n")
    full = load_dataset(path, max_length=4096)
    cut = load_dataset(path, max_length=120)
    assert cut.truncated == 1 and len(cut.examples[1].input_ids) == 120
    skipped = load_dataset(path, max_length=120, skip_long=True)
    assert skipped.skipped_long == 1 and len(skipped.examples) == 2
    assert full.supervised_tokens == sum(sum(e.loss_mask) for e in full.examples) > 0
    assert "3 examples" in full.summary() and "supervised tokens" in full.summary()


def test_malformed_rows_name_their_row_or_are_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + "{broken\n" + json.dumps(dict(ROW, user=None)) + "\n")
    with pytest.raises(MalformedRowError, match="row 1: not valid JSON"):
        load_dataset(path)
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(dict(ROW, user=None)) + "\n")
    with pytest.raises(MalformedRowError, match="row 1: expected a non-empty string 'user', found nothing"):
        load_dataset(path)
    data = load_dataset(path, skip_malformed=True)
    assert len(data.examples) == 1 and len(data.skipped_malformed) == 1


def test_bundled_dataset_has_unseen_held_out_languages():
    train = load_dataset(train_data.BUNDLED_TRAIN)
    held = load_dataset(train_data.BUNDLED_HELDOUT)
    seen = {e.reasoning_language for e in train.examples}
    assert {"Portuguese", "Dutch"} <= {e.reasoning_language for e in held.examples} - seen
    assert len(train.examples) >= 500 and not train.truncated


def test_schedule_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(model="base", output="run", lr=1e-3, warmup_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-4, rel=0.01)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("train-base"), TRAIN_CONFIG, "hf-mxfp4", seed=2)


def _cfg(base, out, **kw):
    settings = dict(
        model=str(base),
        output=str(out),
        max_steps=4,
        batch_size=2,
        grad_accum=2,
        lr=1e-2,
        eval_every=2,
        save_every=2,
        report_prompts=0,
        lora_expert_layers=[1],
    )
    return TrainConfig(**(settings | kw))


def test_loss_falls_and_files_are_written(base, tmp_path):
    from gptoss.cli import main

    args = [
        "train",
        "--model",
        str(base),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "8",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
        "--eval-every",
        "4",
        "--report-prompts",
        "2",
        "--lora-expert-layers",
        "1",
    ]
    assert main(args) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert sum(r["loss"] for r in log[-2:]) < sum(r["loss"] for r in log[:2]) - 0.5  # clearly learning
    assert "eval_loss" in log[3] and "eval_loss" in log[7]
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint.safetensors",
        "loss.png",
        "report.md",
        "report.json",
    ):
        assert (tmp_path / "run" / name).exists(), name


def test_resume_continues_exactly(base, tmp_path, monkeypatch):
    straight = Trainer(_cfg(base, tmp_path / "straight")).run()
    original = Trainer.train_step

    def interrupted(self):  # Ctrl-C while step 3 runs
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(base, tmp_path / "resumed")).run()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert read_checkpoint_header(tmp_path / "resumed" / "checkpoint.safetensors")["step"] == 2
    resumed = Trainer(_cfg(base, tmp_path / "resumed", resume=True)).run()
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0)


def free_port() -> str:
    """A port nothing listens on now (a fixed one collided when two suites ran on one machine)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def test_torchrun_two_processes_equal_one(base, tmp_path):
    common = [
        "-m",
        "gptoss",
        "train",
        "--model",
        str(base),
        "--max-steps",
        "2",
        "--lr",
        "1e-2",
        "--eval-dataset",
        "",
        "--report-prompts",
        "0",
        "--lora-expert-layers",
        "1",
        "--save-every",
        "100",
    ]
    # the same global batch of 4: one process accumulating 2 x 2; two (DistributedDataParallel over gloo)
    # of 2 each; two accumulating 2 x 1 each (DDP's no_sync on the first accumulation step)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    runs = {
        "one": [sys.executable, *common, "--batch-size", "2", "--grad-accum", "2"],
        "two": [*torchrun, free_port(), *common, "--batch-size", "2", "--grad-accum", "1"],
        "two-accum": [*torchrun, free_port(), *common, "--batch-size", "1", "--grad-accum", "2"],
    }
    losses, adapters = {}, {}
    for name, cmd in runs.items():
        done = subprocess.run([*cmd, "--output", str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        log = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        losses[name] = [(json.loads(line)["loss"], json.loads(line)["grad_norm"]) for line in log]
        adapters[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    for name in ("two", "two-accum"):
        assert len(losses[name]) == len(losses["one"]) == 2
        for a, b in zip(losses["one"], losses[name]):  # loss and gradient norm (AdamW alone would hide a
            assert a == pytest.approx(b, rel=1e-5)  # gradient off by a constant factor); only summation order differs
        # and the same update: every adapter tensor after two steps. AdamW divides each element's gradient by
        # its own magnitude (plus eps = 1e-8), so an element whose gradient is at rounding level takes a step
        # of up to lr whose size and sign the summation order decides (measured: 1 element of 9,000, off by
        # 2.7e-4, after the bundled data changed). Such an element may differ by at most the two steps' lr;
        # anything wrong in the averaging or the accumulation moves far more than 0.1% of the elements.
        assert adapters[name].keys() == adapters["one"].keys()
        for key, want in adapters["one"].items():
            got = adapters[name][key]
            off = ~torch.isclose(got, want, rtol=1e-4, atol=1e-6)
            assert int(off.sum()) <= max(1, want.numel() // 1000), (name, key, int(off.sum()))
            assert ((got - want).abs()[off] <= 2 * 1e-2).all(), (name, key)


def test_parquet_and_hub_dataset_ids(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder = tmp_path / "hub"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([ROW, dict(ROW, user="What is 1 plus 1?")]), folder / "train.parquet")
    assert len(load_dataset(folder / "train.parquet").examples) == 2
    calls = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type))
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert len(load_dataset("HuggingFaceH4/Multilingual-Thinking").examples) == 2
    assert calls == [("HuggingFaceH4/Multilingual-Thinking", "dataset")]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset("missing/file.jsonl")


@pytest.mark.parametrize("chunk", [1, 5, 256])  # one row, a ragged last chunk, all rows at once
@pytest.mark.parametrize("weight_grad", [False, True])  # LoRA (frozen unembedding) and full fine-tuning
def test_linear_cross_entropy_equals_the_unfused_loss_and_gradients(weight_grad, chunk):
    from gptoss.train.loss import linear_cross_entropy

    N, D, V = 37, 24, 1000
    h = torch.randn(N, D, requires_grad=True)
    weight = (torch.randn(V, D) / D**0.5).requires_grad_(weight_grad)
    target = torch.randint(0, V, (N,))
    ours = linear_cross_entropy(h, weight, target, chunk)
    (ours * 0.5).backward()  # a non-unit upstream gradient
    grads = (h.grad.clone(), weight.grad.clone() if weight_grad else None)
    h.grad = None
    weight.grad = None
    reference = F.cross_entropy(F.linear(h, weight).float(), target, reduction="sum")
    (reference * 0.5).backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-5, atol=1e-6)
    if weight_grad:
        torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"need h \[N, D\] and target \[N\]"):
        linear_cross_entropy(h, weight, target[:-1])
    with pytest.raises(ValueError, match="chunk must be at least 1 row, got 0"):
        linear_cross_entropy(h, weight, target, 0)


def test_the_loss_keeps_a_chunk_of_logits_not_all_of_them(tmp_path):
    # 2,048 targets over the real vocabulary (201,088): the unchunked fp32 logits alone are 1.65 GB. The
    # peak of the process's resident memory over the loss's forward and backward, in a fresh process
    # (a narrow hidden size keeps it quick; the logits' size does not depend on it)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, resource, torch\n"
        "from gptoss.train.loss import linear_cross_entropy\n"
        "torch.manual_seed(0)\n"
        "h = torch.randn(2048, 64, requires_grad=True)\n"
        "weight = torch.randn(201088, 64) / 8\n"
        "target = torch.randint(0, 201088, (2048,))\n"
        "linear_cross_entropy(h[:8], weight, target[:8]).backward()  # warm the allocator and the kernels\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "linear_cross_entropy(h, weight, target).backward()\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps(dict(peak=after - before)))\n"
    )
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
    assert peak <= 0.5e9, f"the loss at 2,048 targets grew the process by {peak / 1e9:.2f} GB"


def test_a_known_target_count_picks_the_supervised_rows_without_asking_the_device():
    from torch.utils._python_dispatch import TorchDispatchMode

    from gptoss.train.loss import next_token_loss

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    class Toy(torch.nn.Module):  # the two things the loss reads of a model
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.lm_head = torch.nn.Linear(16, 50, bias=False)

        def hidden(self, ids, check=True):
            return self.embed(ids)

    model = Toy()
    ids = torch.randint(0, 50, (3, 11))
    mask = torch.rand(3, 11) < 0.6
    count = int(mask[:, 1:].sum())
    plain, n = next_token_loss(model, ids, mask)
    with Ops() as ops:
        counted, m = next_token_loss(model, ids, mask, count)
    assert n == m == count and torch.equal(counted, plain)
    assert not ops.seen & {"_local_scalar_dense", "nonzero", "item"}, ops.seen  # no host synchronisation
    expected = F.cross_entropy(
        model.lm_head(model.embed(ids[:, :-1]))[mask[:, 1:]], ids[:, 1:][mask[:, 1:]], reduction="sum"
    )
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-4)


def test_auto_trains_in_bf16_on_a_gpu_and_fp32_on_the_cpu():
    from gptoss.errors import UsageError
    from gptoss.train.trainer import train_dtype

    assert train_dtype("auto", torch.device("cuda", 0)) == (torch.bfloat16, True)
    assert train_dtype("auto", torch.device("cpu")) == (torch.float32, False)
    assert train_dtype("fp32", torch.device("cuda", 0)) == (torch.float32, False)  # parity runs
    assert train_dtype("bf16", torch.device("cpu")) == (torch.bfloat16, False)
    with pytest.raises(UsageError, match="--dtype must be auto, bf16 or fp32, found 'fp16'"):
        train_dtype("fp16", torch.device("cpu"))


def test_under_the_gpu_settings_every_kernel_and_product_takes_bf16_and_nothing_asks_the_device(tmp_path, monkeypatch):
    # what `gptoss train` builds on a GPU with the default --dtype auto, run here on the interpreter: the
    # operand each kernel multiplies (MoE: x / act / grad / gh; attention: q, k, v, dO) is never fp32;
    # nor is any matrix product PyTorch runs, forward (under autocast, as the trainer's on CUDA: here the
    # CPU's) or backward (outside it, as on CUDA, where the autograd engine's threads have it off). An
    # fp32 product there is an fp32 GEMM on CUDA cores: the expert adapters' backward was, at E times
    # the rank-r work. Matrix-vector products are bandwidth-bound: left out.
    from conftest import small_config
    from torch.overrides import TorchFunctionMode
    from triton.runtime.jit import KernelInterface

    from gptoss import load_model
    from gptoss.adapter import apply_lora
    from gptoss.launches import LaunchCounter, jit_function
    from gptoss.model import check_input_ids
    from gptoss.train.data import Example
    from gptoss.train.trainer import Objective, device_batch, train_dtype

    class Products(LaunchCounter):  # PyTorch's matrix products outside the Triton kernels, with dtypes
        def __init__(self):
            super().__init__()
            self.fp32 = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            name = func.overloadpacket.__name__
            matrix = name in {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"} and min(out.shape[-2:]) > 1
            if matrix and not self._inside and any(getattr(a, "dtype", None) == torch.float32 for a in args):
                self.fp32.append((name, tuple(out.shape)))
            return out

    dtype, _ = train_dtype("auto", torch.device("cuda", 0))
    operands = {"x_ptr", "act_ptr", "grad_ptr", "gh_ptr", "q_ptr", "k_ptr", "v_ptr", "do_ptr"}
    seen: dict[str, set] = {}
    launch = KernelInterface.__getitem__

    def recording(kernel, grid):
        run = launch(kernel, grid)

        def call(*args, **kwargs):
            fn = jit_function(kernel)
            for name, value in [*zip(fn.arg_names, args), *kwargs.items()]:
                if name in operands and isinstance(value, torch.Tensor):
                    seen.setdefault(f"{fn.__name__}.{name}", set()).add(value.dtype)
            return run(*args, **kwargs)

        return call

    monkeypatch.setattr(KernelInterface, "__getitem__", recording)
    folder = write_checkpoint(tmp_path / "c", small_config(), "hf-mxfp4", seed=2)
    model = load_model(folder, backend="triton", dtype=dtype)
    apply_lora(model, 4, 8, [1])  # q/k/v/o everywhere, the experts of layer 1
    model.gradient_checkpointing = True
    model.train()
    # a batch as the trainer makes it: checked and counted on the host, sent without a wait
    generator = torch.Generator().manual_seed(0)
    row = torch.randint(0, 300, (12,), generator=generator).tolist()
    examples = [Example(row, [0] * 4 + [1] * 8, "German", 0)]
    sent = []

    class Copies(TorchFunctionMode):  # every copy device_batch makes: is it sent without waiting?
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to:
                sent.append((kwargs or {}).get("non_blocking", False) or (len(args) > 2 and args[2] is True))
            return func(*args, **(kwargs or {}))

    with Copies():
        ids, mask, count = device_batch(examples, model.config, torch.device("cpu"))
    assert sent == [True, True] and count == 8
    with Products() as forward, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = Objective(model)(ids, mask, count)
    with Products() as backward:
        loss.backward()
    assert not forward.fp32 and not backward.fp32, (forward.fp32, backward.fp32)
    # nothing in the step asks the device (on a GPU each of these waits for it): the ids were checked on
    # the host; the model's own check, which the step skips, reads them back from the device twice
    assert not forward.syncs and not backward.syncs, (forward.syncs, backward.syncs)
    with LaunchCounter() as checked:
        check_input_ids(ids, model.config)
    assert checked.syncs == ["_local_scalar_dense"] * 2
    moe = {
        "_moe_gate_up_kernel.x_ptr",
        "_moe_down_kernel.act_ptr",
        "_moe_down_bwd_kernel.grad_ptr",
        "_moe_gate_up_bwd_kernel.gh_ptr",
    }
    assert moe | {"_attn_fwd_kernel.q_ptr", "_attn_bwd_dkdv_kernel.do_ptr"} <= seen.keys(), seen
    fp32 = sorted(name for name, dtypes in seen.items() if dtypes != {torch.bfloat16})
    assert not fp32, {name: seen[name] for name in fp32}


def test_a_checkpointed_step_on_the_triton_backend_launches_what_it_needs_and_its_gradients_are_exact(tmp_path):
    # RMSNorm and RoPE: the torch RMSNorm is eight launches forward (upcast, square, mean, add, rsqrt, two
    # products, cast) and a dozen backward over the residual stream, the torch RoPE eight per tensor (split,
    # four products, sub, add, cat); the triton backend's are one kernel each way.
    # The MoE: a checkpointed layer runs again in the backward, where nothing reads its output, so the MoE
    # makes only what its backward keeps, no down product and no combine there; the gradients are an
    # uncheckpointed step's bit for bit (a step of the layer that saved something made from the MoE output
    # would differ)
    from conftest import small_config

    from gptoss import load_model
    from gptoss.adapter import apply_lora
    from gptoss.launches import LaunchCounter
    from gptoss.train.loss import next_token_loss

    config = small_config(num_hidden_layers=2)  # a sliding and a full layer
    L = config.num_hidden_layers
    folder = write_checkpoint(tmp_path / "c", config, "hf-mxfp4", seed=2)
    ids = torch.randint(0, 300, (1, 12))
    grads, launches = {}, {}
    for checkpointing in (False, True):
        model = load_model(folder, backend="triton", dtype=torch.bfloat16)
        apply_lora(model, 4, 8, [1])  # q/k/v/o everywhere, both expert matrices of layer 1
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # B non-zero too: every adapter's update reaches the output
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        model.gradient_checkpointing = checkpointing
        model.train()
        with LaunchCounter() as forward:
            loss, _ = next_token_loss(model, ids)
        with LaunchCounter() as backward:
            loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        launches[checkpointing] = (forward, backward)
    assert grads[True].keys() == grads[False].keys() and any("experts" in n for n in grads[True])
    for name, grad in grads[False].items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(grads[True][name], grad), name
    for checkpointing, (forward, backward) in launches.items():
        assert forward.triton.count("_moe_down_kernel") == forward.triton.count("_moe_combine_kernel") == L
        assert backward.triton.count("_moe_gate_up_kernel") == (L if checkpointing else 0)  # h made again
        assert backward.triton.count("_moe_down_kernel") == 0  # the output, not
        assert backward.triton.count("_moe_combine_kernel") == L  # d x's only
        assert backward.triton.count("_moe_down_bwd_kernel") == backward.triton.count("_moe_gate_up_bwd_kernel") == L
    forward, backward = launches[True]
    norms = 2 * L + 1
    assert forward.triton.count("_rmsnorm_fwd_kernel") == norms
    # backward: the checkpointed layers run their two norms forward again, then every norm backward once,
    # but the first: its input, the frozen embedding's output, needs no gradient
    assert backward.triton.count("_rmsnorm_fwd_kernel") == 2 * L
    assert backward.triton.count("_rmsnorm_bwd_kernel") == norms - 1
    # RoPE: queries and keys, one launch each, in every layer forward, again in its recomputation, and back
    assert forward.triton.count("_rope_kernel") == 2 * L
    assert backward.triton.count("_rope_kernel") == 4 * L
    for ops in (forward.torch, backward.torch):
        assert not {"pow", "rsqrt", "mean", "cat", "split"} & set(ops), sorted(set(ops))


@pytest.mark.parametrize("holder", ["alive", "other-host", "unreadable"])
def test_a_second_run_on_a_locked_output_is_refused_naming_the_holder(base, tmp_path, holder):
    import socket

    from gptoss.train.run_folder import LOCK, TrainError
    from gptoss.train.trainer import train

    out = tmp_path / "run"
    out.mkdir()
    lock = {
        "alive": {"pid": os.getpid(), "host": socket.gethostname(), "started": "today"},
        "other-host": {"pid": 1, "host": "elsewhere.example", "started": "today"},
    }.get(holder)
    (out / LOCK).write_text(json.dumps(lock) if lock else "\x00garbage")
    with pytest.raises(TrainError, match="is in use by another run") as refused:
        train(_cfg(base, out, max_steps=1))
    if lock:
        assert f"pid {lock['pid']} on {lock['host']}" in str(refused.value)
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written, the holder's lock kept


def test_a_lock_left_by_a_dead_run_is_taken_over_and_released(base, tmp_path, capsys):
    import socket
    import subprocess

    from gptoss.train.run_folder import LOCK
    from gptoss.train.trainer import train

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "yesterday"}))
    train(_cfg(base, out, max_steps=1))
    assert f"locked by a run that is gone (pid {gone.pid}" in capsys.readouterr().err
    assert not (out / LOCK).exists() and (out / "adapter_model.safetensors").exists()


def test_resume_from_another_base_model_of_the_same_shape_is_refused(base, tmp_path):
    from gptoss.train.run_folder import TrainError

    other = write_checkpoint(tmp_path / "other-base", TRAIN_CONFIG, "hf-mxfp4", seed=3)  # same shape, other weights
    Trainer(_cfg(base, tmp_path / "run", max_steps=2)).run()
    with pytest.raises(TrainError, match="settings differ.*base_weights"):
        Trainer(_cfg(other, tmp_path / "run", max_steps=2, resume=True))
    assert len(Trainer(_cfg(base, tmp_path / "run", max_steps=2, resume=True)).run()) == 0  # the same base resumes


def test_the_train_flags_are_the_config_fields():
    # each flag is made from its TrainConfig field: the defaults are the config's, and every flag reaches
    # its field (a field added to TrainConfig gets its flag without a second list to keep in step)
    import dataclasses

    from gptoss.cli import build_parser
    from gptoss.train.config import TrainConfig, flag_of, from_flags

    parser = build_parser()
    assert from_flags(parser.parse_args(["train", "--model", "m", "--output", "o"])) == TrainConfig(
        model="m", output="o"
    )
    values = dict(
        dataset="d.jsonl",
        eval_dataset="e.jsonl",
        max_steps=7,
        epochs=2.5,
        lr=1e-3,
        lora_r=4,
        lora_alpha=8.0,
        lora_expert_layers=[0, 2],
        full_finetune=True,
        batch_size=3,
        grad_accum=5,
        max_length=99,
        skip_long=True,
        skip_malformed=True,
        save_every=9,
        eval_every=11,
        dtype="fp32",
        gradient_checkpointing=False,
        seed=13,
        report_prompts=0,
    )
    flagged = {f.name: f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag") is not False}
    assert set(values) | {"model", "output", "resume", "overwrite"} == set(flagged)
    argv = ["train", "--model", "m", "--output", "o"]
    for name, value in values.items():
        flag = flag_of(flagged[name])
        if isinstance(value, bool):
            argv.append(flag)
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    assert from_flags(parser.parse_args(argv)) == TrainConfig(model="m", output="o", **values)
    assert (
        from_flags(parser.parse_args(["train", "--model", "m", "--output", "o", "--eval-dataset", ""])).eval_dataset
        is None
    )


def test_a_batch_is_checked_on_the_host_before_it_is_sent():
    # the model skips its own check of the ids in a training step (it would read them back from the
    # device): device_batch's check on the host is then the only one, and refuses ids out of the vocabulary
    from conftest import small_config

    from gptoss.train.data import Example
    from gptoss.train.trainer import device_batch

    config = small_config()
    good = Example([1, 2, 3], [0, 1, 1], "German", 0)
    ids, mask, count = device_batch([good], config, torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3]] and count == 2
    for bad in ([1, config.vocab_size, 3], [1, -1, 3]):
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
            device_batch([good, Example(bad, [0, 1, 1], "German", 1)], config, torch.device("cpu"))
