#!/usr/bin/env python
"""Step time and peak memory of `xtuner train` runs, side by side: the table of gpu_check.md.

    python scripts/gpu_report.py WORK A:B [C:D ...] --out benchmarks/results/gpu_check.md

Reads WORK/<run>/<timestamp>/vis_data/scalars.json (mmengine's LocalVisBackend, one JSON line
per logged iteration; the configs log every iteration here): `time` is seconds per iteration,
`memory` mmengine's max_memory_allocated in MiB (CUDA only). The first `--skip` iterations
(start-up, allocator warm-up) are left out of the median time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# MoSLoRA paper, Table 4 (A100, LLaMA-3-8B, LoRA vs MoSLoRA): 8.0 h / 29 GB vs 8.2 h / 31 GB.
PAPER = "paper (Table 4, A100): time 1.025, memory 1.069"


def run_stats(run_dir: Path, skip: int) -> dict[str, float]:
    logs = sorted(run_dir.glob("*/vis_data/scalars.json"))
    if not logs:
        raise FileNotFoundError(f"no */vis_data/scalars.json under {run_dir}: did the run start?")
    rows = [json.loads(line) for line in logs[-1].read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time" in r]
    if not rows:
        raise ValueError(f"{logs[-1]} has no logged iteration")
    times = [r["time"] for r in rows[skip:]] or [r["time"] for r in rows]
    memory = max((r.get("memory", 0) for r in rows), default=0)
    return {"steps": len(rows), "time": statistics.median(times), "memory": memory}


def report(work: Path, pairs: list[tuple[str, str]], skip: int, title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| run | steps | median s/step | peak MiB / GPU |",
        "|---|---|---|---|",
    ]
    ratios = []
    for a, b in pairs:
        stats = {name: run_stats(work / name, skip) for name in (a, b)}
        for name, s in stats.items():
            lines.append(f"| {name} | {s['steps']} | {s['time']:.4f} | {s['memory']:.0f} |")
        time_ratio = stats[a]["time"] / stats[b]["time"]
        mem_ratio = stats[a]["memory"] / stats[b]["memory"] if stats[b]["memory"] else float("nan")
        ratios.append(f"- {a} / {b}: time {time_ratio:.3f}, memory {mem_ratio:.3f}")
    return "\n".join(lines + ["", *ratios, f"- {PAPER}", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="folder holding one work dir per run")
    parser.add_argument("pairs", nargs="+", metavar="A:B", help="run names; ratios are A / B")
    parser.add_argument("--skip", type=int, default=5, help="iterations left out of the median")
    parser.add_argument("--title", default="gpu_check: whole-model step time and peak memory")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs]
    text = report(args.work, pairs, args.skip, args.title)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
