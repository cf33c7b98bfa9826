#!/usr/bin/env bash
# The GPU check: one command, one call, on a GPU machine without network (docs/gpu.md).
#
#     OUT=/some/dir scripts/gpu_check.sh [BUNDLE]   # GPU: BUNDLE from scripts/gpu_bundle.sh
#     OUT=/some/dir scripts/gpu_check.sh --dry-run  # CPU, tiny widths: tests/test_gpu_check.py
#
# Phases, each under its own `timeout` (seconds; 535 in all, under one call's 10 minutes), each
# logged to $OUT/logs/PHASE.log and recorded in $OUT/phases.tsv as soon as it ends: a failed or
# killed phase is recorded and the next one runs, so a kill of the whole call still returns
# every phase before it.
#   env          20  versions, GPU name, the environment (`$OUT/env.txt`)
#   install      45  the bundle's wheels into work_dirs/gpu_check_site (pip --no-index --no-deps)
#   cuda_tests   40  tests/test_cuda.py (needs pytest on the image; skipped without it)
#   hf_engine    60  the hf engine trains the tiny LLaVA on the image's transformers, its losses
#                    beside the same run's on the CPU that built the bundle (gpu_hf_engine.sh)
#   adapters     75  LoRA vs MoSLoRA, 4 LLaMA-3-8B blocks (scripts/bench_blocks.py)
#   nf4          75  QLoRA vs QMoSLoRA (4-bit NF4 base, r512)
#   zero2        60  MoSLoRA under DeepSpeed ZeRO-2 on one GPU
#   zero3        60  ... ZeRO-3
#   table4       40  the paper's Table 4 shape (text-only, r16 on q,k,v,up,down, batch 16)
#   plan         50  `llava-moslora plan` of the LLaVA recipe (dry run: 1 + 1 layers, 640 positions):
#                    needs the XTuner stack
#                    (transformers 4.57), which the image lacks: recorded as skipped there
#   report       10  $OUT/gpu_check.md: every measured peak beside the planner's, the ratios
# The dry run multiplies every limit by GPU_CHECK_LIMIT_SCALE (default 4).
# The adapter-level phases need only torch, transformers (5.x is fine), peft, the plugin (this
# tree, on PYTHONPATH), bitsandbytes and DeepSpeed (both in the bundle). The last line printed
# summarises. The dry run uses this venv's Python, tiny widths and 2 steps, and skips `install`.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
BUNDLE=gpu_bundle
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    *) BUNDLE=$arg ;;
  esac
done
OUT=${OUT:-work_dirs/gpu_check}
mkdir -p "$OUT/logs" "$OUT/blocks"
OUT=$(cd "$OUT" && pwd)
# One process is the whole "cluster": DeepSpeed reads these instead of probing MPI (mpi4py is on
# the image, an MPI runtime is not). No hub, ever.
export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1
export MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29531}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=${GPU_CHECK_SITE:-$PWD/work_dirs/gpu_check_site} # outside $OUT: it does not come back
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ((DRY)); then
  PY=${PYTHON:-python}
  BLOCKS=(--tiny --steps 2 --warmup 1)
  SCALE=${GPU_CHECK_LIMIT_SCALE:-4} # a shared 2-core CI machine, not a GPU machine's 16 cores
else
  PY=${PYTHON:-python3}
  BLOCKS=(--steps 6 --warmup 2)
  SCALE=1
fi
PHASES=$OUT/phases.tsv
printf 'phase\tstatus\texit\tseconds\n' >"$PHASES"
START=$SECONDS

phase() { # phase NAME LIMIT_S COMMAND...: run it under `timeout`, record how it ended
  local name=$1 limit=$(($2 * SCALE)) begin=$SECONDS rc status
  shift 2
  echo "[gpu_check +$((SECONDS - START))s] $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - begin))" >>"$PHASES"
  [[ $status == ok ]] || tail -5 "$OUT/logs/$name.log" | sed "s/^/  $name: /"
}
skip() { # skip NAME WHY
  printf '%s\tskipped\t-\t0\n' "$1" >>"$PHASES"
  echo "$2" >"$OUT/logs/$1.log"
  echo "[gpu_check +$((SECONDS - START))s] $1: skipped ($2)"
}

