"""Table 5 (Markdown + CSV) and Figure 5 (MMBench ability radar) from `llava-moslora eval` runs.

Reads each run's `llava_moslora_results.json` (and, for the radar, VLMEvalKit's MMBench
`*_acc.csv`, whose columns CP, FP-S, FP-C, AR, RR, LR are the six L2 abilities). No VLMEvalKit
import: a report is instant.

Table 5 conventions (paper §4.2): MME is its total (perception + cognition) / 28, so every column
is on a 0-100 scale; Avg is the mean of the nine columns. A score that is missing or pending is
shown as "–", never as 0, and a row missing any column gets its Avg over the columns it has,
marked with "*" (and the CSV's `Avg over` says how many).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava_moslora.moslora.kinds import label_of

from .benchmarks import COLUMN_OF, MMBENCH_ABILITIES, MMBENCH_LANGUAGE, MME_SCALE, TABLE_COLUMNS
from .runner import SUMMARY_NAME, load_summary

MISSING = "–"  # en dash: never 0
ID_COLUMNS = ("Run", "Config", "Adapter", "Seed", "Judge")


def _adapter_label(manifest: dict[str, Any]) -> str:
    """A short adapter description from the manifest's `adapter_kind` / `mixer` fields."""
    kind = manifest.get("adapter_kind")
    if isinstance(kind, dict):
        parts = [f"{tower}: {label_of(value)}" for tower, value in kind.items()]
        label = "; ".join(parts) if parts else MISSING
    else:
        label = str(label_of(kind)) if kind else MISSING
    if manifest.get("quantized_base"):
        label += " (4-bit base)"
    return label


def _checked_score(run_dir: str | Path, name: str, column: str, score: Any) -> float:
    """`score` as a float; ValueError naming the run and benchmark if it is not a possible score."""
    top = 100 * MME_SCALE if column == "MME" else 100.0  # MME: raw total, at most 2800
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= top:
        raise ValueError(
            f"{Path(run_dir) / SUMMARY_NAME}: the {name} score is {score!r}, which is not a score "
            f"(should be a number from 0 to {top:g}): the file is damaged or was edited. Score the "
            f"run again with `llava-moslora eval ... --score-only`, or leave {run_dir} out."
        )
    return float(score)


def run_scores(summary: dict[str, Any], run_dir: str | Path) -> dict[str, float]:
    """Table 5 column -> score on the 0-100 scale, for the benchmarks this run scored.

    A NaN, negative or impossible score (> 100, MME > 2800) is refused, naming `run_dir` and the
    benchmark: a damaged results file must never become a row of the table.
    """
    scores: dict[str, float] = {}
    for name, entry in summary.get("benchmarks", {}).items():
        column = COLUMN_OF.get(name)
        if column is None or not isinstance(entry, dict) or entry.get("status") != "scored":
            continue
        if entry.get("score") is None:
            continue
        score = _checked_score(run_dir, name, column, entry["score"])
        scores[column] = score / MME_SCALE if column == "MME" else score
    return scores


def _judge_label(summary: dict[str, Any]) -> str:
    judge = summary.get("judge")
    pending = summary.get("pending") or []
    label = judge["model"] if judge else "none (exact matching)"
    if pending:
        label += f"; pending: {', '.join(pending)}"
    return label


def table_rows(run_dirs: Sequence[str | Path]) -> list[dict[str, str]]:
    """One row per run: identification columns, the nine scores, Avg and `Avg over`."""
    rows = []
    for run_dir in run_dirs:
        summary = load_summary(run_dir)
        manifest = summary.get("manifest") or {}
        scores = run_scores(summary, run_dir)
        row = {
            "Run": summary.get("run") or Path(run_dir).name,
            "Config": Path(manifest["config"]).stem if manifest.get("config") else MISSING,
            "Adapter": _adapter_label(manifest),
            "Seed": MISSING if manifest.get("seed") is None else str(manifest["seed"]),
            "Judge": _judge_label(summary),
        }
        for column in TABLE_COLUMNS:
            row[column] = f"{scores[column]:.1f}" if column in scores else MISSING
        present = [scores[c] for c in TABLE_COLUMNS if c in scores]
        if not present:
            row["Avg"] = MISSING
        else:
            avg = f"{sum(present) / len(present):.1f}"
            row["Avg"] = avg if len(present) == len(TABLE_COLUMNS) else avg + "*"
        row["Avg over"] = f"{len(present)}/{len(TABLE_COLUMNS)}"
        rows.append(row)
    return rows


