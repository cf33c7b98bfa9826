"""The ablation's answer: per variant mean / std / 95% CI, paired differences against LoRA, a plot.

Written as WORK/ablation.md, WORK/ablation.csv (one row per variant) and WORK/ablation.png (every
seed's score as a dot, the mean with its 95% interval as a bar), from the runs' result.json files.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import stats
from .lr_grid import INTERIOR, TIE_RULE
from .variants import BASELINE, DIRECT_PAIRS

RUNS = "runs.json"  # an `--lr-grid` report's test runs, per seed (`_write_runs`)

CSV_COLUMNS = (
    "variant",
    "n",
    "mean",
    "std",
    "ci95_low",
    "ci95_high",
    "diff_vs_lora",
    "diff_ci95_low",
    "diff_ci95_high",
    "p_paired_t",
    "p_sign_flip",
    "wins",
    "losses",
    "p_paired_t_holm",
    "p_sign_flip_holm",
    "control",
    "diff_vs_control",
    "p_paired_t_vs_control",
    "p_sign_flip_vs_control",
    "p_paired_t_vs_control_holm",
    "p_sign_flip_vs_control_holm",
)
# The columns of CSV_COLUMNS written as they are (names and counts); every other one is a number.
_TEXT_COLUMNS = frozenset({"variant", "n", "wins", "losses", "control"})


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def final_diagnostics(result: dict[str, Any]) -> dict[str, float]:
    """Per tower, the last logged mixer distance and ΔW effective rank of `result`'s run, averaged
    over its module groups: {"llm_erank": .., "llm_distance": .., "vit_erank": ..}; {} when the
    run logged no MixerDiagnosticsHook rows (its train dir is the checkpoint's parent).
    """
    from ..train.diagnostics import read_diagnostics

    try:
        rows = read_diagnostics(Path(result["checkpoint"]).parent)
    except (FileNotFoundError, KeyError):
        return {}
    if not rows:
        return {}
    last = max(row["iter"] for row in rows)
    found: dict[str, list[float]] = {}
    for row in rows:
        if row["iter"] != last:
            continue
        tower = row["group"].split("/")[0]
        for name, key in (("erank", "delta_erank_mean"), ("distance", "distance_mean")):
            if key in row:  # plain LoRA logs no mixer distance
                found.setdefault(f"{tower}_{name}", []).append(float(row[key]))
    return {name: _mean(values) for name, values in found.items()}


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (in first-seen order) with its spread, its paired test vs LoRA and, for
    the first variant of a `DIRECT_PAIRS` pair, its paired test vs the pair's control; every
    p-value also Holm-adjusted over all those comparisons (`_holm`). Plus the mean over seeds of
    each part of the runs' `details` and of their final diagnostics."""
    by_variant: dict[str, dict[int, float]] = {}
    parts: dict[str, dict[str, list[float]]] = {}
    diagnostics: dict[str, dict[str, list[float]]] = {}
    for result in results:
        by_variant.setdefault(result["variant"], {})[int(result["seed"])] = float(result["score"])
        for key, value in (result.get("details") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                parts.setdefault(result["variant"], {}).setdefault(key, []).append(value)
        for key, value in final_diagnostics(result).items():
            diagnostics.setdefault(result["variant"], {}).setdefault(key, []).append(value)
    baseline = by_variant.get(BASELINE)
    rows = []
    for variant, scores in by_variant.items():
        spread = stats.spread([scores[s] for s in sorted(scores)])
        row: dict[str, Any] = {
            "variant": variant,
            "n": spread.n,
            "mean": spread.mean,
            "std": spread.std,
            "ci95_low": spread.ci_low,
            "ci95_high": spread.ci_high,
            "scores": scores,
            "parts": {k: _mean(v) for k, v in parts.get(variant, {}).items()},
            "diagnostics": {k: _mean(v) for k, v in diagnostics.get(variant, {}).items()},
        }
        if baseline is not None and variant != BASELINE and scores.keys() & baseline.keys():
            paired = stats.paired(scores, baseline)
            row.update(
                diff_vs_lora=paired.mean_diff,
                diff_ci95_low=paired.ci_low,
                diff_ci95_high=paired.ci_high,
                p_paired_t=paired.p_ttest,
                p_sign_flip=paired.p_signflip,
                wins=paired.wins,
                losses=paired.losses,
            )
        rows.append(row)
    for variant, control in DIRECT_PAIRS:
        if (
            variant in by_variant
            and by_variant[variant].keys() & by_variant.get(control, {}).keys()
        ):
            paired = stats.paired(by_variant[variant], by_variant[control])
            row = next(r for r in rows if r["variant"] == variant)
            row.update(
                control=control,
                diff_vs_control=paired.mean_diff,
                p_paired_t_vs_control=paired.p_ttest,
                p_sign_flip_vs_control=paired.p_signflip,
                wins_vs_control=paired.wins,
                losses_vs_control=paired.losses,
            )
    _holm(rows)
    return rows


def _holm(rows: list[dict[str, Any]]) -> None:
    """Add `<p>_holm` next to every p-value of `rows`: each test's p-value Holm-adjusted over the
    family of every comparison the report makes (all vs LoRA and the direct pairs), one family per
    test kind (t, sign-flip)."""
    for kind in ("p_paired_t", "p_sign_flip"):
        keys = [(row, key) for row in rows for key in (kind, f"{kind}_vs_control") if key in row]
        adjusted = stats.holm([row[key] for row, key in keys])
        for (row, key), value in zip(keys, adjusted, strict=True):
            row[f"{key}_holm"] = value


def write_report(
    results: Sequence[dict[str, Any]], out_dir: str | Path, *, title: str = "Ablation"
) -> dict[str, Path]:
    """Write ablation.md / .csv / .png under `out_dir`; return their paths."""
    if not results:
        raise ValueError("no finished runs to report: train and evaluate at least one run first")
    out_dir = Path(out_dir)
    rows = summarise(results)
    unit = results[0].get("unit", "score")
    paths = {
        "md": out_dir / "ablation.md",
        "csv": out_dir / "ablation.csv",
        "png": out_dir / "ablation.png",
    }
    _write_csv(rows, paths["csv"])
    lines = [f"# {title}", "", *_comparison(rows, unit)]
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(rows, unit, title, paths["png"])
    return paths


def write_lr_grid_report(
    outcome, out_dir: str | Path, *, title: str = "Ablation"
) -> dict[str, Path]:
    """The `--lr-grid` report (`lr_grid.GridOutcome`): the validation grid with each variant's
    chosen rate, then the comparison at one shared rate and the comparison with every variant at
    its chosen rate. ablation.md, and a .csv / .png per comparison (`_shared_lr`, `_best_lr`)."""
    if not outcome.shared or not outcome.best:
        raise ValueError("no finished runs to report: train and evaluate at least one run first")
    out_dir = Path(out_dir)
    paths = {"md": out_dir / "ablation.md", "runs": out_dir / RUNS}
    rates = sorted({rate for by_rate in outcome.grid.values() for rate in by_rate})
    seeds = ", ".join(map(str, outcome.grid_seeds))
    tests = ", ".join(map(str, outcome.seeds))
    lines = [
        f"# {title}",
        "",
        "## Learning rates: the validation grid",
        "",
        f"Mean validation score per variant and rate on the grid's seeds ({seeds}; the test "
        f"tables below use seeds {tests}: no training is in both), scored on the config's "
        "`heldout_val_path` items, never the test items. A variant whose best rate was at its "
        f"grid's edge got a rate a factor 2 beyond it, at most {outcome.widen} per side (– : not "
        f"run). **Bold**: the rate each variant is run at below; a tie goes to {TIE_RULE}.",
        "",
        "| variant | " + " | ".join(f"lr {rate:g}" for rate in rates) + " | chosen | placed |",
        "|---|" + "---|" * (len(rates) + 2),
    ]
    for variant, by_rate in outcome.grid.items():
        cells = []
        for rate in rates:
            values = by_rate.get(rate) or []
            cell = _fmt(_mean(values)) + (f" (n={len(values)})" if values else "")
            cells.append(f"**{cell}**" if rate == outcome.chosen[variant] else cell)
        lines.append(
            f"| {variant} | " + " | ".join(cells) + f" | {outcome.chosen[variant]:g} "
            f"| {outcome.placement.get(variant, '–')} |"
        )
    edge = [v for v, where in outcome.placement.items() if where != INTERIOR]
    lines += [
        "",
        "Every chosen rate is interior (a worse neighbour on both sides)."
        if not edge
        else "Not interior: " + ", ".join(f"{v} ({outcome.placement[v]})" for v in edge) + ".",
    ]
    _write_runs(outcome, paths["runs"])
    for key, results, heading, rate_of in (
        (
            "shared_lr",
            outcome.shared,
            f"## One shared rate, lr {outcome.shared_lr:g} (as the paper)",
            None,
        ),
        ("best_lr", outcome.best, "## Each variant at its best validation rate", outcome.chosen),
    ):
        rows = summarise(results)
        unit = results[0].get("unit", "score")
        paths[f"csv_{key}"] = out_dir / f"ablation_{key}.csv"
        paths[f"png_{key}"] = out_dir / f"ablation_{key}.png"
        _write_csv(rows, paths[f"csv_{key}"])
        label = "each at its best lr" if rate_of else f"one lr, {outcome.shared_lr:g}"
        _plot(rows, unit, label, paths[f"png_{key}"])  # the md's title is too long for a plot
        lines += ["", heading, "", *_comparison(rows, unit, rate_of)]
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths


def _write_runs(outcome, path: Path) -> None:
    """Every test run's score and parts, with its rate and setting (`shared` / `best`): what
    `summary.py` pools over ranks, without re-reading the run folders."""
    keep = ("variant", "seed", "score", "unit", "details")
    runs = [
        {"setting": setting, "lr": result.get("lr", outcome.shared_lr)}
        | {key: result[key] for key in keep if key in result}
        for setting, results in (("shared", outcome.shared), ("best", outcome.best))
        for result in results
    ]
    path.write_text(json.dumps({"seeds": outcome.seeds, "runs": runs}, indent=1) + "\n")


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    # The md's two mean tables as extra columns: `part_<detail>`, then `diag_<tower>_<measure>`.
    extra = [
        (field, prefix, key)
        for field, prefix in (("parts", "part_"), ("diagnostics", "diag_"))
        for key in _keys(rows, field)
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_COLUMNS, *(prefix + key for _, prefix, key in extra)])
        for row in rows:
            writer.writerow(
                [
                    row.get(column, "–")
                    if column in _TEXT_COLUMNS
                    else _fmt(row.get(column, math.nan), 4)
                    for column in CSV_COLUMNS
                ]
                + [_fmt(row[field].get(key, math.nan), 4) for field, _, key in extra]
            )


def _comparison(
    rows: Sequence[dict[str, Any]], unit: str, rate_of: dict[str, float] | None = None
) -> list[str]:
    """The Markdown of one comparison: the main table (with an `lr` column when `rate_of` gives
    each variant's rate), the sign-flip note, the per-seed scores, the parts and diagnostics."""
    rate = "lr | " if rate_of else ""
    lines = [
        f"Score: {unit} (higher is better); mean ± std over seeds, 95% CI from Student's t. "
        f"Paired columns: per-seed difference to `{BASELINE}` (same seed), its 95% CI, the paired "
        "t-test and the exact sign-flip test p-values, both Holm-adjusted over every comparison of "
        "this table and the direct pairs below (the multiple-comparison correction: read "
        "significance off the Holm columns; the sign-flip test assumes nothing about the "
        "differences' distribution but cannot go below 2 / 2^n before the adjustment, the t-test "
        "assumes them normal), and the seeds won / lost.",
        "",
        f"| variant | {rate}n | mean ± std | 95% CI | Δ vs LoRA | Δ 95% CI | p (t) "
        "| p (sign-flip) | p (t, Holm) | p (sign-flip, Holm) | wins/losses |",
        "|---|" + "---|" * (10 + bool(rate_of)),
    ]
    for row in rows:
        paired = "diff_vs_lora" in row
        lines.append(
            f"| {row['variant']} | "
            + (f"{rate_of[row['variant']]:g} | " if rate_of else "")
            + f"{row['n']} | {_fmt(row['mean'])} ± {_fmt(row['std'])} "
            f"| [{_fmt(row['ci95_low'])}, {_fmt(row['ci95_high'])}] "
            + (
                f"| {row['diff_vs_lora']:+.2f} | [{_fmt(row['diff_ci95_low'])}, "
                f"{_fmt(row['diff_ci95_high'])}] | {_fmt(row['p_paired_t'], 3)} "
                f"| {_fmt(row['p_sign_flip'], 3)} | {_fmt(row['p_paired_t_holm'], 3)} "
                f"| {_fmt(row['p_sign_flip_holm'], 3)} | {row['wins']}/{row['losses']} |"
                if paired
                else "| – | – | – | – | – | – | – |"
            )
        )
    pairs = [row for row in rows if "control" in row]
    if pairs:
        lines += [
            "",
            "Direct pairs (a variant against its own control, same seeds; Holm over the same "
            "family):",
            "",
            "| variant | control | Δ | p (t) | p (sign-flip) | p (t, Holm) | p (sign-flip, Holm) "
            "| wins/losses |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['variant']} | {row['control']} | {row['diff_vs_control']:+.2f} "
            f"| {_fmt(row['p_paired_t_vs_control'], 3)} "
            f"| {_fmt(row['p_sign_flip_vs_control'], 3)} "
            f"| {_fmt(row['p_paired_t_vs_control_holm'], 3)} "
            f"| {_fmt(row['p_sign_flip_vs_control_holm'], 3)} "
            f"| {row['wins_vs_control']}/{row['losses_vs_control']} |"
            for row in pairs
        ]
    if any("diff_vs_lora" in row for row in rows):
        n_min = min(row["n"] for row in rows)
        tests = sum(1 for row in rows if "diff_vs_lora" in row) + len(pairs)
        floor = 2 / 2**n_min
        lines += [
            "",
            f"With {n_min} seed(s) the smallest possible sign-flip p-value is {floor:.3f} (it can "
            "reach 0.05 only with 6 or more seeds per variant); Holm-adjusted over these "
            f"{tests} comparisons, the smallest possible is {min(1.0, tests * floor):.3f}.",
        ]
    lines += [
        "",
        "Per seed:",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in _all_seeds(rows)) + " |",
        "|---|" + "---|" * len(_all_seeds(rows)),
    ]
    for row in rows:
        cells = [_fmt(row["scores"].get(s, math.nan)) for s in _all_seeds(rows)]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    lines += _mean_table(
        rows,
        "parts",
        "Parts of the score, mean over seeds (each run's result.json `details`):",
    )
    lines += _mean_table(
        rows,
        "diagnostics",
        "At the end of training, mean over seeds (MixerDiagnosticsHook): per tower, the effective "
        "rank of ΔW (`erank`) and the mixer's relative distance from its init (`distance`), "
        "averaged over the tower's module groups:",
    )
    return lines


