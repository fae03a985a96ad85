#!/usr/bin/env bash
# Prepares Qwen2.5-Coder-0.5B-Instruct for the GPU machine, which has no network and takes at most 64 MiB
# of working tree per call: the GGUF in ten parts of ~47 MiB (.device/q/cpart00..09, the `gguf` wheel in
# cpart00) and the tokenizer/config saved by this machine's transformers (.device/q/meta/qwen_meta; the
# GPU machine's older transformers builds tokenizers from GGUF files less reliably). Run from the
# repository root with the package installed; needs ../shared/tools/device-models (it fetches the models
# and the wheel). See tools/gpu/README.md for the calls that carry the parts.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
cache=${SPARSEPREFILL_MODEL_CACHE:-$HOME/.cache/sparseprefill-models}
gguf=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
[ -f "$cache/$gguf" ] && ls .device/1/gguf-*.whl >/dev/null 2>&1 || bash ../shared/tools/device-models >/dev/null
rm -rf .device/q && mkdir -p .device/q/meta
split -n 10 -d -a 2 "$cache/$gguf" ".device/q/$gguf.part"
for i in 00 01 02 03 04 05 06 07 08 09; do mkdir -p ".device/q/cpart$i" && mv ".device/q/$gguf.part$i" ".device/q/cpart$i/"; done
cp .device/1/gguf-*.whl .device/q/cpart00/
python - <<'PY'
from sparseprefill.evals import gguf_cache, offline_models
print(gguf_cache.export_metadata(offline_models.QWEN_CODER, ".device/q/meta/qwen_meta", progress=False))
PY
du -sh .device/q/*
