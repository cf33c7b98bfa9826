#!/usr/bin/env bash
# The ablation on a pretrained base (docs/ablation.md), in one command: build the tiny base
# (`make-tiny --pretrain`, trained on question family A; cached), then adapt it to family B with
# LoRA, TS-Mixing, MoSLoRA Kaiming and orthogonal, and init-only, at rank 8 and at rank 64 (the
# paper's scales: LLM alpha/r 2, ViT 1/4), each rank an `ablate --lr-grid` on its own core: a rate
# grid on 2 grid seeds (100, 101: never test seeds) scored on family B's validation items, widened
# by a factor 2 beyond an edge choice (at most 2 steps per side), then 12 test seeds (0-11) at the
# shared rate (the config's 2e-3) and at each variant's chosen rate, scored on family B's and
# family A's test items; last, `ablate-report` pools both ranks (Holm over every comparison,
# paired TOST against +-3 points) into OUT/summary.md. Rank 64's grid starts one step lower than
# rank 8's (on 2e-3..8e-3 every variant's best at rank 64 was 2e-3, and 8e-3 left every variant
# at chance). About 1.5 hours on 2 idle CPU cores (measured: docs/ablation.md). Run it through uv:
#
#     uv run bash scripts/ablation_pretrained.sh [OUT]
#
#   OUT (default work_dirs/ablation_pretrained)/
#     base/          the pretrained tiny LLaVA (make-tiny's layout + pretrained.json)
#     r8/, r64/      each rank's ablation: runs, lr_grid.json, ablation.{md,csv,png},
#                    ablation_{shared,best}_lr.{csv,png}
#     r8.log, r64.log
#     summary.md     both ranks pooled (`llava-moslora ablate-report OUT`)
#     machine.md     the CPU, its flags, the kernels in use and the pins (`llava-moslora machine`)
#
# Interrupted? Run the same command again: finished runs are kept (each run is resumed or redone
# by `ablate`), and the base is reused.
set -euo pipefail
OUT=${1:-work_dirs/ablation_pretrained}
SEEDS=12  # as many as keep the whole measurement within about 2 hours (docs/ablation.md)
GRID_SEEDS=100,101  # disjoint from the test seeds 0..SEEDS-1 (ablate refuses an overlap)
GRID_WIDEN=2
RATES_R8=2e-3,4e-3,8e-3
RATES_R64=1e-3,2e-3,4e-3
VARIANTS=lora,ts_mixing,moslora_kaiming,moslora_orthogonal,init_only
source "$(dirname "$0")/claim_folder.sh"
claim_folder "$OUT" ablation_pretrained
export LLAVA_MOSLORA_TINY_DIR="$OUT/base" HF_HUB_OFFLINE=1
source "$(dirname "$0")/pin_numerics.sh"  # the same numbers on every x86-64 CPU with AVX2
export OMP_NUM_THREADS=1  # a tiny model: threads only add overhead; each rank gets a core

llava-moslora machine > "$OUT/machine.md"  # every number below names the machine it came from
llava-moslora make-tiny "$LLAVA_MOSLORA_TINY_DIR" --pretrain

run_rank() {  # run_rank NAME RATES [--cfg-options ...]
    local name=$1 rates=$2
    shift 2
    llava-moslora ablate --config configs/tiny_ablation_pretrained.py --variants "$VARIANTS" \
        --seeds "$SEEDS" --lr-grid "$rates" --grid-seeds "$GRID_SEEDS" --grid-widen "$GRID_WIDEN" --work-dir "$OUT/$name" \
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
llava-moslora ablate-report "$OUT" > "$OUT/summary.log" 2>&1 || {
    echo "error: pooling the ranks failed; $OUT/summary.log:" >&2
    tail -n 20 "$OUT/summary.log" >&2
    exit 1
}
echo "reports: $OUT/r8/ablation.md, $OUT/r64/ablation.md and $OUT/summary.md"
