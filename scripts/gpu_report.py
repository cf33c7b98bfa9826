#!/usr/bin/env python
"""The GPU check's report: every measured peak beside the planner's, the ratios, each phase's time.

    python scripts/gpu_report.py OUT [--elapsed SECONDS]

Reads OUT/blocks/*.json (scripts/bench_blocks.py, one per case), OUT/hf_engine/ (the hf engine's
tiny run there and on the CPU that built the bundle, scripts/gpu_hf_engine.sh) and OUT/phases.tsv
(scripts/gpu_check.sh), writes OUT/gpu_check.md and prints it; its last line summarises. Works on
whatever ran: a phase that failed or was killed leaves its cases out and its row says so.
The Table 4 shape (text-only commonsense LLaMA-3-8B, r16) has its own section: the paper's
figures for it are not LLaVA's and stand beside nothing else.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

GiB = 2**30
# (MoSLoRA case, LoRA case, what the pair is)
PAIRS = [
    ("moslora", "lora", "LLaVA's LLM recipe, bf16"),
    ("qmoslora", "qlora", "QMoSLoRA's recipe, NF4 base"),
]
TABLE4_PAIR = ("table4_moslora", "table4_lora", "Table 4 shape")
# The paper's Table 4 (A100, text-only commonsense LLaMA-3-8B, r16 on q,k,v,up,down, batch 16):
# LoRA 8.0 h / 29 GB, MoSLoRA 8.2 h / 31 GB.
TABLE4_PAPER = (
    "paper, Table 4 (whole run on A100): time 8.2 / 8.0 h = 1.025, memory 31 / 29 GB = 1.069"
)


def read_cases(out: Path) -> dict[str, dict]:
    return {
        path.stem: json.loads(path.read_text()) for path in sorted((out / "blocks").glob("*.json"))
    }


def read_phases(out: Path) -> list[dict[str, str]]:
    path = out / "phases.tsv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GiB:.3f}"


def case_rows(cases: dict[str, dict], names: list[str]) -> list[str]:
    lines = [
        "| case | adapter | DeepSpeed | r | batch x seq | s/step | peak GiB | planned GiB | planned / peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        if name not in cases:
            continue
        c = cases[name]
        peak, planned = c["peak_bytes"], c["planned_bytes"]
        ratio = f"{planned / peak:.3f}" if peak else "-"
        lines.append(
            f"| {name} | {c['adapter']} | {c['deepspeed']} | {c['r']} | {c['batch']} x {c['seq']} "
            f"| {c['median_s']:.4f} | {gib(peak)} | {gib(planned)} | {ratio} |"
        )
    return lines


def ratio_line(cases: dict[str, dict], a: str, b: str, what: str) -> str | None:
    if a not in cases or b not in cases:
        return None
    time = cases[a]["median_s"] / cases[b]["median_s"]
    pa, pb = cases[a]["peak_bytes"], cases[b]["peak_bytes"]
    memory = f"{pa / pb:.3f}" if pa and pb else "- (no peak on CPU)"
    return f"- {a} / {b} ({what}): time {time:.3f}, peak memory {memory}"


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def hf_engine_lines(out: Path) -> tuple[list[str], str | None]:
    """The hf engine's section (each logged loss there beside the CPU's) and its summary part.

    The two are the same run in float32 on two devices; they are not expected to agree to the
    last bit (other kernels, other summation orders), so the report gives the differences."""
    here, cpu = (
        read_log(out / "hf_engine" / "log.jsonl"),
        read_log(out / "hf_engine" / "cpu_log.jsonl"),
    )
    if not here:
        return [], None
    device_file = out / "hf_engine" / "device.txt"
    device = device_file.read_text().strip() if device_file.is_file() else "-"
    by_iter = {line["iter"]: line["loss"] for line in cpu}
    lines = [
        f"## The hf engine: configs/tiny_moslora.py's run on {device}",
        "",
        "The tiny LLaVA trained by `llava-moslora train --engine hf` on this machine's "
        "transformers, float32, beside the same recipe on the CPU that built the bundle.",
        "",
        "| iteration | loss here | loss on the CPU | difference | s / iteration here |",
        "|---|---|---|---|---|",
    ]
    differences = []
    for line in here:
        theirs = by_iter.get(line["iter"])
        diff = None if theirs is None else line["loss"] - theirs
        differences += [] if diff is None else [abs(diff)]
        lines.append(
            f"| {line['iter']} | {line['loss']:.4f} | "
            + ("-" if theirs is None else f"{theirs:.4f}")
            + f" | {'-' if diff is None else f'{diff:+.2e}'} | {line['seconds_per_iter']:.4f} |"
        )
    part = f"hf engine {len(here)} losses logged on {device}"
    if differences:
        part += f", within {max(differences):.1e} of the CPU's"
    return lines, part


def report(out: Path, elapsed: int | None = None) -> str:
    cases = read_cases(out)
    phases = read_phases(out)
    first = next(iter(cases.values()), None)
    device = first["device"] if first else "-"
    lines = [f"# gpu_check: {device}", ""]
    if first:
        v = first["versions"]
        lines += [", ".join(f"{k} {v[k]}" for k in v), ""]
        lines += [
            f"{first['layers']} decoder blocks at hidden {first['hidden']} (no embedding, no "
            "lm_head); median seconds per step; peak = torch.cuda.max_memory_allocated; planned "
            "= llava_moslora.plan's weights, AdamW, DeepSpeed rows + the step simulated on fake "
            "tensors.",
            "",
        ]
    llava = [n for n in ("lora", "moslora", "qlora", "qmoslora", "zero2", "zero3")]
    lines += ["## LLaVA recipes, per block", "", *case_rows(cases, llava), ""]
    lines += [r for r in (ratio_line(cases, *pair) for pair in PAIRS) if r]
    table4 = [TABLE4_PAIR[1], TABLE4_PAIR[0]]
    if any(n in cases for n in table4):
        lines += ["", "## The paper's Table 4 shape (text-only, not LLaVA)", ""]
        lines += case_rows(cases, table4) + [""]
        line = ratio_line(cases, *TABLE4_PAIR)
        lines += [line, f"- {TABLE4_PAPER}"] if line else [f"- {TABLE4_PAPER}"]
    engine, engine_part = hf_engine_lines(out)
    lines += ["", *engine] if engine else []
    lines += ["", "## Phases", "", "| phase | status | exit | seconds |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['status']} | {p['exit']} | {p['seconds']} |" for p in phases]
    within = [
        abs(c["planned_bytes"] / c["peak_bytes"] - 1) for c in cases.values() if c["peak_bytes"]
    ]
    ok = sum(p["status"] == "ok" for p in phases)
    ran = sum(p["status"] != "skipped" for p in phases)
    summary = f"gpu_check: {ok}/{ran} phases ok ({len(phases) - ran} skipped), {len(cases)} cases"
    if elapsed is not None:
        summary += f" in {elapsed} s"
    pair = ratio_line(cases, *PAIRS[0])
    if pair:
        summary += "; MoSLoRA / LoRA " + pair.split(": ", 1)[1]
    if engine_part:
        summary += f"; {engine_part}"
    if within:
        summary += f"; planner within {100 * max(within):.1f} % of every measured peak"
    return "\n".join(lines + ["", summary]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the check's $OUT")
    parser.add_argument("--elapsed", type=int, help="seconds the check has run")
    args = parser.parse_args(argv)
    text = report(args.out, args.elapsed)
    (args.out / "gpu_check.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
