#!/usr/bin/env bash
# The paper's 9 benchmarks (Table 5) through VLMEvalKit on a GPU machine, then Table 5 + Figure 5.
#
#   bash scripts/run_paper9.sh exports/llama3_moslora exports/llama3_lora ...
#
# Needs: the exported folders (`llava-moslora export ... --to xtuner|peft-folded|hf-llava`), the
# benchmark TSVs (VLMEvalKit downloads them into $LMUData on first use, ~10 GB; or copy them there
# and add --offline to make any download an error), and for MathVista / MM-Vet an
# OpenAI-compatible judge. Without a judge those two are run, saved, and marked "pending".
set -euo pipefail

export LMUData="${LMUData:-$HOME/LMUData}"     # VLMEvalKit's data root
WORK_DIR="${WORK_DIR:-eval_runs}"

# Judge, option 1: OpenAI itself (VLMEvalKit reads these two variables).
#   export OPENAI_API_KEY=sk-...                   # MathVista -> gpt-4o-mini, MM-Vet -> gpt-4-turbo
#   export OPENAI_API_BASE=https://api.openai.com/v1/chat/completions   # optional
# Judge, option 2: any OpenAI-compatible server (vLLM, LMDeploy, ...), key in a variable you name:
#   export JUDGE_KEY=...
#   JUDGE=(--judge-model Qwen2.5-72B-Instruct --judge-base-url http://judge-host:8000/v1 \
#          --judge-api-key-env JUDGE_KEY)
JUDGE=()   # replace with the option-2 array above to use your own judge

runs=()
for model_dir in "$@"; do
  # MMBench_TEST_EN/CN: prediction files to upload to https://mmbench.opencompass.org.cn
  # (no local score); MMBench_DEV_EN/CN: scored locally and shown in the table.
  llava-moslora eval "$model_dir" --suite paper9 --work-dir "$WORK_DIR" "${JUDGE[@]}"
  runs+=("$WORK_DIR/$(basename "$model_dir")")
done

# Later, once a judge is configured, score what was left pending from the saved predictions:
#   llava-moslora eval "$model_dir" --score-only --work-dir "$WORK_DIR" --judge-model ...

llava-moslora report "${runs[@]}" --out "$WORK_DIR/table5" --radar "$WORK_DIR/mmbench_radar.png"
