"""The benchmark scripts run (quick mode) and end with their JSON line; speed itself is never asserted."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    "script, flags",
    [("bench_mxfp4.py", []), ("bench_moe.py", []), ("bench_moe.py", ["--train"]), ("bench_attention.py", [])],
)
def test_benchmark_runs_and_reports(script, flags, tmp_path):
    env = dict(os.environ, GPTOSS_RESULTS_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *flags], capture_output=True, text=True, env=env, check=True
    )
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["results"] and all(r["ms"] > 0 for r in last["results"])
    name = script.removeprefix("bench_").removesuffix(".py")
    assert (tmp_path / f"{name}.jsonl").read_text().count("\n") == len(last["results"])
    if "cuda" not in {r["device"] for r in last["results"]}:
        assert "GPU figures were not taken" in out.stdout
    if name == "moe":  # every provider computes the same layer (bf16 rounding only)
        assert all(r["rel_err_vs_fp32"] < 2e-2 for r in last["results"])
        assert {r["pass"] for r in last["results"]} == {"forward+backward" if flags else "forward"}


def test_the_moe_training_rows_run_each_provider_forward_and_backward():
    # bench_moe --train times the Triton kernels only on a GPU; here its wrapper runs them (and the
    # grouped_mm provider) on tiny shapes under the interpreter: the output, and gradients that reach the
    # input and the router logits as a training step's do
    sys.path.insert(0, str(BENCH))
    try:
        import bench_moe
    finally:
        sys.path.remove(str(BENCH))
    from gptoss.config import ModelConfig
    from gptoss.kernels.moe import moe
    from gptoss.model import experts_forward, route

    config = ModelConfig(hidden_size=64, intermediate_size=64, num_local_experts=5, num_experts_per_tok=2)
    experts = bench_moe.random_experts(config, "cpu")
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    logits = torch.randn(6, 5, dtype=torch.bfloat16)
    grad = torch.randn(6, 64, dtype=torch.bfloat16)
    seen = []

    def triton(x, logits):
        seen.append((x, logits))
        return moe(x, logits, 2, experts)

    out = bench_moe._with_backward(triton, x, logits, grad)()
    xg, lg = seen[-1]
    want = experts_forward(x.float(), *route(logits.float(), 2), copy.deepcopy(experts).float(), 1.702, 7.0)
    assert not out.requires_grad and (out.float() - want).abs().max() <= 0.02 * want.abs().max()
    assert xg.grad is not None and xg.grad.abs().sum() > 0 and lg.grad is not None and lg.grad.abs().sum() > 0


def test_attention_bench_times_the_earlier_tiles_with_the_kernels_own_launches():
    # its rows of other tiles (OTHER_TILES) must launch the kernels with those tiles (here a set of its
    # own for the forward and dQ), and the chosen tiles must come back after them, also when a timing fails
    sys.path.insert(0, str(BENCH))
    try:
        import bench_attention
    finally:
        sys.path.remove(str(BENCH))
    from triton.runtime.jit import KernelInterface

    from gptoss.kernels import attention
    from gptoss.kernels.attention_core import CONFIGS

    chosen = copy.deepcopy(CONFIGS)
    earlier = {"fwd": (16, 16, 1, 1), "dq": (16, 16, 1, 1)}
    assert all(CONFIGS[name]["interpret"] != tile for name, tile in earlier.items())
    seen = []
    launch = KernelInterface.__getitem__

    def recording(kernel, grid):
        run = launch(kernel, grid)

        def call(*args, **kwargs):
            if "BLOCK_M" in kwargs:
                seen.append((kernel.__name__, kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
            return run(*args, **kwargs)

        return call

    q, k, v, sinks = bench_attention._inputs(1, 20, 20, "cpu", torch.float32, grad=True)
    pos = torch.arange(20)
    KernelInterface.__getitem__ = recording
    try:
        with bench_attention.tiles(earlier, "interpret"):
            attention.attention_with_sinks(q, k, v, sinks, pos, pos, None).sum().backward()
        with pytest.raises(RuntimeError), bench_attention.tiles(earlier, "interpret"):
            raise RuntimeError("a timing failed")
    finally:
        KernelInterface.__getitem__ = launch
    assert ("_attn_fwd_kernel", 16, 16) in seen and ("_attn_bwd_dq_kernel", 16, 16) in seen, seen
    assert CONFIGS == chosen
    # each other set the GPU times differs from the chosen bf16 tiles in every kernel it names, and the
    # two-stage set is the chosen tiles on two stages
    for other in bench_attention.OTHER_TILES.values():
        assert other and all(CONFIGS[name]["bf16"] != tile for name, tile in other.items()), other
    two = {name: (*CONFIGS[name]["bf16"][:3], 2) for name in ("fwd", "dq", "dkdv")}
    assert bench_attention.OTHER_TILES[bench_attention.TWO_STAGES] == two


def test_moe_bench_times_the_row_tiles_fastest_order_inside_its_provider_only():
    # its "row tiles fastest" rows: every row tile in one group while the provider runs (so the grid is
    # the one before groups: row tiles along x, one group along z), groups again afterwards, also after
    # a failure
    sys.path.insert(0, str(BENCH))
    try:
        import bench_moe
    finally:
        sys.path.remove(str(BENCH))
    from gptoss.kernels import moe

    meta = dict(BLOCK_M=64, BLOCK_N=32)  # 4,000 pairs over 32 experts: prefill's buckets
    rows = -(-4000 // 64) + 32 - 1
    seen = bench_moe.row_tiles_fastest(lambda: moe._grid(4000, 32, 256)(meta))()
    assert seen == (rows, 8, 1)
    assert moe._grid(4000, 32, 256)(meta) == (moe.GROUP_ROWS, 8, -(-rows // moe.GROUP_ROWS))

    def failing():
        raise RuntimeError("a timing failed")

    with pytest.raises(RuntimeError):
        bench_moe.row_tiles_fastest(failing)()
    assert moe.GROUP_ROWS == 8


def test_moe_bench_times_the_chosen_tiles_on_two_stages_inside_its_provider_only():
    # its "two stages" rows: every choice the autotuners hold is the same tile on two stages while the
    # provider runs, and the choices themselves (the same objects) come back afterwards, also after a failure
    sys.path.insert(0, str(BENCH))
    try:
        import bench_moe
    finally:
        sys.path.remove(str(BENCH))
    import triton

    from gptoss.kernels.moe import KERNELS, tile_of

    saved = {name: (dict(tuner.cache), getattr(tuner, "best_config", None)) for name, tuner in KERNELS.items()}
    chosen = triton.Config(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SWAP=0), num_warps=4, num_stages=3)
    try:
        for tuner in KERNELS.values():
            tuner.cache[("a key",)] = chosen
        seen = bench_moe.on_two_stages(
            lambda: {n: [tile_of(c) for c in t.cache.values()] for n, t in KERNELS.items()}
        )()
        assert seen and all((64, 128, 64, 4, 2) in tiles for tiles in seen.values()), seen
        assert all(all(t[4] == 2 for t in tiles) for tiles in seen.values()), seen
        assert all(tuner.cache[("a key",)] is chosen and chosen.num_stages == 3 for tuner in KERNELS.values())

        def failing():
            raise RuntimeError("a timing failed")

        with pytest.raises(RuntimeError):
            bench_moe.on_two_stages(failing)()
        assert all(tuner.cache[("a key",)] is chosen for tuner in KERNELS.values())
    finally:
        for name, tuner in KERNELS.items():
            tuner.cache.clear()
            tuner.cache.update(saved[name][0])
            tuner.best_config = saved[name][1]


def test_fa2_baseline_is_attention_without_sinks_in_the_kernel_layout():
    # the FlashAttention-2 row times SDPA on the same [B, T, K, G, Dh] tensors; its output (and so the
    # gradient the backward timing feeds it) must have the kernel's layout and be causal GQA attention
    sys.path.insert(0, str(BENCH))
    try:
        import bench_attention
    finally:
        sys.path.remove(str(BENCH))
    import torch

    from gptoss.model import attention_with_sinks

    torch.manual_seed(0)
    q, k, v, _ = bench_attention._inputs(2, 48, 48, "cpu", torch.float32, grad=False)
    no_sink = torch.full((bench_attention.K * bench_attention.G,), float("-inf"))
    pos = torch.arange(48)
    want = attention_with_sinks(q, k, v, no_sink, pos, pos, None)
    got = bench_attention._fa2(q, k, v)
    assert got.shape == q.shape
    assert torch.allclose(got, want, atol=1e-5)


RECORD = BENCH / "records" / "h200-2026-12-04.jsonl"  # make bench-gpu's lines of 2026-12-04, an H200

# Every refusal of a bad flag, as (script, flags, what its one line must say): all rows run in one process
# (`refusals`), each as `python benchmarks/<script> <flags>` would, where a process a row cost ~3 s of
# importing torch.
REFUSALS = [
    *(("bench_e2e.py", ["--prompt-tokens", v], "--prompt-tokens") for v in ["-5", "100001", "abc", ""]),  # 0: below
    *(("bench_e2e.py", ["--impls", v], "--impls") for v in ["gptoss-gpu", "gptoss-cpu,"]),  # empty: below
    ("bench_e2e.py", ["--configs", ""], "--configs is empty"),
    ("bench_e2e.py", ["--configs", "tiny,huge"], "unknown preset 'huge' in --configs"),
    ("bench_e2e.py", ["--impls", "gptoss-triton"], "measures nothing on this cpu"),
    ("bench_e2e.py", ["--impls", ""], "--impls takes a comma-separated list"),
    ("bench_e2e.py", ["--prompt-tokens", "0"], "--prompt-tokens must be between 1 and 100000"),
    ("bench_moe.py", ["--presets", "gpt-oss-7b"], "unknown preset 'gpt-oss-7b' in --presets"),
    ("bench_train.py", ["--config", "tiny", "--steps", "0"], "--steps must be a positive whole number, found 0"),
    ("bench_train.py", ["--config", "tiny", "--seq", "-5"], "--seq must be a positive whole number, found -5"),
    (
        "bench_train.py",
        ["--config", "tiny", "--peak-tflops", "nan"],
        "--peak-tflops must be a positive number, found nan",
    ),
    (
        "bench_train.py",
        ["--config", "tiny", "--peak-tflops", "0"],
        "--peak-tflops must be a positive number, found 0.0",
    ),
    ("bench_train.py", ["--config", "gpt-oss-7b"], "unknown preset 'gpt-oss-7b'"),
    ("bench_train.py", ["--config", "tiny", "--compare", "huge"], "unknown preset 'huge'"),
    ("bench_train.py", ["--config", "tiny", "--steps", "two"], "invalid int value: 'two'"),
    ("bench_train.py", ["--config", "tiny", "--seq", "99999999"], "the bundled rows hold"),
    ("goals.py", [], "the following arguments are required: results"),
    ("goals.py", ["/nonexistent/gpu-results.jsonl"], "no results file at /nonexistent/gpu-results.jsonl"),
    ("goals.py", [str(BENCH)], f"no results file at {BENCH}"),  # a folder
    *(
        ("goals.py", [str(RECORD), "--peak-tflops", v], "expected a positive number of TFLOP/s")
        for v in ["0", "-989", "nan", "inf", "abc", ""]
    ),
]

# Runs each row as the script's __main__ with its argv, stdout and stderr captured; an exception that
# escapes is printed as Python would print it (so "Traceback" in a row's stderr means one escaped).
_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
bench, rows = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, bench)
results = []
for script, flags, folder in rows:
    os.environ["GPTOSS_RESULTS_DIR"] = folder
    sys.argv = [script, *flags]
    err, out, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            runpy.run_path(os.path.join(bench, script), run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, err.getvalue(), out.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Row index -> (exit code, stderr, stdout, the files the row wrote to its own results folder)."""
    folders = [tmp_path_factory.mktemp(f"refusal{i}") for i in range(len(REFUSALS))]
    rows = [[script, flags, str(folder)] for (script, flags, _), folder in zip(REFUSALS, folders)]
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(BENCH), json.dumps(rows)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return [(*result, list(folder.iterdir())) for result, folder in zip(results, folders)]


