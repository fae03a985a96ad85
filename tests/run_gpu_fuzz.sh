#!/usr/bin/env bash
# GPU fuzz in parallel shards (Triton compiles on one CPU core per process; the GPU is mostly idle).
# Usage on the GPU machine, from anywhere: bash tests/run_gpu_fuzz.sh [SHARDS] [CASES_PER_SHARD] [LOG_DIR]
# (defaults 4, 250, .cache/fuzz; a relative LOG_DIR is taken from the current folder).
# Every kernel gets SHARDS x CASES_PER_SHARD cases (distinct hypothesis seeds per shard).
set -u
shards=${1:-4}; cases=${2:-250}; logs=${3:-.cache/fuzz}
mkdir -p "$logs"
logs="$(cd "$logs" && pwd)"
cd "$(dirname "$0")/.."  # the repository root: the test paths below are relative to it
export PYTHONPATH=. SPARSEPREFILL_FUZZ_EXAMPLES=$cases
for shard in $(seq 1 "$shards"); do
  SPARSEPREFILL_FUZZ_SHARD=$shard python -m pytest -q -s -p no:cacheprovider tests/kernels/test_gpu_fuzz.py \
    >"$logs/attention_$shard.log" 2>&1 &
  SPARSEPREFILL_FUZZ_SHARD=$shard python -m pytest -q -s -p no:cacheprovider tests/kernels/test_triton_estimators.py -m gpu \
    >"$logs/estimators_$shard.log" 2>&1 &
done
wait
for log in "$logs"/*.log; do echo "$(basename "$log"): $(grep -h "fuzz cases run\|passed\|failed" "$log" | tr '\n' ' ')"; done
