#!/usr/bin/env bash
# The ablation on a pretrained base (docs/ablation.md), in one command: build the tiny base
# (`make-tiny --pretrain`, trained on question family A; cached), then adapt it to family B with
# LoRA, TS-Mixing, MoSLoRA Kaiming and orthogonal, and init-only, at rank 8 and at rank 64 (the
# paper's scales: LLM alpha/r 2, ViT 1/4), each rank an `ablate --lr-grid` on its own core: a rate
# grid on 2 seeds scored on family B's validation items, then 5 seeds at the shared rate (the
# config's 2e-3) and at each variant's chosen rate, scored on family B's and family A's test items.
# Rank 64's grid reaches one step lower than rank 8's: on 2e-3, 4e-3, 8e-3 every variant's best at
# rank 64 was the lowest rate, the grid's edge. About 2 hours on 2 CPU cores. Run it through uv:
#
#     uv run bash scripts/ablation_pretrained.sh [OUT]
#
#   OUT (default work_dirs/ablation_pretrained)/
#     base/          the pretrained tiny LLaVA (make-tiny's layout + pretrained.json)
#     r8/, r64/      each rank's ablation: runs, lr_grid.json, ablation.{md,csv,png},
#                    ablation_{shared,best}_lr.{csv,png}
#     r8.log, r64.log
#
# Interrupted? Run the same command again: finished runs are kept (each run is resumed or redone
# by `ablate`), and the base is reused.
set -euo pipefail
OUT=${1:-work_dirs/ablation_pretrained}
SEEDS=5
GRID_SEEDS=2
RATES_R8=2e-3,4e-3,8e-3
RATES_R64=1e-3,2e-3,4e-3,8e-3
VARIANTS=lora,ts_mixing,moslora_kaiming,moslora_orthogonal,init_only
source "$(dirname "$0")/claim_folder.sh"
claim_folder "$OUT" ablation_pretrained
export LLAVA_MOSLORA_TINY_DIR="$OUT/base" HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=1  # a tiny model: threads only add overhead; each rank gets a core

llava-moslora make-tiny "$LLAVA_MOSLORA_TINY_DIR" --pretrain

run_rank() {  # run_rank NAME RATES [--cfg-options ...]
    local name=$1 rates=$2
    shift 2
    llava-moslora ablate --config configs/tiny_ablation_pretrained.py --variants "$VARIANTS" \
        --seeds "$SEEDS" --lr-grid "$rates" --grid-seeds "$GRID_SEEDS" --work-dir "$OUT/$name" \
        "$@" > "$OUT/$name.log" 2>&1 || {
        echo "error: the rank-$name ablation failed; the end of $OUT/$name.log:" >&2
        tail -n 20 "$OUT/$name.log" >&2
        return 1
    }
}
echo "rank 8 and rank 64 side by side (logs: $OUT/r8.log, $OUT/r64.log)"
run_rank r8 "$RATES_R8" &
r8=$!
run_rank r64 "$RATES_R64" --cfg-options model.llm_lora.r=64 model.llm_lora.lora_alpha=128 \
    model.visual_encoder_lora.r=64 model.visual_encoder_lora.lora_alpha=16 &
r64=$!
failed=0
wait "$r8" || failed=1
wait "$r64" || failed=1
[ "$failed" = 0 ] || exit 1
echo "reports: $OUT/r8/ablation.md and $OUT/r64/ablation.md"
