#!/usr/bin/env bash
# GPU fuzz in parallel shards (Triton compiles on one CPU core per process; the GPU is mostly idle).
# Usage on the GPU machine, from anywhere: bash tests/run_gpu_fuzz.sh [SHARDS] [CASES_PER_SHARD] [LOG_DIR] [ONLY]
# (defaults 4, 250, .cache/fuzz; a relative LOG_DIR is taken from the current folder; ONLY, a pytest -k
# expression such as "line_scores_fuzz", runs just those estimator tests and skips the attention fuzz).
# Every kernel gets SHARDS x CASES_PER_SHARD cases (distinct hypothesis seeds per shard).
set -u
shards=${1:-4}; cases=${2:-250}; logs=${3:-.cache/fuzz}; only=${4:-}
mkdir -p "$logs"
logs="$(cd "$logs" && pwd)"
cd "$(dirname "$0")/.."  # the repository root: the test paths below are relative to it
# One or two pytest processes per shard share the GPU: each is capped at its share of the memory (conftest.py).
per_shard=2; [ -n "$only" ] && per_shard=1
export PYTHONPATH=. SPARSEPREFILL_FUZZ_EXAMPLES=$cases SPARSEPREFILL_GPU_PROCESSES=$((per_shard * shards))
for shard in $(seq 1 "$shards"); do
  if [ -z "$only" ]; then
    SPARSEPREFILL_FUZZ_SHARD=$shard python -m pytest -q -s -p no:cacheprovider tests/kernels/test_gpu_fuzz.py \
      >"$logs/attention_$shard.log" 2>&1 &
  fi
  SPARSEPREFILL_FUZZ_SHARD=$shard python -m pytest -q -s -p no:cacheprovider tests/kernels/test_triton_estimators.py -m gpu \
    ${only:+-k "$only"} >"$logs/estimators_$shard.log" 2>&1 &
done
wait
for log in "$logs"/*.log; do echo "$(basename "$log"): $(grep -h "fuzz cases run\|passed\|failed" "$log" | tr '\n' ' ')"; done