@pytest.mark.parametrize("i", range(len(REFUSALS)), ids=[f"{s}:{' '.join(f)}" for s, f, _ in REFUSALS])
def test_benchmark_flags_are_refused_in_one_line_before_any_work(i, refusals):
    expected = REFUSALS[i][2]
    code, err, out, written = refusals[i]
    if REFUSALS[i][0] == "bench_train.py":  # its own checks may say so on stdout, exit 1
        assert code != 0 and expected in err + out, (code, err[-1000:], out[-1000:])
    else:  # argparse's exit: the usage and one line of error, on stderr
        assert code == 2 and expected in err, (code, err[-1000:])
    assert "Traceback" not in err and not written, err[-1000:]  # nothing measured, nothing written


def _bench_train(tmp_path, *flags):
    env = dict(os.environ, GPTOSS_RESULTS_DIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, str(BENCH / "bench_train.py"), *flags], capture_output=True, text=True, env=env, timeout=600
    )


def test_the_recipe_step_at_real_size_runs_in_its_tiny_form(tmp_path):
    """`bench_train.py --config` (what `make bench-gpu` runs for gpt-oss-20b and -120b): the model drawn
    on the device, a packed Harmony row, ours against transformers + PEFT, one row each with step time,
    throughput, FLOPs and MFU, recorded."""
    out = _bench_train(tmp_path, "--config", "tiny", "--compare", "tiny", "--seq", "96", "--steps", "1", "--no-profile")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert [r["impl"] for r in rows] == ["gptoss", "transformers+peft"]
    for r in rows:
        assert r["tokens"] == 96 and 0 < r["supervised"] < 96 and r["step_s"] > 0 and r["step_tflop"] > 0
        assert r["tokens_per_s"] == pytest.approx(96 / r["step_s"]) and 0 < r["mfu"] < 1
        assert r["first_step_s"] > 0  # the warm-up step, where a GPU compiles and autotunes
    assert "transformers+peft step / ours" in out.stdout
    assert (tmp_path / "train.jsonl").read_text().count("\n") == 2


