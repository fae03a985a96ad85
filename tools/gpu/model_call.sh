#!/usr/bin/env bash
# The call after cpart01..09 are in ~/models (carry [".device/q/meta"]): the GGUF assembled,
# installed into the package cache with its tokenizer/config, then any of
#   E2E=1 LENS="..." CANDS="..." T1=...   TIMING=1 TLENS="..." TCANDS="..." T3=...   QK=1 QKL="..." T4=...
set -u
G=$HOME/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; M=$PWD/.device/q/meta/qwen_meta
[ -f $G ] || cat $HOME/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf.part0? > $G
ls -la $HOME/models > $OUT/prep.log
python3 -m pip install -q --no-index --no-deps --target /tmp/site $HOME/models/gguf-*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/experiments
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
python -c "
from sparseprefill.evals import offline_models as om
om.install_gguf(om.QWEN_CODER, '$G'); om.load_qwen_coder(metadata='$M')" >> $OUT/prep.log 2>&1
echo "prep rc=$?"
if [ "${TIMING:-0}" = 1 ]; then
  timeout ${T3:-150} python experiments/real_speed.py --metadata $M --parts timing --timing-lengths $TLENS \
    --timing-candidates $TCANDS --out $OUT/timing > $OUT/timing.log 2>&1; echo "timing rc=$?"
fi
if [ "${E2E:-0}" = 1 ]; then
  timeout ${T1:-300} python experiments/real_speed.py --metadata $M --parts e2e --lengths $LENS \
    --candidates $CANDS --needle-candidates ${NEEDLES:-} --out $OUT/e2e > $OUT/e2e.log 2>&1; echo "e2e rc=$?"
fi
if [ "${QK:-0}" = 1 ]; then
  timeout ${T4:-200} python -m sparseprefill bench kernels --qk-from qwen2.5-coder --lengths $QKL \
    --out $OUT/qk > $OUT/qk.log 2>&1; echo "qk rc=$?"
fi
tail -n 12 $OUT/e2e/e2e.csv 2>/dev/null | cut -c1-200
# The device returns at most 8 files per call: each output folder comes back as one archive.
for d in e2e timing qk; do [ -d $OUT/$d ] && tar czf $OUT/$d.tgz -C $OUT $d && rm -rf $OUT/$d; done
exit 0
