#!/usr/bin/env bash
# GPU fuzz in parallel shards (Triton compiles on one CPU core per process; the GPU is mostly idle).
# Usage on the GPU machine: bash scripts/gpu_fuzz_shards.sh SHARDS CASES_PER_SHARD LOG_DIR
# Every kernel gets SHARDS x CASES_PER_SHARD cases (distinct hypothesis seeds per shard).
set -u
shards=${1:-4}; cases=${2:-250}; logs=${3:-.cache/fuzz}
mkdir -p "$logs"
export PYTHONPATH=. SPARSEPREFILL_FUZZ_EXAMPLES=$cases
for shard in $(seq 1 "$shards"); do
  SPARSEPREFILL_FUZZ_SHARD=$shard python -m pytest -q -s -p no:cacheprovider tests/test_gpu_fuzz.py \
    >"$logs/attention_$shard.log" 2>&1 &
  SPARSEPREFILL_FUZZ_SHARD=$shard python -m pytest -q -s -p no:cacheprovider tests/test_triton_estimators.py -m gpu \
    >"$logs/estimators_$shard.log" 2>&1 &
done
wait
for log in "$logs"/*.log; do echo "$(basename "$log"): $(grep -h "fuzz cases run\|passed\|failed" "$log" | tr '\n' ' ')"; done
