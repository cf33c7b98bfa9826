"""What pinning the numerics costs: the main job's kind of training slice (scripts/numerics_slice.py)
with the machine's own kernels and pinned to AVX2 (scripts/pin_numerics.sh), alternating, in one
run; CPU seconds of the slice itself (imports excluded, one thread), so a loaded machine inflates
both sides alike. Writes benchmarks/results/numerics_pin.md.

    uv run python scripts/bench_numerics.py [--steps 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from llava_moslora.machine import describe_machine

REPO = Path(__file__).resolve().parent.parent
PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")


def slice_seconds(steps: int, pinned: bool) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in PINS}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    source = f'source "{REPO / "scripts" / "pin_numerics.sh"}"; ' if pinned else ""
    command = f'{source}"$PYTHON" "{REPO / "scripts" / "numerics_slice.py"}" --steps {steps} --time'
    out = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[-2], float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "numerics_pin.md"))
    args = parser.parse_args()
    seconds: dict[bool, list[float]] = {False: [], True: []}
    digests: dict[bool, set[str]] = {False: set(), True: set()}
    for _ in range(args.repeats):
        for pinned in (False, True):
            digest, took = slice_seconds(args.steps, pinned)
            seconds[pinned].append(took)
            digests[pinned].add(digest)
    own, pin = (statistics.median(seconds[p]) for p in (False, True))
    lines = [
        "# What pinning the numerics to AVX2 costs (scripts/bench_numerics.py)",
        "",
        f"A {args.steps}-step slice (scripts/numerics_slice.py), {args.repeats} runs each way, "
        "alternating; median CPU seconds of the slice (one thread, imports excluded).",
        "",
        "| kernels | CPU s (median) | runs | distinct results |",
        "|---|---:|---|---:|",
        f"| the machine's own | {own:.2f} | {' '.join(f'{s:.2f}' for s in seconds[False])} | "
        f"{len(digests[False])} |",
        f"| pinned to AVX2 | {pin:.2f} | {' '.join(f'{s:.2f}' for s in seconds[True])} | "
        f"{len(digests[True])} |",
        "",
        f"pinned / own: **{pin / own:.3f}**; the two kernels' results "
        + (
            "agree bit for bit (this machine has nothing wider than AVX2)."
            if digests[False] == digests[True]
            else "differ (as expected where AVX512 exists)."
        ),
        "",
        "Machine (unpinned):",
        describe_machine(),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