def chance_row(chance: dict[str, float]) -> dict[str, str]:
    """A table row for a uniform random guesser's scores (Table 5 column -> score)."""
    row = dict.fromkeys(ID_COLUMNS, MISSING) | {"Run": "chance"}
    for column in TABLE_COLUMNS:
        row[column] = f"{chance[column]:.1f}" if column in chance else MISSING
    row["Avg"], row["Avg over"] = MISSING, MISSING
    return row


def versus_chance(run_dirs: Sequence[str | Path], chance: dict[str, float]) -> list[str]:
    """One plain line per run: each score it has, next to chance and as a multiple of it."""
    lines = []
    for run_dir in run_dirs:
        summary = load_summary(run_dir)
        scores = run_scores(summary, run_dir)
        parts = [
            f"{column} {scores[column]:.1f} (chance {chance[column]:.1f}, "
            f"{scores[column] / chance[column]:.1f}x)"
            for column in TABLE_COLUMNS
            if column in scores and column in chance
        ]
        lines.append(f"{summary.get('run') or Path(run_dir).name}: " + "; ".join(parts))
    return lines


def write_table(
    run_dirs: Sequence[str | Path], out: str | Path, chance: dict[str, float] | None = None
) -> tuple[Path, Path]:
    """Write OUT.md and OUT.csv (Table 5 layout); return their paths. With `chance` (column ->
    a random guesser's score), a last row "chance" shows it next to the runs."""
    rows = table_rows(run_dirs) + ([chance_row(chance)] if chance else [])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = [*ID_COLUMNS, *TABLE_COLUMNS, "Avg", "Avg over"]
    csv_path = out.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    md_header = [*ID_COLUMNS, *TABLE_COLUMNS, "Avg"]
    lines = [
        "| " + " | ".join(md_header) + " |",
        "|"
        + "|".join(["---"] * len(ID_COLUMNS) + ["---:"] * (len(md_header) - len(ID_COLUMNS)))
        + "|",
    ]
    lines += ["| " + " | ".join(row[c] for c in md_header) + " |" for row in rows]
    notes = [
        "",
        f"MME: total (perception + cognition) / {MME_SCALE:g}, as in the paper. MMBench EN/CN: "
        "dev split (the test split is scored only by the official server). "
        f"{MISSING}: not run, or pending (e.g. waiting for a judge).",
    ]
    if any(row["Avg"].endswith("*") for row in rows):
        notes.append(
            "\\* average over the benchmarks present only (see `Avg over` in the CSV); not "
            "comparable with the paper's 9-benchmark average."
        )
    md_path = out.with_suffix(".md")
    md_path.write_text("\n".join(lines + notes) + "\n")
    return md_path, csv_path


