#!/usr/bin/env bash
# One command on a CUDA machine (no network needed; its own torch and Triton already installed):
#   benchmarks/run_gpu.sh [OUT]        (or: make bench-gpu)
# installs this checkout without reaching any index, runs the recipe's LoRA step at real size (gpt-oss-20b
# against transformers + PEFT, gpt-oss-120b), decode of both models with the Triton backend (each step a
# replayed CUDA graph), the MoE and attention kernel benchmarks, the GPU tests, the MoE layer forward and
# backward (bench_moe --train) and the MXFP4 benchmark, and
# writes one results file, OUT/gpu-results.jsonl (every JSON line of every step, plus each step's exit
# code and time), beside each step's log, then prints the project's GPU goals against it (benchmarks/goals.py,
# also OUT/goals.txt). The whole run stays within a budget (below), 7.5 minutes by default.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export GPTOSS_RESULTS_DIR="$OUT" TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET GPTOSS_MOE_CONFIG

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "run_gpu.sh: no CUDA device is visible to $PY (torch.cuda.is_available() is False); nothing to measure" >&2
    exit 1
fi
# kernels/ and train/ are mapped into the gptoss package at install time, so the checkout must be installed;
# --no-index: never reach a package index; --no-deps: use the torch and Triton already here.
# Where that cannot build offline (setuptools < 70.1 without `wheel`), the checkout is imported in place:
# with the root on PYTHONPATH, gptoss/__init__.py maps kernels/ and train/ into the package itself.
if ! $PY -m pip install --quiet --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "pip could not install the checkout offline (see $OUT/install.log); importing it in place"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! $PY -c "import gptoss.kernels.moe, gptoss.train.trainer" >>"$OUT/install.log" 2>&1; then
    echo "run_gpu.sh: gptoss does not import; see $OUT/install.log" >&2
    exit 1
fi

# GPU time is short and rare: the steps run in the order of what they tell, each under its own limit and
# all under one budget (GPTOSS_GPU_BUDGET_S, default 450 s): a step that would start with under 30 s of
# budget left is skipped and recorded as such. Full-size models are drawn on the device (no checkpoint:
# gpt-oss-120b's is 65 GB, more than such a machine may have on disk).
BUDGET=${GPTOSS_GPU_BUDGET_S:-450}
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, remember failures
    local name=$1 limit=$2 left=$((BUDGET - SECONDS))
    shift 2
    if [ $left -lt 30 ]; then
        echo "== $name skipped: ${left}s of the ${BUDGET}s budget left"
        echo "{\"step\": \"$name\", \"exit_code\": null, \"skipped\": \"budget: ${left}s left\"}" >>"$OUT/steps.jsonl"
        return
    fi
    [ $limit -le $left ] || limit=$left
    echo "== $name (limit ${limit}s, $((SECONDS))s into the run)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "{\"step\": \"$name\", \"exit_code\": $rc, \"seconds\": $((SECONDS))}" >>"$OUT/steps.jsonl"
    [ $rc -eq 0 ] || status=1
}
# the recipe's LoRA step at real size (gpt-oss-20b against transformers + PEFT, gpt-oss-120b alone); it
# renders Harmony rows: it needs openai-harmony and the o200k_base vocabulary (see README)
if harmony=$($PY -c "from gptoss.harmony import get_encoding; get_encoding()" 2>&1); then
    # 240 s: its first step autotunes every MoE tile of the prefill buckets (swapped and not) on the device,
    # each new key's tiles compiled first, side by side (gptoss.kernels.moe.compile_tiles); first_step_s says
    # what that step took
    step bench_train 240 $PY benchmarks/bench_train.py --config gpt-oss-20b,gpt-oss-120b --compare gpt-oss-20b
else
    echo "== bench_train skipped: Harmony is not usable here: ${harmony##*$'\n'}"
    echo "{\"step\": \"bench_train\", \"exit_code\": null, \"skipped\": \"no Harmony tokenizer\"}" >>"$OUT/steps.jsonl"
    status=1
fi
# decode at batch 1 and 8, each step one CUDA-graph replay: gpt-oss-20b and -120b, fused kernels and the plain path
step bench_e2e 150 $PY benchmarks/bench_e2e.py --configs gpt-oss-20b,gpt-oss-120b --impls gptoss-triton,gptoss-triton-fused --random-weights
# the MoE layer from 1 to 16,384 tokens (decode rows also graph-timed; the prefill bucket autotunes its
# seven forward tiles, eight for gate_up), attention (its bf16 tiles and the earlier ones), the GPU tests, then the MoE layer forward and backward at prefill sizes
step bench_moe 100 $PY benchmarks/bench_moe.py
step bench_attention 60 $PY benchmarks/bench_attention.py
step test_gpu 90 $PY -m pytest -q -rs tests/test_gpu.py
step bench_moe_train 60 $PY benchmarks/bench_moe.py --train
step bench_mxfp4 30 $PY benchmarks/bench_mxfp4.py

cat "$OUT"/steps.jsonl "$OUT"/*.jsonl 2>/dev/null | grep -v '^$' | sort -u >"$OUT/gpu-results.tmp"
mv "$OUT/gpu-results.tmp" "$OUT/gpu-results.jsonl"
# the project's GPU goals against what this run measured (met, not met, not measured), also in goals.txt
$PY benchmarks/goals.py "$OUT/gpu-results.jsonl" | tee "$OUT/goals.txt"
echo "results: $OUT/gpu-results.jsonl (logs beside it)"
exit $status
