#!/usr/bin/env bash
# The test suite on the GPU machine, in a form that fits the device's 10-minute calls: everything but
# the GPU fuzz (tests/run_gpu_fuzz.sh runs that, sharded), spread over WORKERS processes, with each
# failure's name in the summary (-rfE), the slowest tests listed and a JUnit file, so a run cut short
# by a time limit still says what passed and what failed.
# Usage on the GPU machine: bash tests/run_gpu_suite.sh [WORKERS] [LOG_DIR] [PYTEST_ARGS...]
# (defaults 12, .cache/gpu_suite; e.g. `bash tests/run_gpu_suite.sh 12 $OUT/suite tests/kernels`).
set -u
workers=${1:-12}; logs=${2:-.cache/gpu_suite}; shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$logs"
logs="$(cd "$logs" && pwd)"
cd "$(dirname "$0")/.."
# The estimator fuzz inside the suite runs a short stream; the 1000-case runs are run_gpu_fuzz.sh's.
export PYTHONPATH=. SPARSEPREFILL_FUZZ_EXAMPLES=${SPARSEPREFILL_FUZZ_EXAMPLES:-100} SPARSEPREFILL_GPU_PROCESSES=$workers
python -m pytest -p no:cacheprovider -n "$workers" -rfE --durations=40 --junitxml="$logs/suite.xml" \
  --ignore=tests/kernels/test_gpu_fuzz.py "${@:-tests}" >"$logs/suite.log" 2>&1
status=$?
grep -E "^(FAILED|ERROR)|passed|failed" "$logs/suite.log" | tail -40
exit $status