# ----------------------------------------------------------------------------- radar (Figure 5)
def mmbench_abilities(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """{"EN": {"CP": acc, ...}, "CN": {...}} from the run's MMBench *_acc.csv files (0-1)."""
    import pandas as pd

    summary = load_summary(run_dir)
    run_name = summary.get("run") or Path(run_dir).name
    out: dict[str, dict[str, float]] = {}
    for name, entry in summary.get("benchmarks", {}).items():
        language = MMBENCH_LANGUAGE.get(name)
        if language is None or entry.get("status") != "scored":
            continue
        acc_files = [f for f in entry.get("files", []) if f.endswith("_acc.csv")]
        if not acc_files:
            acc_files = [p.name for p in Path(run_dir).glob(f"{run_name}_{name}_*_acc.csv")]
        if not acc_files:
            raise FileNotFoundError(
                f"`RUN_DIR` {str(run_dir)!r}: {name} is scored but its VLMEvalKit *_acc.csv is "
                "missing; re-run `llava-moslora eval ... --score-only`."
            )
        frame = pd.read_csv(Path(run_dir) / sorted(acc_files)[0])
        if "split" in frame and len(frame) > 1:
            frame = frame[frame["split"].isin(["dev", "none"])]
        row = frame.iloc[0]
        missing = [abbr for _, abbr, _ in MMBENCH_ABILITIES if abbr not in row]
        if missing:
            raise ValueError(
                f"{name} in {run_dir}: the acc file has no {missing} column(s); the radar needs "
                "all six MMBench L2 abilities (`l2-category` in the TSV)."
            )
        out[language] = {abbr: float(row[abbr]) for _, abbr, _ in MMBENCH_ABILITIES}
    return out


def normalise(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per ability, divide every run's accuracy by the best run's (the best run touches 1.0).

    The paper's Figure 5 says only "normalized"; its radial ticks (0.82 ... 1.00) fit this
    per-axis max normalisation, which is what we use. An ability every run scores 0 stays 0.
    """
    out = {}
    for axis, accs in values.items():
        top = max(accs)
        out[axis] = [acc / top if top > 0 else 0.0 for acc in accs]
    return out


def draw_radar(run_dirs: Sequence[str | Path], out: str | Path, *, dpi: int = 100) -> Path:
    """Figure 5: MMBench's six abilities, EN and CN side by side, runs overlaid, per-axis max=1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{Path(d).name}" for d in run_dirs]
    per_run = [mmbench_abilities(d) for d in run_dirs]
    languages = [lang for lang in ("EN", "CN") if any(lang in r for r in per_run)]
    if not languages:
        raise ValueError(
            "`RUN_DIR`s hold no scored MMBench run (MMBench_DEV_EN/CN or the tiny stand-ins): "
            "nothing to plot."
        )
    abbrs = [abbr for _, abbr, _ in MMBENCH_ABILITIES]
    names = [label for _, _, label in MMBENCH_ABILITIES]
    angles = [2 * math.pi * i / len(abbrs) for i in range(len(abbrs))]

    fig, axes = plt.subplots(
        1, 2, figsize=(12, 6), subplot_kw={"projection": "polar"}, constrained_layout=True
    )
    for ax, lang in zip(axes, ("EN", "CN"), strict=True):
        if lang not in languages:
            ax.set_axis_off()
            ax.set_title(f"MMBench {lang}: not run", fontsize=12)
            continue
        runs = [(label, r[lang]) for label, r in zip(labels, per_run, strict=True) if lang in r]
        norm = normalise({a: [acc[a] for _, acc in runs] for a in abbrs})
        low = min(min(v) for v in norm.values())
        floor = max(0.0, math.floor((low - 0.05) * 10) / 10) if low > 0 else 0.0
        for i, (label, _) in enumerate(runs):
            values = [norm[a][i] for a in abbrs]
            ax.plot(angles + angles[:1], values + values[:1], linewidth=2, label=label)
            ax.fill(angles + angles[:1], values + values[:1], alpha=0.12)
        ax.set_xticks(angles)
        ax.set_xticklabels(names, fontsize=9)
        ax.tick_params(axis="x", pad=10)  # keep the labels off the outer ring
        ax.set_ylim(floor, 1.0)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(f"MMBench {lang}", fontsize=13, pad=24)
    handles, legend_labels = next(
        ax.get_legend_handles_labels() for ax in axes if ax.get_legend_handles_labels()[0]
    )
    fig.legend(handles, legend_labels, loc="lower center", ncol=min(4, len(legend_labels)))
    fig.suptitle("MMBench abilities, normalised per axis by the best run (1.0 = best)", fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
