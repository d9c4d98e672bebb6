#!/usr/bin/env bash
# One command on a CUDA machine (no network needed; its own torch and Triton already installed):
#   benchmarks/run_gpu.sh [OUT]        (or: make bench-gpu)
# installs this checkout without reaching any index, runs the GPU tests, the MXFP4, MoE and attention
# kernel benchmarks, a LoRA step against transformers + PEFT (tiny shape) and the end-to-end benchmark with the Triton backend (decode steps replayed as a CUDA
# graph), and writes one results file, OUT/gpu-results.jsonl (every JSON line of every step, plus the tests' outcome), beside each step's log.
# Each step has its own time limit; the limits add up to 10 minutes (a run on an H100 took about 6.5).
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

# the synthetic gpt-oss-20b checkpoint (13.8 GB, about 100 s on a cold machine) is written in the
# background while the GPU tests and kernel benchmarks run; bench_e2e waits for it
$PY -c "from gptoss.synthetic import cached_checkpoint; cached_checkpoint('gpt-oss-20b', 'hf-mxfp4')" >"$OUT/checkpoint.log" 2>&1 &
writer=$!

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, remember failures
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "{\"step\": \"$name\", \"exit_code\": $rc}" >>"$OUT/steps.jsonl"
    [ $rc -eq 0 ] || status=1
}
step test_gpu 120 $PY -m pytest -q -rs tests/test_gpu.py
step bench_mxfp4 40 $PY benchmarks/bench_mxfp4.py
step bench_moe 90 $PY benchmarks/bench_moe.py
step bench_attention 50 $PY benchmarks/bench_attention.py
# the LoRA bench renders Harmony rows: it needs openai-harmony and the o200k_base vocabulary (see README)
if harmony=$($PY -c "from gptoss.harmony import get_encoding; get_encoding()" 2>&1); then
    step bench_train 60 $PY benchmarks/bench_train.py --quick
else
    echo "== bench_train skipped: Harmony is not usable here: ${harmony##*$'\n'}"
    echo "{\"step\": \"bench_train\", \"exit_code\": null, \"skipped\": \"no Harmony tokenizer\"}" >>"$OUT/steps.jsonl"
    status=1
fi
if ! wait $writer; then
    echo "run_gpu.sh: writing the synthetic gpt-oss-20b checkpoint failed (see $OUT/checkpoint.log)" >&2
    status=1
fi
step bench_e2e 240 $PY benchmarks/bench_e2e.py --configs tiny,gpt-oss-20b

cat "$OUT"/steps.jsonl "$OUT"/*.jsonl 2>/dev/null | grep -v '^$' | sort -u >"$OUT/gpu-results.tmp"
mv "$OUT/gpu-results.tmp" "$OUT/gpu-results.jsonl"
echo "results: $OUT/gpu-results.jsonl (logs beside it)"
exit $status
