#!/usr/bin/env bash
# On the GPU machine, after the uploads of ../shared/tools/device-models: join the GGUF parts and
# make the gguf package importable (the image lacks it). Source it: `. evals/results/gpu_setup.sh`.
( cd "$HOME/models" && for m in smollm2-135m-instruct-q4_1 gemma-3-270m-q4_k_m; do
    [ -f $m.gguf ] || ! ls $m.gguf.part* >/dev/null 2>&1 || cat $m.gguf.part* > $m.gguf; done )
python3 -m pip install -q --no-index --no-deps --target /tmp/site $(ls "$HOME"/models/gguf-*.whl .device/evalcache/gguf-*.whl 2>/dev/null | head -1) 2>/dev/null || true
export PYTHONPATH=/tmp/site:.
