#!/usr/bin/env bash
# Issue 7's GPU check, for a lent H100/H200: about 10 minutes at most, every step under its own timeout.
#   1. a random Qwen3-0.6B-shaped checkpoint written in the Hugging Face cache layout, loaded in bf16 by our loader;
#   2. plain / fast (eager, compiled) / transformers decode side by side at batch 1 and 8;
#   3. notebooks 10 and 11 executed on CUDA (quick mode);
#   4. chapter 21's Triton kernels at Qwen3-0.6B's attention shape beside SDPA's flash backend (error, TFLOP/s).
# Results: results/bench_cuda.json, .csv (step 2), results/bench_cuda_notebooks.log (step 3),
# results/flash_cuda.json, .csv (step 4).
#
#   tools/gpu_check.sh               # on the GPU machine, from anywhere in the repository
#   tools/gpu_check.sh --flash       # step 4 only (about 2 minutes)
#   tools/gpu_check.sh --cpu-smoke   # the same steps on a CPU with a tiny shape, no notebooks, into a temp folder
#                                    # (tests/test_gpu_check.py runs this); OUT=DIR overrides the results folder
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
flash_only=0
case "${1:-}" in
  "") ;;
  --cpu-smoke) smoke=1 ;;
  --flash) flash_only=1 ;;
  *) echo "usage: tools/gpu_check.sh [--cpu-smoke | --flash]" >&2; exit 2 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_CACHE="$work/hub" HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
export QWEN3_SCRATCH_THREADS="${QWEN3_SCRATCH_THREADS:-1}"
PY="${PYTHON:-python}"

step() {  # step SECONDS CMD...: run CMD, kill it after SECONDS, fail the script if it fails or times out
  local limit=$1; shift
  echo "== [$(date +%H:%M:%S)] $* (limit ${limit} s)"
  timeout --kill-after=15 "$limit" "$@"
}

if [[ $smoke == 1 ]]; then
  out="${OUT:-$work/results}"
  step 120 "$PY" tools/gpu_check.py checkpoint --cache "$HF_HUB_CACHE" --tiny
  step 240 "$PY" tools/gpu_check.py decode --out "$out/bench_cuda" --device cpu --batch 1 2 --compile off \
    --new-tokens 8 --tiny
  test -s "$out/bench_cuda.json" && test -s "$out/bench_cuda.csv"
  if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('triton') is None)"; then
    step 240 env TRITON_INTERPRET=1 "$PY" tools/gpu_check.py flash --out "$out/flash_cuda" --device cpu --tiny
    test -s "$out/flash_cuda.json"
  else
    echo "== no triton here: chapter 21's kernel step skipped (pip install triton==3.7.1 to run it)"
  fi
  echo "cpu smoke test passed: $out"
  exit 0
fi

out="${OUT:-results}"
step 30 "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name() if ok else 'no CUDA device'); sys.exit(0 if ok else 1)"
if [[ $flash_only == 1 ]]; then
  step 180 "$PY" tools/gpu_check.py flash --out "$out/flash_cuda" --device cuda
  echo "GPU check done: $out/flash_cuda.json, $out/flash_cuda.csv"
  exit 0
fi
step 90 "$PY" tools/gpu_check.py checkpoint --cache "$HF_HUB_CACHE"
step 270 "$PY" tools/gpu_check.py decode --out "$out/bench_cuda" --device cuda --batch 1 8 --compile on
QWEN3_SCRATCH_QUICK=1 step 180 "$PY" -m pytest -q -p no:cacheprovider \
  notebooks/10_attention_viz.ipynb notebooks/11_benchmarks.ipynb 2>&1 | tee "$out/bench_cuda_notebooks.log"
step 180 "$PY" tools/gpu_check.py flash --out "$out/flash_cuda" --device cuda
echo "GPU check done: $out/bench_cuda.json, $out/bench_cuda.csv, $out/bench_cuda_notebooks.log, $out/flash_cuda.json"
