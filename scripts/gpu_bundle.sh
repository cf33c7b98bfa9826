#!/usr/bin/env bash
# Build the wheel folders that scripts/gpu_check.sh installs from on a GPU machine without network.
#
#     scripts/gpu_bundle.sh [OUT]          # default OUT: gpu_bundle/ (git-ignored)
#
# The GPU image holds Python 3.12, torch 2.11 and transformers 5.x. What it lacks or holds in the
# wrong version travels as cp312 / py3 manylinux wheels, at the versions uv.lock pins:
#   OUT/a/  the stack itself: transformers 4.57, peft, bitsandbytes, xtuner, mmengine, DeepSpeed
#           (built here from its sdist: upstream ships no wheel) and llava-moslora
#   OUT/b/  their small pure dependencies the image may lack (addict, yapf, hjson, einops, ...)
#   OUT/c/  heavy dependencies, only with --heavy (opencv, pyarrow, pandas, scipy, ...): needed
#           only where the image lacks them; gpu_check.sh says which it lacks
# Each folder must stay under 64 MiB (one transfer to the GPU machine); the script fails otherwise
# and prints every folder's size. No torch, triton or nvidia-* wheel is ever bundled.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_bundle}
HEAVY=0
[[ "${2:-}" == "--heavy" || "${1:-}" == "--heavy" ]] && HEAVY=1 && [[ "$OUT" == "--heavy" ]] && OUT=gpu_bundle
LIMIT_MIB=64
PIP=(env PIP_FIND_LINKS= python3 -m pip)  # not the machine's local CPU-torch wheel folder
PY=$PWD/.venv/bin/python
[[ -x "$PY" ]] || { echo "error: run \`uv sync --frozen\` first (needs .venv with torch to build DeepSpeed)"; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT/a" "$OUT/b" "$OUT/c" "$OUT/build"
OUT=$(cd "$OUT" && pwd)

# Pinned versions of the closure of the stack, from uv.lock: "name==version group" lines.
"$PY" - "$OUT/build/pins.txt" <<'EOF'
import re, sys, tomllib
lock = {p["name"]: p for p in tomllib.load(open("uv.lock", "rb"))["package"]}
STACK = ["transformers", "peft", "bitsandbytes", "xtuner", "mmengine"]  # deepspeed: built below
SKIP = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|setuptools|numpy|deepspeed)$")
HEAVY = {"opencv-python", "pyarrow", "scipy", "scikit-image", "pandas", "matplotlib", "pillow",
         "hf-xet", "networkx", "imageio", "tifffile", "fonttools", "kiwisolver", "contourpy",
         "lazy-loader", "pygments", "sympy", "mpmath"}
deps = set()
stack = STACK + [d["name"] for d in lock["deepspeed"].get("dependencies", [])]
while stack:
    name = stack.pop()
    if name in deps or SKIP.match(name) or name not in lock:
        continue
    deps.add(name)
    stack += [d["name"] for d in lock[name].get("dependencies", [])]
with open(sys.argv[1], "w") as out:
    for name in sorted(deps):
        group = "a" if name in STACK else "c" if name in HEAVY else "b"
        out.write(f"{name}=={lock[name]['version']} {group}\n")
EOF

download() {  # download DIR SPEC...: cp312 manylinux x86_64 wheels, no dependencies
  local dir=$1; shift
  "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$dir" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any "$@"
}
for group in a b c; do
  [[ $group == c && $HEAVY == 0 ]] && continue
  for spec in $(awk -v g=$group '$2 == g {print $1}' "$OUT/build/pins.txt"); do
    # sdist-only packages (transformers-stream-generator, ...) are pure Python: build their wheel.
    download "$OUT/$group" "$spec" 2>/dev/null ||
      "${PIP[@]}" wheel --quiet --no-deps --wheel-dir "$OUT/$group" "$spec" 2>/dev/null ||
      { echo "error: no wheel for $spec" >&2; exit 1; }
  done
done

# DeepSpeed: sdist only upstream; a pure-Python wheel (ops JIT-built where used) from its sdist.
DS=$(awk '/^name = "deepspeed"/{getline; print $3}' uv.lock | tr -d '"')
"${PIP[@]}" download --quiet --no-deps --no-binary :all: --dest "$OUT/build" "deepspeed==$DS"
tar xzf "$OUT/build/deepspeed-$DS.tar.gz" -C "$OUT/build"
(cd "$OUT/build/deepspeed-$DS" && DS_BUILD_OPS=0 "$PY" setup.py -q bdist_wheel -d "$OUT/a" \
  >"$OUT/build/deepspeed_build.log" 2>&1) || { cat "$OUT/build/deepspeed_build.log"; exit 1; }
# The project itself.
uv build --quiet --wheel --out-dir "$OUT/a" .
rm -rf "$OUT/build"
rmdir "$OUT/c" 2>/dev/null || true

status=0
for dir in "$OUT"/*/; do
  mib=$(du -sm "$dir" | cut -f1)
  echo "$dir: $(ls "$dir" | wc -l) wheels, ${mib} MiB"
  if (( mib > LIMIT_MIB )); then
    echo "error: $dir is over the ${LIMIT_MIB} MiB per-transfer limit" >&2
    status=1
  fi
done
exit $status
