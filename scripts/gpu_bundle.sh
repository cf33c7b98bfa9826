#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine without network: only what its image
# (Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, peft, safetensors) lacks.
#
#     scripts/gpu_bundle.sh [OUT]          # default OUT: gpu_bundle/ (git-ignored)
#
#   bitsandbytes  uv.lock's version, stripped to the CUDA 12.8 / 13.0 / 13.2 libraries (the ones
#                 an H100/H200 under torch 2.11's CUDA loads) and the CPU one: 43 MB -> about 7 MB
#   deepspeed     uv.lock's version, a pure-Python wheel built here from its sdist (DS_BUILD_OPS=0;
#                 upstream ships no wheel), and its small dependencies the image lacks
#   hf_engine_*   the tiny LLaVA, its recipe and this CPU's losses for the hf engine's phase
#                 (scripts/gpu_hf_engine.sh prepare: about 3 MB)
# The plugin itself travels as the tree (gpu_check.sh puts it on PYTHONPATH). Fails unless the
# bundle plus the tree (tracked and untracked-not-ignored files, what a GPU call carries) stay
# under 64 MiB; prints both sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_bundle}
LIMIT=$((64 * 1024 * 1024))
PIP=(env PIP_FIND_LINKS= python3 -m pip) # not the machine's local CPU-torch wheel folder
PY=$PWD/.venv/bin/python
[[ -x "$PY" ]] || { echo "error: run \`uv sync --frozen\` first (.venv builds DeepSpeed's wheel)"; exit 2; }
# OUT is rebuilt whole: only a folder this script made (its marker inside) or an empty one.
if [[ -e $OUT && ! -e $OUT/.gpu_bundle && -n $(ls -A "$OUT" 2>/dev/null) ]]; then
  echo "error: $OUT holds files this script did not write; give an empty or new folder" >&2
  exit 2
fi
rm -rf "$OUT" && mkdir -p "$OUT/build" && touch "$OUT/.gpu_bundle"
OUT=$(cd "$OUT" && pwd)

pin() { # pin NAME: NAME==uv.lock's version
  "$PY" - "$1" <<'EOF'
import sys, tomllib
name = sys.argv[1]
lock = tomllib.load(open("uv.lock", "rb"))["package"]
print(next(f"{name}=={p['version']}" for p in lock if p["name"] == name))
EOF
}
# DeepSpeed 0.17's requirements the image does not hold (numpy, packaging, psutil, tqdm, torch:
# it does), with pydantic's own.
SMALL=(hjson ninja py-cpuinfo msgpack einops pydantic pydantic-core annotated-types typing-inspection)
specs=("$(pin bitsandbytes)")
for name in "${SMALL[@]}"; do specs+=("$(pin "$name")"); done
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$OUT/build" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any "${specs[@]}"
mv "$OUT"/build/*.whl "$OUT"/

# bitsandbytes without the libraries this GPU never loads (ROCm, CUDA 11.8-12.6 builds).
"$PY" - "$OUT"/bitsandbytes-*.whl <<'EOF'
import re, sys, zipfile
from pathlib import Path
path = Path(sys.argv[1])
keep = re.compile(r"libbitsandbytes_(cuda12[89]|cuda13\d|cpu)\.so$")
drop = lambda name: "libbitsandbytes_" in name and not keep.search(name)
stripped = path.with_suffix(".stripped")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # no entries for the dropped files
            lines = data.decode().splitlines(keepends=True)
            data = "".join(l for l in lines if not drop(l.split(",", 1)[0])).encode()
        dst.writestr(item, data)
stripped.replace(path)
EOF

DS=$(pin deepspeed | cut -d= -f3)
"${PIP[@]}" download --quiet --no-deps --no-binary :all: --dest "$OUT/build" "deepspeed==$DS"
tar xzf "$OUT/build/deepspeed-$DS.tar.gz" -C "$OUT/build"
(cd "$OUT/build/deepspeed-$DS" && DS_BUILD_OPS=0 "$PY" setup.py -q bdist_wheel -d "$OUT" \
  >"$OUT/build/deepspeed_build.log" 2>&1) || { cat "$OUT/build/deepspeed_build.log"; exit 1; }
rm -rf "$OUT/build"
PY=$PY bash scripts/gpu_hf_engine.sh prepare "$OUT"

bundle=$(du -cb "$OUT" | tail -1 | cut -f1)
tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s}')
ls -l "$OUT"
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "bundle $(mib "$bundle") ($(ls "$OUT"/*.whl | wc -l) wheels, the hf engine's inputs) + tree $(mib "$tree") = $(mib $((bundle + tree))) (limit 64 MiB)"
((bundle + tree < LIMIT)) || { echo "error: over the 64 MiB a GPU call carries" >&2; exit 1; }
