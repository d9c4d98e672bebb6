"""The benchmark scripts run (quick mode) and end with their JSON line; speed itself is never asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["bench_mxfp4.py", "bench_moe.py", "bench_attention.py"])
def test_benchmark_runs_and_reports(script, tmp_path):
    env = dict(os.environ, GPTOSS_RESULTS_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True, env=env, check=True
    )
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["results"] and all(r["ms"] > 0 for r in last["results"])
    name = script.removeprefix("bench_").removesuffix(".py")
    assert (tmp_path / f"{name}.jsonl").read_text().count("\n") == len(last["results"])
    if "cuda" not in {r["device"] for r in last["results"]}:
        assert "GPU figures were not taken" in out.stdout
    if name == "moe":  # every provider computes the same layer (bf16 rounding only)
        assert all(r["rel_err_vs_fp32"] < 2e-2 for r in last["results"])


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


@pytest.mark.parametrize("value", ["0", "-5", "100001", "abc", ""])
def test_e2e_prompt_tokens_refuses_nonsense(value):
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_e2e.py"), "--prompt-tokens", value], capture_output=True, text=True
    )
    assert done.returncode == 2 and "--prompt-tokens" in done.stderr


@pytest.mark.parametrize("value", ["", "gptoss-gpu", "gptoss-cpu,"])
def test_e2e_impls_refuses_unknown_names(value):
    done = subprocess.run([sys.executable, str(BENCH / "bench_e2e.py"), "--impls", value], capture_output=True, text=True)
    assert done.returncode == 2 and "--impls" in done.stderr
