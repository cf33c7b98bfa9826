#!/usr/bin/env bash
# The paper's recipes at their real widths on one GPU machine without network, in one command.
#
#     scripts/gpu_check.sh [BUNDLE]     # on the GPU machine; BUNDLE from scripts/gpu_bundle.sh
#     scripts/gpu_check.sh --dry-run    # CPU, tiny shapes, 2 steps: what tests/test_gpu_check.py runs
#
# 1. installs the bundle's wheels with --no-index (BUNDLE/a, BUNDLE/b, BUNDLE/c if present)
# 2. tests/test_cuda.py
# 3. stand-ins: llama3-8b and internlm2-7b (real widths, 2 LLM + 2 ViT layers, 2048-position data)
# 4. `llava-moslora train` (XTuner's launcher, with the run's exit code), the unchanged paper
#    configs with path-only --cfg-options plus the run length (STEPS iterations, log every one):
#      llama3_moslora vs llama3_lora          --deepspeed deepspeed_zero2, bf16, batch 8
#      internlm2_qmoslora vs internlm2_qlora  --deepspeed deepspeed_zero3, 4-bit NF4, batch 16
# 5. benchmarks/results/gpu_check.md: median step time, peak memory per GPU, ratios
#    (scripts/gpu_report.py), the memory plan for the same runs (llava-moslora plan)
# 6. an hf-llava export of the MoSLoRA run, generating a few tokens with stock transformers
# Budget: under 8 minutes on one H100/H200. The dry run swaps in the tiny shapes and configs
# (tiny_moslora / tiny_lora, tiny_qmoslora / tiny_qlora), 2 steps, and writes to WORK only.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
BUNDLE=gpu_bundle
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    *) BUNDLE=$arg ;;
  esac
done
WORK=${GPU_CHECK_WORK:-work_dirs/gpu_check}
mkdir -p "$WORK"
START=$SECONDS
log() { echo "[gpu_check +$((SECONDS - START))s] $*"; }

if (( DRY )); then
  PY=${PYTHON:-python}
  STEPS=${STEPS:-2}
  OUT=$WORK/gpu_check.md
  PAIR1=(tiny_moslora tiny_lora) PAIR2=(tiny_qmoslora tiny_qlora)
  SHAPE1=tiny SHAPE2=tiny
