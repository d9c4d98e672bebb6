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