def _keys(rows: Sequence[dict[str, Any]], field: str) -> list[str]:
    """The keys of every row's `field` dict, in first-seen order: the columns of its table."""
    return list(dict.fromkeys(key for row in rows for key in row[field]))


def _mean_table(rows: Sequence[dict[str, Any]], field: str, caption: str) -> list[str]:
    """A Markdown table of each row's `field` dict (columns in first-seen order); [] if empty."""
    columns = _keys(rows, field)
    if not columns:
        return []
    lines = ["", caption, "", "| variant | " + " | ".join(columns) + " |"]
    lines.append("|---|" + "---|" * len(columns))
    for row in rows:
        cells = [_fmt(row[field].get(key, math.nan), 3) for key in columns]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return lines


def _all_seeds(rows: Sequence[dict[str, Any]]) -> list[int]:
    return sorted({seed for row in rows for seed in row["scores"]})


def _plot(rows: Sequence[dict[str, Any]], unit: str, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4.5), dpi=100)
    for x, row in enumerate(rows):
        seeds = sorted(row["scores"])
        ys = [row["scores"][s] for s in seeds]
        jitter = [(i - (len(ys) - 1) / 2) * 0.06 for i in range(len(ys))]
        ax.scatter([x + j for j in jitter], ys, s=18, color="0.45", zorder=3)
        if not math.isnan(row["ci95_low"]):
            ax.errorbar(
                x,
                row["mean"],
                yerr=[[row["mean"] - row["ci95_low"]], [row["ci95_high"] - row["mean"]]],
                fmt="o",
                color="tab:red" if row["variant"] == BASELINE else "tab:blue",
                capsize=6,
                markersize=8,
                zorder=4,
            )
        else:
            ax.plot(x, row["mean"], "o", color="tab:blue", markersize=8)
    ax.set_xticks(range(len(rows)), [row["variant"] for row in rows], rotation=20)
    ax.set_ylabel(unit)
    ax.set_title(f"{title}: each seed (grey), mean and 95% CI")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