def test_the_step_flop_count_is_the_analysis_count():
    # gpt-oss-20b, one 2,048-token row, every position supervised: experts 29.4 TFLOP, q/k/v/o 7.8,
    # unembedding 4.7, attention core 2.1 (docs: gpu-decode-analysis, section 5), counted by hand there
    sys.path.insert(0, str(BENCH))
    try:
        import bench_train
    finally:
        sys.path.remove(str(BENCH))
    from gptoss import get_preset

    parts = bench_train.lora_step_flops(get_preset("gpt-oss-20b"), 2048, 2048, 8, [7, 15, 23])
    tf = {k: v / 1e12 for k, v in parts.items()}
    assert tf["experts"] == pytest.approx(29.4, abs=0.05) and tf["attention_projections"] == pytest.approx(
        7.8, abs=0.05
    )
    assert tf["unembedding"] == pytest.approx(4.74, abs=0.01) and tf["attention_core"] == pytest.approx(2.1, abs=0.05)
    assert tf["total"] == pytest.approx(44.1, abs=0.1)


def test_e2e_counts_the_kernels_of_a_decode_step():
    # bench_e2e's per-token structure on the CPU (the Triton kernels under the interpreter): the fused
    # step launches 7 Triton kernels a layer (and the final norm), the plain one several times more, and
    # neither waits on the host; the predicted step time is kernels x floor + bytes / bandwidth
    sys.path.insert(0, str(BENCH))
    try:
        import bench_e2e
    finally:
        sys.path.remove(str(BENCH))
    from conftest import small_config

    from gptoss import get_preset
    from gptoss.synthetic import random_model

    model = random_model(small_config(), dtype=torch.bfloat16, seed=1, backend="triton")
    fused, plain = bench_e2e.step_profile(model, True), bench_e2e.step_profile(model, False)
    layers = model.config.num_hidden_layers
    assert fused["triton_per_token"] == 7 * layers + 1 and fused["syncs_per_token"] == plain["syncs_per_token"] == 0
    assert fused["kernels_per_layer"] == round(fused["kernels_per_token"] / layers, 2)
    assert fused["kernels_per_token"] - fused["triton_per_token"] <= 24  # outside the layers, per token
    assert plain["kernels_per_token"] > 3 * fused["kernels_per_token"], (plain, fused)
    assert "graph_kernels" not in fused  # a GPU count only
    config = get_preset("gpt-oss-20b")
    bound_ms = bench_e2e.bytes_per_token(config) / 4.8e12 * 1e3
    assert bench_e2e.predicted_step_ms(0, config, 4800) == pytest.approx(bound_ms)
    assert bench_e2e.predicted_step_ms(200, config, 4800) == pytest.approx(bound_ms + 0.4)