environment() {
  "$PY" - <<'EOF'
import importlib.metadata as md, os, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
for name in ("transformers", "peft", "accelerate", "safetensors", "deepspeed", "bitsandbytes",
             "xtuner", "mmengine", "pytest"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} -")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
print({k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                 "MASTER_PORT", "HF_HUB_OFFLINE")})
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi || true
}
phase env 20 bash -c "$(declare -f environment); PY=$PY environment"
cp "$OUT/logs/env.log" "$OUT/env.txt"

if ((DRY)); then
  skip install "dry run: this venv holds the stack"
else
  phase install 45 "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" \
    "$BUNDLE"/*.whl
  # The bundle keeps bitsandbytes' CUDA 12.8 / 13.x builds: where torch's CUDA has no build of
  # its own (12.9, say), load the newest of the same major version.
  cuda=$("$PY" -c 'import torch; print((torch.version.cuda or "").replace(".", ""))' 2>/dev/null)
  if [[ -n $cuda && ! -e $SITE/bitsandbytes/libbitsandbytes_cuda$cuda.so ]]; then
    pick=$(ls "$SITE"/bitsandbytes/libbitsandbytes_cuda"${cuda:0:2}"*.so 2>/dev/null | sort -V | tail -1)
    pick=${pick##*_cuda}
    [[ -z $pick ]] || export BNB_CUDA_VERSION=${pick%.so}
  fi
fi
if ((DRY)); then
  skip cuda_tests "no CUDA in a dry run"
elif "$PY" -c "import pytest" >/dev/null 2>&1; then
  phase cuda_tests 40 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
else
  skip cuda_tests "no pytest on this Python"
fi
if ((DRY)); then # the bundle's inputs, made here as gpu_bundle.sh makes them
  HF_INPUTS=$(mktemp -d)
  trap 'rm -rf "$HF_INPUTS"' EXIT
  hf_engine=(bash -c "PY='$PY' scripts/gpu_hf_engine.sh prepare '$HF_INPUTS' &&
    PY='$PY' scripts/gpu_hf_engine.sh run '$HF_INPUTS' '$OUT' '$HF_INPUTS'")
else
  hf_engine=(env PY="$PY" bash scripts/gpu_hf_engine.sh run "$BUNDLE" "$OUT" "$(dirname "$SITE")")
fi
phase hf_engine 60 "${hf_engine[@]}"
phase adapters 75 "$PY" scripts/bench_blocks.py lora moslora --out-dir "$OUT/blocks" "${BLOCKS[@]}"
phase nf4 75 "$PY" scripts/bench_blocks.py qlora qmoslora --out-dir "$OUT/blocks" "${BLOCKS[@]}"
phase zero2 60 "$PY" scripts/bench_blocks.py zero2 --out-dir "$OUT/blocks" "${BLOCKS[@]}"
phase zero3 60 "$PY" scripts/bench_blocks.py zero3 --out-dir "$OUT/blocks" "${BLOCKS[@]}"
phase table4 40 "$PY" scripts/bench_blocks.py table4_lora table4_moslora --out-dir "$OUT/blocks" \
  "${BLOCKS[@]}"
if "$PY" -c "import xtuner.model" >/dev/null 2>&1; then
  if ((DRY)); then
    plan_args=(configs/llama3_moslora.py --llm-layers 1 --vit-layers 1 --seq-len 640)
  else # the paper's LLaVA recipes at full depth, 1 GPU of this machine's memory
    gib=$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)')
    plan_args=(configs/llama3_moslora.py --deepspeed zero2 --gpu-memory "$gib")
  fi
  phase plan 50 "$PY" -m llava_moslora.cli plan "${plan_args[@]}"
else
  skip plan "the XTuner stack (transformers 4.57) is not importable here"
fi
phase report 10 "$PY" scripts/gpu_report.py "$OUT" --elapsed $((SECONDS - START))
tail -1 "$OUT/gpu_check.md" 2>/dev/null || echo "gpu_check: no report; phases in $PHASES"
