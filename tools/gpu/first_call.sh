#!/usr/bin/env bash
# Device call 1: the first Qwen part into ~/models (carry [".device/q/cpart00"]), then optionally
# the GPU tests and the attention fuzz in 8 shards; logs come back as $OUT/gpu_tests.log and $OUT/fuzz.tgz.
#   TESTS=1 TEST_FILES="..." TESTS_S=200  FUZZ=1 FUZZ_N=125 FUZZ_S=400 FUZZ_K="..."  EXTRA="python ..."
set -u
mkdir -p $HOME/models && cp .device/q/cpart00/* $HOME/models/
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
git log --oneline -1 > $OUT/tree.txt 2>&1; git status --short >> $OUT/tree.txt 2>&1
if [ "${FUZZ:-0}" = 1 ]; then
  mkdir -p $OUT/fuzz
  for s in 1 2 3 4 5 6 7 8; do
    SPARSEPREFILL_FUZZ_EXAMPLES=${FUZZ_N:-125} SPARSEPREFILL_FUZZ_SHARD=$s timeout ${FUZZ_S:-400} \
      python -m pytest -q -s -p no:cacheprovider tests/kernels/test_gpu_fuzz.py \
      -k "${FUZZ_K:-test_block_sparse_fuzz or test_block_sparse_recall_fuzz}" > $OUT/fuzz/bs_$s.log 2>&1 &
  done
fi
if [ "${TESTS:-1}" = 1 ]; then
  timeout ${TESTS_S:-200} python -m pytest -q -p no:cacheprovider \
    ${TEST_FILES:-tests/patterns/test_traced.py tests/kernels/test_block_columns.py tests/kernels/test_library_ops.py} \
    > $OUT/gpu_tests.log 2>&1
  echo "tests rc=$?" >> $OUT/gpu_tests.log
fi
if [ -n "${EXTRA:-}" ]; then timeout ${EXTRA_S:-120} bash -c "$EXTRA" > $OUT/extra.log 2>&1; fi
wait
tail -n 3 $OUT/gpu_tests.log 2>/dev/null; for f in $OUT/fuzz/*.log; do [ -f "$f" ] && echo "$f: $(tail -n 1 $f)"; done; [ -d $OUT/fuzz ] && tar czf $OUT/fuzz.tgz -C $OUT fuzz && rm -rf $OUT/fuzz
