#!/usr/bin/env bash
# The whole pipeline on a tiny LLaVA built locally, offline, on CPU: build -> train (MoSLoRA and
# the LoRA baseline, both towers, `xtuner train`) -> export -> VLMEvalKit on the offline tiny
# benchmarks -> Table-5-style table + MMBench radar. Run it through uv: `uv run bash scripts/offline_pipeline.sh`.
#
#   OUT (default work_dirs/offline)/
#     tiny/                    make-tiny's LLM, CLIP, projector and training data
#     train_{moslora,lora}/    xtuner work dirs (checkpoints, logs)
#     export_{moslora,lora}/   `llava-moslora export --to xtuner`
#     bench/                   the offline benchmark TSVs ($LMUData)
#     eval/{moslora,lora}/     VLMEvalKit predictions and scores
#     results.{md,csv}         the table;  mmbench_radar.png  the radar plot
set -euo pipefail
OUT=${1:-work_dirs/offline}
export LLAVA_MOSLORA_TINY_DIR="$OUT/tiny"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a tiny model: threads only add overhead

llava-moslora make-tiny "$LLAVA_MOSLORA_TINY_DIR"
for kind in moslora lora; do
    rm -rf "$OUT/train_$kind"
    xtuner train "configs/tiny_$kind.py" --work-dir "$OUT/train_$kind"
    # `xtuner train` exits 0 even when training fails: no last_checkpoint stops the script here.
    checkpoint=$(cat "$OUT/train_$kind/last_checkpoint")
    llava-moslora export "$checkpoint" --config "configs/tiny_$kind.py" --to xtuner \
        "$OUT/export_$kind" --overwrite
    llava-moslora eval "$OUT/export_$kind" --suite tiny --data-root "$OUT/bench" \
        --work-dir "$OUT/eval" --run-name "$kind"
done
llava-moslora report "$OUT/eval/moslora" "$OUT/eval/lora" --out "$OUT/results" \
    --radar "$OUT/mmbench_radar.png"
cat "$OUT/results.md"
echo "radar plot: $OUT/mmbench_radar.png"
