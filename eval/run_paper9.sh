#!/usr/bin/env bash
# The paper's 9 benchmarks (Table 5) through VLMEvalKit on a GPU machine, then Table 5 + Figure 5.
#
#   bash eval/run_paper9.sh exports/llama3_moslora exports/llama3_lora ...
#
# The benchmarks are eval/suites/paper9.txt; eval/README.md says how to add one.
#
# Needs: the exported folders (`llava-moslora export ... --to xtuner|peft-folded|hf-llava`), the
# benchmark TSVs (VLMEvalKit downloads them into $LMUData on first use, ~10 GB; or copy them there
# and add --offline to make any download an error), and for MathVista / MM-Vet an
# OpenAI-compatible judge. Without a judge those two are run, saved, and marked "pending".
# A run folder belongs to one export: evaluating a re-exported model into the same run is refused
# (pass --overwrite for fresh predictions, or another --run-name). Every score records its
# protocol (scorer, TSV md5, prompt, decoding, VLMEvalKit version); `report` prints it.
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
  # MMBench_DEV_EN/CN (v1.0 dev, the table's MMBench columns) and MMBench_TEST_EN/CN_V11
  # (V1.1 test, public answers, scored locally, columns of their own). For TextVQA as LLaVA-1.5
  # reports it (OCR tokens in the prompt) add: --textvqa-ocr llava_textvqa_val_v051_ocr.jsonl
  llava-moslora eval "$model_dir" --suite paper9 --work-dir "$WORK_DIR" "${JUDGE[@]}"
  runs+=("$WORK_DIR/$(basename "$model_dir")")
done

# Later, once a judge is configured, score what was left pending from the saved predictions:
#   llava-moslora eval "$model_dir" --score-only --work-dir "$WORK_DIR" --judge-model ...

llava-moslora report "${runs[@]}" --out "$WORK_DIR/table5" --radar "$WORK_DIR/mmbench_radar.png"
# The radar of the V1.1 test split: llava-moslora radar "${runs[@]}" --mmbench-split v11-test \
#     --out "$WORK_DIR/mmbench_v11_radar.png"
