#!/usr/bin/env bash
# The hf engine's phase of the GPU check: a tiny MoSLoRA run on the GPU machine's own stack
# (transformers 5.x, no XTuner), its losses beside the same run's on this CPU.
#
#   scripts/gpu_hf_engine.sh prepare DIR        # here (XTuner's env): DIR gets the inputs
#   scripts/gpu_hf_engine.sh run DIR OUT PARENT # there: trains, OUT/hf_engine/ gets the logs
#
# `prepare` builds a tiny LLaVA (`make-tiny --samples 80`) into DIR/hf_engine_tiny, writes
# configs/tiny_moslora.py's recipe as JSON (the GPU image cannot parse an XTuner config) with
# the tiny folder's path as @TINY@, and trains it on this CPU: DIR/hf_engine_cpu_log.jsonl is the
# reference. `run` copies the tiny folder into a new folder under PARENT (outside $OUT: nothing of
# it comes back but the logs), fills @TINY@ in, trains on whatever device torch finds (CUDA there)
# in float32, and copies both logs to OUT/hf_engine/ for scripts/gpu_report.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-${PYTHON:-python3}}
export HF_HUB_OFFLINE=1
case ${1:-} in
  prepare)
    dir=$(mkdir -p "$2" && cd "$2" && pwd)
    tiny=$dir/hf_engine_tiny cpu=$(mktemp -d) # the CPU run's checkpoints do not travel
    trap 'rm -rf "$cpu"' EXIT
    "$PY" -m llava_moslora.cli make-tiny "$tiny" --samples 80 >/dev/null # rewrites only its own
    LLAVA_MOSLORA_TINY_DIR=$tiny "$PY" -m llava_moslora.cli train --engine hf \
      configs/tiny_moslora.py --write-recipe "$cpu/recipe.json" >/dev/null
    "$PY" -m llava_moslora.cli train --engine hf "$cpu/recipe.json" --work-dir "$cpu/run" \
      >"$cpu/train.log" 2>&1 || { tail -20 "$cpu/train.log" >&2; exit 1; }
    cp "$cpu/run/hf_engine_log.jsonl" "$dir/hf_engine_cpu_log.jsonl"
    sed "s#$tiny#@TINY@#g" "$cpu/recipe.json" >"$dir/hf_engine_recipe.json"
    ;;
  run)
    dir=$2 out=$3/hf_engine
    [[ -f $dir/hf_engine_recipe.json ]] || {
      echo "error: $dir/hf_engine_recipe.json missing: run \`$0 prepare $dir\` (gpu_bundle.sh does)" >&2
      exit 2
    }
    mkdir -p "$4" "$out"
    work=$(mktemp -d "$(cd "$4" && pwd)/hf_engine.XXXXXX")
    cp -r "$dir/hf_engine_tiny" "$work/tiny"
    sed "s#@TINY@#$work/tiny#g" "$dir/hf_engine_recipe.json" >"$work/recipe.json"
    cp "$dir/hf_engine_cpu_log.jsonl" "$out/cpu_log.jsonl"
    "$PY" -m llava_moslora.cli train --engine hf "$work/recipe.json" --work-dir "$work/run"
    "$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' \
      >"$out/device.txt"
    cp "$work/run/hf_engine_log.jsonl" "$out/log.jsonl"
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