def _goals():
    sys.path.insert(0, str(BENCH))
    import goals

    return goals


def test_the_goals_read_from_a_recorded_gpu_run():
    # benchmarks/records/h200-2026-12-04.jsonl, as docs/results.md reports it: the 20b step 0.322 s against
    # transformers + PEFT's 0.647 s (2.01x), 12.9% MFU, 15.4 GB peak, 120b 63.0 GiB; the MoE layer 0.64x
    # grouped_mm at 16,384 tokens; attention forward 0.69x FlashAttention-2 (4 x 2,048), forward and
    # backward 0.47x (1 x 2,048); no MoE forward + backward rows in that run
    goals = _goals()
    lines = {line["goal"]: line for line in goals.goals(goals.read_rows(RECORD))}
    verdicts = {goal: line["verdict"] for goal, line in lines.items()}
    assert verdicts == {
        "gpt-oss-20b LoRA step, speed over transformers + PEFT": "not met",
        "gpt-oss-20b LoRA step, MFU": "not met",
        "gpt-oss-20b LoRA step, peak allocated": "met",
        "gpt-oss-120b LoRA step on one GPU, peak allocated": "met",
        "the recipe's epoch (1,000 rows) on one GPU, at most": "met",
        "MoE layer forward at 4,096+ tokens, over torch._grouped_mm": "not met",
        "MoE layer forward at 4,096+ tokens, of the bf16 peak": "not met",
        "MoE layer forward+backward at 4,096+ tokens, over torch._grouped_mm": "not measured",
        "MoE layer forward+backward at 4,096+ tokens, of the bf16 peak": "not measured",
        "attention forward at 2,048-8,192 tokens, over FlashAttention-2": "not met",
        "attention forward + backward at 2,048-8,192 tokens, over FlashAttention-2": "not met",
    }
    measured = {goal: line["measured"] for goal, line in lines.items()}
    assert measured["gpt-oss-20b LoRA step, speed over transformers + PEFT"].startswith("2.01x (0.647 s / 0.322 s)")
    assert measured["gpt-oss-20b LoRA step, MFU"].startswith("12.9%")
    assert measured["gpt-oss-20b LoRA step, peak allocated"] == "15.4 GB"
    assert measured["gpt-oss-120b LoRA step on one GPU, peak allocated"] == "63.0 GiB"
    assert measured["the recipe's epoch (1,000 rows) on one GPU, at most"] == "5.4 min"
    assert measured["MoE layer forward at 4,096+ tokens, over torch._grouped_mm"].startswith(
        "0.64x (gpt-oss-20b, 16,384"
    )
    assert measured["attention forward at 2,048-8,192 tokens, over FlashAttention-2"].startswith("0.69x (4 x 2,048")
    assert measured["attention forward + backward at 2,048-8,192 tokens, over FlashAttention-2"].startswith("0.47x")


