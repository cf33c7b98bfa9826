#!/usr/bin/env bash
# The main job: the whole pipeline on a tiny LLaVA built locally, offline, on CPU. Build -> train
# MoSLoRA and the LoRA baseline (both towers, `llava-moslora train`, the two runs side by side,
# one core each) -> export -> VLMEvalKit on the offline tiny benchmarks -> Table-5-style table with
# a random guesser's scores as the last row + MMBench radar. Fixed seeds: a rerun prints the same
# table. Run it through uv: `uv run bash scripts/offline_pipeline.sh [OUT]`.
#
#   OUT (default work_dirs/offline)/
#     tiny/                    make-tiny's LLM, CLIP, projector and training data (2,000 images)
#     make_tiny.log            its captions' and verdict's training losses
#     bench/                   the offline benchmark TSVs ($LMUData)
#     train_{moslora,lora}/    work dirs of `llava-moslora train` (checkpoint, logs)
#     export_{moslora,lora}/   `llava-moslora export --to xtuner`
#     eval/{moslora,lora}/     VLMEvalKit predictions and scores
#     results.{md,csv}         the table;  mmbench_radar.png  the radar plot
#     summary.md               what the job printed, with the machine it ran on and its time
#                              (benchmarks/results/offline_results.md is a copy)
set -euo pipefail
OUT=${1:-work_dirs/offline}
SEED=0
source "$(dirname "$0")/claim_folder.sh"
claim_folder "$OUT" offline_pipeline  # a rerun replaces what an earlier run wrote, nothing else
export LLAVA_MOSLORA_TINY_DIR="$OUT/tiny" HF_HUB_OFFLINE=1
# A rerun replaces the trainings it wrote and nothing else: a work dir holding anything but what
# `llava-moslora train` writes there (mmengine's timestamped log folder, the config's copy,
# checkpoints, last_checkpoint, a dead run's lock) is refused before anything runs.
own_training() {  # own_training KIND: exit 2 unless OUT/train_KIND holds only a training's files
    local dir="$OUT/train_$1" entry
    for entry in "$dir"/* "$dir"/.[!.]*; do
        [ -e "$entry" ] || continue
        case "${entry##*/}" in
            [0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]_[0-9][0-9][0-9][0-9][0-9][0-9]) ;;
            iter_[0-9]*.pth | last_checkpoint | "tiny_quickstart_$1.py" | .llava_moslora_train.lock) ;;
            *)
                echo "error: $entry was not written by the job's training; move it out of $dir" \
                    "(a rerun replaces that folder) and run again" >&2
                exit 2
                ;;
        esac
    done
}
for kind in moslora lora; do own_training "$kind"; done
source "$(dirname "$0")/pin_numerics.sh"  # one table on every x86-64 machine with AVX2
export OMP_NUM_THREADS=1  # a tiny model: threads only add overhead; the two runs get a core each

# The model and data, and the benchmarks, side by side. make-tiny then gives the random tiny
# LLaVA what the paper's starts with (llava_moslora/builders/verdict.py): a projector aligned on
# captions (LLaVA's stage 1) and an LLM that compares a question's value with the words before
# its verdict (the stand-in for language pretraining; the yes/no rounds are answered "blue No").
# The only long step before training, so it gets both cores; docs/evaluation.md has the
# measurements.
OMP_NUM_THREADS=2 llava-moslora make-tiny "$LLAVA_MOSLORA_TINY_DIR" --seed "$SEED" --samples 2000 \
    --benchmark-rounds mcq_text,yes_no_read,short --verdict-steps 1000 > "$OUT/make_tiny.log" 2>&1 &
tiny=$!
llava-moslora make-tiny-bench "$OUT/bench" --seed "$SEED" --per-category 8 > /dev/null &
bench=$!
wait "$tiny" || { echo "error: make-tiny failed; the end of $OUT/make_tiny.log:" >&2
    tail -n 20 "$OUT/make_tiny.log" >&2; exit 1; }
wait "$bench" || { echo "error: make-tiny-bench failed" >&2; exit 1; }

# Each adapter's chain (train -> export -> VLMEvalKit) runs on its own core; the first to finish
# training is scored while the other still trains.
run_chain() {  # run_chain KIND
    local kind=$1
    llava-moslora train "configs/tiny_quickstart_$kind.py" --work-dir "$OUT/train_$kind" \
        --seed "$SEED" > "$OUT/train_$kind.log" 2>&1 || {
        echo "error: training $kind failed; the end of its log:" >&2
        tail -n 20 "$OUT/train_$kind.log" >&2
        return 1
    }
    llava-moslora export "$(cat "$OUT/train_$kind/last_checkpoint")" \
        --config "configs/tiny_quickstart_$kind.py" --to xtuner "$OUT/export_$kind" --overwrite \
        > "$OUT/export_$kind.log" 2>&1 || {
        echo "error: exporting $kind failed: see $OUT/export_$kind.log" >&2
        return 1
    }
    llava-moslora eval "$OUT/export_$kind" --suite tiny --data-root "$OUT/bench" \
        --work-dir "$OUT/eval" --run-name "$kind" --overwrite > "$OUT/eval_$kind.log" 2>&1 || {
        echo "error: evaluating $kind failed: see $OUT/eval_$kind.log" >&2
        return 1
    }
}
pids=()
for kind in moslora lora; do
    rm -rf "$OUT/train_$kind"
    echo "training, exporting and scoring $kind (logs: $OUT/{train,export,eval}_$kind.log)"
    run_chain "$kind" &
    pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
done
[ "$failed" = 0 ] || exit 1

llava-moslora machine > "$OUT/machine.md" &
machine=$!
table=$(llava-moslora report "$OUT/eval/moslora" "$OUT/eval/lora" --out "$OUT/results" \
    --radar "$OUT/mmbench_radar.png" --chance-from "$OUT/bench" | grep -v '^wrote ')
wait "$machine"
{
    echo "$table"
    echo
    steps=$(basename "$(cat "$OUT/train_moslora/last_checkpoint")" .pth)
    echo "Trained: seed $SEED, ${steps#iter_} steps each, on a tiny LLaVA built here, its projector first"
    echo "aligned on captions and its LLM taught the yes/no verdict (llava_moslora/builders/verdict.py);"
    echo "the adapters as each run's log names them:"
    for kind in moslora lora; do  # read off the run, not hand-copied
        echo "  $kind: $(sed -n 's/.* - \(LLM\|ViT\) adapter: /\1 /p' "$OUT/train_$kind.log" |
            paste -sd ';' - | sed 's/;/; /g')"
    done
    echo "Scored by VLMEvalKit on the offline tiny benchmarks (scores vs chance above)."
    echo "Table: $OUT/results.md (.csv); radar: $OUT/mmbench_radar.png;" \
        "checkpoints: $OUT/train_{moslora,lora}/; exports: $OUT/export_{moslora,lora}/"
    echo
    echo "Machine (numerics pinned by scripts/pin_numerics.sh: the same table on every x86-64 CPU with AVX2):"
    cat "$OUT/machine.md"
    echo "- the job: $((SECONDS / 60)) min $((SECONDS % 60)) s"
} | tee "$OUT/summary.md"
