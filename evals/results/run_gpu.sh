#!/usr/bin/env bash
# The real-model report: dense vs the default sparse config (`auto`) vs the shipped profile, on the GPU
# machine, bf16. Run from the repository root there, after the model uploads of
# ../shared/tools/device-models and with the carried folder .device/evalcache (RULER samples
# generated on a networked machine: `sparseprefill eval ruler ... --generate-only --sample-cache`,
# and the Austen text from `sparseprefill prepare-data`) and .device/tok (tokenizers saved by the
# newest transformers; 5.17 builds Gemma 3's wrongly from the GGUF).
#
#   bash evals/results/run_gpu.sh smollm2 fidelity|ppl|ruler [LENGTH...]
#   bash evals/results/run_gpu.sh gemma3  fidelity|ppl|ruler [LENGTH...]
set -euo pipefail
model=$1; shift
target=$1; shift
models=$HOME/models
cache=.device/evalcache
export SPARSEPREFILL_CACHE=$cache  # the carried Austen text lives in $cache/data
case $model in
  smollm2) gguf=smollm2-135m-instruct-q4_1.gguf; profile=smollm2-135m-instruct; lengths=(4096 8192); samples=16; batch=16 ;;
  gemma3) gguf=gemma-3-270m-q4_k_m.gguf; profile=gemma-3-270m; lengths=(4096 8192 16384 32768); samples=10; batch=10 ;;
  *) echo "unknown model $model" >&2; exit 2 ;;
esac
[ $# -gt 0 ] && lengths=("$@")
out=evals/results/$model
common=("$models" --gguf-file "$gguf" --tokenizer ".device/tok/$model" --dtype bfloat16
        --variants auto "profile:$profile" --out "$out" --quiet)
stem="$target-$(IFS=-; echo "${lengths[*]}")"
case $target in
  fidelity) python3 -m sparseprefill eval fidelity "${common[@]}" --stem "$stem" --lengths "${lengths[@]}" --windows 2 --text austen ;;
  ppl) python3 -m sparseprefill eval ppl "${common[@]}" --stem "$stem" --lengths "${lengths[@]}" --windows 4 --text austen ;;
  ruler)
    # Padded batches make dense SDPA build a [B, 1, L, L] mask per layer type: halve the batch past 8K.
    [ "${lengths[0]}" -gt 8192 ] && batch=${RULER_LONG_BATCH:-$((batch / 2))}
    python3 -m sparseprefill eval ruler "${common[@]}" --stem "$stem" --lengths "${lengths[@]}" --samples $samples \
      --batch-size $batch --sample-cache "$cache/ruler/$model" ;;
  *) echo "unknown target $target" >&2; exit 2 ;;
esac