def test_the_goals_of_a_run_that_measured_little(tmp_path):
    # a log's text and broken lines are skipped, a later line of the same measurement replaces an earlier
    # one, a step skipped for memory says why, and a file with nothing measured says so of every goal
    goals = _goals()
    row = {"bench": "train", "impl": "gptoss", "config": "gpt-oss-20b", "tokens": 2048, "step_tflop": 41.0}
    path = tmp_path / "gpu-results.jsonl"
    path.write_text(
        "\n".join(
            [
                "== bench_train (limit 240s)",
                json.dumps(dict(row, step_s=0.5, peak_gpu_gb=20.0)),
                json.dumps(dict(row, step_s=0.1, peak_gpu_gb=12.0)),  # the later line of the same step
                '{"bench": "train", "impl": "transformers+peft", "config": "gpt-oss-20b", "tokens": 2048, "step_s": 0.33}',
                json.dumps(dict(row, config="gpt-oss-120b", skipped="does not fit this device: out of memory")),
                '{"bench": "moe", "provider": "triton", "tokens": 4096, "vs',
                "[1, 2]",
            ]
        )
    )
    lines = {line["goal"]: line for line in goals.goals(goals.read_rows(path))}
    speed = lines["gpt-oss-20b LoRA step, speed over transformers + PEFT"]
    assert speed["verdict"] == "met" and speed["measured"].startswith("3.30x")
    assert lines["gpt-oss-20b LoRA step, MFU"]["measured"].startswith("41.5%")
    assert lines["gpt-oss-20b LoRA step, peak allocated"]["measured"] == "12.0 GB"
    big = lines["gpt-oss-120b LoRA step on one GPU, peak allocated"]
    assert big["verdict"] == "not measured" and "out of memory" in big["measured"]
    assert all(
        line["verdict"] == "not measured" for goal, line in lines.items() if "MoE" in goal or "attention" in goal
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    report = goals.report(goals.goals(goals.read_rows(empty)))
    assert report.splitlines()[-1] == "0 of 11 goals met, 11 not measured"
