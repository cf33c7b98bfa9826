#!/usr/bin/env bash
# The adapter tests against the lowest and the highest PEFT and transformers that pyproject.toml's
# bounds allow, every pair in its own venv. CI tests only uv.lock's stack; this is what keeps the
# bounds honest, because the plugin leans on PEFT internals (`LoraVariant`,
# `LoraConfig._register_custom_module`) that move between minor releases.
#
#   bash scripts/compat.sh     # needs uv and PyPI; about 4 1/2 min on 2 cores with uv's cache warm
#
# Each venv first gets the adapter's stack at uv.lock's versions, then the pair's two pins: uv moves
# only what those pins require (its log says what), so a failure points at PEFT or transformers.
# The venvs live under COMPAT_DIR (default /tmp/llava_moslora_compat), never in the repo.
# Exits non-zero if any pair fails.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPAT_DIR=${COMPAT_DIR:-/tmp/llava_moslora_compat}
# The tests that exercise the adapter in PEFT without XTuner: equations, PEFT's own paths, merge,
# save/load/fold, 4-bit.
TESTS=(tests/test_equations.py tests/test_peft_integration.py tests/test_merge.py
    tests/test_io.py tests/test_qmoslora.py)
STACK=(torch transformers peft bitsandbytes safetensors pytest)  # what those tests import
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: threads only add overhead

bound() {  # bound PACKAGE -> its requirement in [project] dependencies, e.g. "peft>=0.19,<0.22"
    python3 -c 'import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in deps if re.split(r"[<>=!~ ;\[]", d)[0] == sys.argv[1]))' "$1"
}

# PyPI's versions at the ends of [project]'s bounds, not filtered through pyproject's [tool.uv]
# settings: --no-config.
resolve() {  # resolve REQUIREMENT lowest|highest -> the version PyPI has at that end of the bounds
    echo "$1" | uv pip compile --no-config - --no-deps --resolution "$2" --no-header --no-annotate -q |
        sed -n 's/^[^=]*==//p'
}

mkdir -p "$COMPAT_DIR"
# The default groups (dev, xtuner): the hf5 group conflicts with xtuner, so not --all-groups.
uv export --frozen --no-hashes --no-emit-project -q -o "$COMPAT_DIR/locked.txt"
peft_req=$(bound peft)
transformers_req=$(bound transformers)
peft_versions=("$(resolve "$peft_req" lowest)" "$(resolve "$peft_req" highest)")
transformers_versions=("$(resolve "$transformers_req" lowest)" "$(resolve "$transformers_req" highest)")
echo "pyproject: $peft_req, $transformers_req; testing peft ${peft_versions[*]} x transformers ${transformers_versions[*]}"

rows=()
status=0
for peft in "${peft_versions[@]}"; do
    for transformers in "${transformers_versions[@]}"; do
        name="peft-$peft-transformers-$transformers"
        venv="$COMPAT_DIR/$name"
        log="$COMPAT_DIR/$name.log"
        {
            uv venv -q --allow-existing "$venv"
            uv pip install --no-config -q -p "$venv" -c "$COMPAT_DIR/locked.txt" "${STACK[@]}"
            uv pip install --no-config -p "$venv" "peft==$peft" "transformers==$transformers"
        } > "$log" 2>&1 || { echo "error: installing $name failed; see $log" >&2; exit 2; }
        start=$SECONDS
        if "$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "${TESTS[@]}" \
            >> "$log" 2>&1; then
            result=ok
        else
            result=FAILED
            status=1
        fi
        counts=$(tail -n 1 "$log" | sed -E 's/^=+ //; s/ in [0-9.]+s.*$//')
        rows+=("$(printf '%-8s %-13s %-7s %-32s %4ss' "$peft" "$transformers" "$result" \
            "$counts" $((SECONDS - start)))")
    done
done

printf '\n%-8s %-13s %-7s %-32s %5s\n' peft transformers result tests time
printf '%s\n' "${rows[@]}"
echo "logs: $COMPAT_DIR/peft-<version>-transformers-<version>.log"
exit "$status"