else
  PY=${PYTHON:-python3}
  STEPS=${STEPS:-30}
  OUT=benchmarks/results/gpu_check.md
  PAIR1=(llama3_moslora llama3_lora) PAIR2=(internlm2_qmoslora internlm2_qlora)
  SHAPE1=llama3-8b SHAPE2=internlm2-7b
  log "installing from $BUNDLE (no index)"
  wheels=("$BUNDLE"/a/*.whl "$BUNDLE"/b/*.whl)
  [[ -d "$BUNDLE/c" ]] && wheels+=("$BUNDLE"/c/*.whl)
  "$PY" -m pip install --quiet --no-index --no-deps "${wheels[@]}"
  missing=$("$PY" - <<'EOF'
import importlib
print(" ".join(m for m in ("cv2", "datasets", "pyarrow", "pandas", "scipy", "torchvision")
               if importlib.util.find_spec(m) is None))
EOF
)
  [[ -z "$missing" ]] || { echo "error: the image lacks $missing: build BUNDLE/c with gpu_bundle.sh --heavy"; exit 1; }
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
fi
export PATH="$(dirname "$(command -v "$PY")"):$PATH"

: >"$OUT"
{
  echo "# gpu_check ($(date -u +%Y-%m-%d), $([[ $DRY == 1 ]] && echo 'CPU dry run, tiny shapes' || "$PY" -c 'import torch; print(torch.cuda.get_device_name())'))"
  echo
  "$PY" -c 'import torch, transformers, peft, deepspeed; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, deepspeed {deepspeed.__version__}")' | grep -v '\[WARNING\]'
  echo
} >>"$OUT"

log "tests/test_cuda.py"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -1 | tee -a "$OUT"

standin() {  # standin SHAPE DIR
  if [[ $1 == tiny ]]; then
    llava-moslora make-tiny "$2" --samples 16 >/dev/null
  else
    llava-moslora make-tiny "$2" --shape "$1" --samples 64 >/dev/null
  fi
}
log "stand-ins: $SHAPE1, $SHAPE2"
[[ -d "$WORK/standin_$SHAPE1/llm" ]] || standin "$SHAPE1" "$WORK/standin_$SHAPE1"
[[ -d "$WORK/standin_$SHAPE2/llm" ]] || standin "$SHAPE2" "$WORK/standin_$SHAPE2"

train() {  # train CONFIG STAGE STANDIN
  local options
  read -r -a options <<<"$(llava-moslora standin-options "configs/$1.py" "$3")"
  log "llava-moslora train $1 --deepspeed deepspeed_$2 ($STEPS steps)"
  # Besides paths, only the run length: STEPS iterations, the schedule (3 % warm-up of an epoch
  # is 0 iterations on a stand-in's data) as 1 warm-up iteration then cosine, log every step.
  llava-moslora train "configs/$1.py" --deepspeed "deepspeed_$2" --work-dir "$WORK/$1" \
    --cfg-options "${options[@]}" train_cfg.max_epochs=None "train_cfg.max_iters=$STEPS" \
    param_scheduler.0.by_epoch=False param_scheduler.0.convert_to_iter_based=False \
    param_scheduler.0.begin=0 param_scheduler.0.end=1 \
    param_scheduler.1.by_epoch=False param_scheduler.1.convert_to_iter_based=False \
    param_scheduler.1.begin=1 "param_scheduler.1.end=$STEPS" \
    default_hooks.logger.interval=1 "default_hooks.checkpoint.interval=$STEPS" \
    >"$WORK/$1.log" 2>&1 && [[ -e "$WORK/$1/iter_$STEPS.pth" ]] \
    || { tail -40 "$WORK/$1.log"; echo "error: $1 failed"; exit 1; }
}
for config in "${PAIR1[@]}"; do train "$config" zero2 "$WORK/standin_$SHAPE1"; done
for config in "${PAIR2[@]}"; do train "$config" zero3 "$WORK/standin_$SHAPE2"; done

"$PY" scripts/gpu_report.py "$WORK" "${PAIR1[0]}:${PAIR1[1]}" "${PAIR2[0]}:${PAIR2[1]}" \
  --skip $(( STEPS > 10 ? 5 : 0 )) --title "runs ($STEPS steps each, one GPU)" --out "$OUT"

log "memory plan of the same runs"
{
  echo "## llava-moslora plan for the same runs"
  for pair in "${PAIR1[0]} zero2 $SHAPE1" "${PAIR2[0]} zero3 $SHAPE2"; do
    read -r config stage shape <<<"$pair"
    read -r -a options <<<"$(llava-moslora standin-options "configs/$config.py" "$WORK/standin_$shape")"
    echo
    llava-moslora plan "configs/$config.py" --gpus 1 --deepspeed "$stage" \
      --gpu-memory "$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80)')" \
      --cfg-options "${options[@]}" 2>/dev/null | grep -v '\[WARNING\]'
  done
  echo
} >>"$OUT"

log "hf-llava export of ${PAIR1[0]} and generation"
ckpt=$(ls -d "$WORK/${PAIR1[0]}"/iter_*.pth | sort -V | tail -1)
read -r -a options <<<"$(llava-moslora standin-options "configs/${PAIR1[0]}.py" "$WORK/standin_$SHAPE1")"
rm -rf "$WORK/hf_llava"
llava-moslora export "$ckpt" "$WORK/hf_llava" --config "configs/${PAIR1[0]}.py" --to hf-llava \
  --cfg-options "${options[@]}" >"$WORK/export.log" 2>&1 || { tail -40 "$WORK/export.log"; exit 1; }
"$PY" - "$WORK/hf_llava" "$WORK/standin_$SHAPE1/data/images" >>"$OUT" <<'EOF'
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

out, images = sys.argv[1], Path(sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = LlavaForConditionalGeneration.from_pretrained(out, torch_dtype=dtype).to(device).eval()
processor = AutoProcessor.from_pretrained(out)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
image = Image.open(sorted(images.glob("*.png"))[0]).convert("RGB")
batch = processor(images=image, text=prompt, return_tensors="pt").to(device)
batch["pixel_values"] = batch["pixel_values"].to(dtype)
batch.pop("token_type_ids", None)  # the fast tokenizer returns it; LLaVA's generate refuses it
with torch.no_grad():
    ids = model.generate(**batch, max_new_tokens=8, do_sample=False)
new = ids[0, batch["input_ids"].shape[1]:]
assert len(new) > 0, "generated nothing"
print(f"## hf-llava export\n\ngenerated {len(new)} tokens (random weights): {new.tolist()}\n")
EOF
log "done: $OUT"
