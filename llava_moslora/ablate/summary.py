"""`llava-moslora ablate-report DIR`: one claim, one family, over every `--lr-grid` report in DIR.

A headline such as "no variant differs from LoRA, at rank 8 or 64, at the shared rate or at each
one's own" speaks for every comparison of every table at once, so its multiple-comparison
correction must run over all of them (Holm, `stats.holm`), not over one table's five; the tables
keep their own per-table Holm columns. And "X matches LoRA" is a claim of equality: a t-test that
does not reject says only "no difference detected", so each comparison also gets a paired TOST
against MARGIN, a margin fixed before looking at the data, and the seed count that margin needs
at the observed spread of the paired differences.

DIR holds one folder per setting (`r8/`, `r64/`, each an `ablate --lr-grid` work dir or its
copied report). Per-seed scores come from its `runs.json`; a report written before `runs.json`
existed (benchmarks/results/ablation_pretrained_2026-12-03_old_design/) has them only in
`ablation.md`'s per-seed tables, rounded to 2 decimals: they are read there and snapped back to k / items (DIR's
`pretrained.json` gives the test items per run), then checked against the csv's 4-decimal means.

Written to DIR/summary.md; README and docs/ablation.md cite it instead of retyping its numbers.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import stats
from .lr_grid import CHOICE, INTERIOR, TIE_RULE, choose_rates, placement
from .report import RUNS, summarise
from .variants import BASELINE

SUMMARY = "summary.md"
MARGIN = 3.0  # points of the score: fixed before the data (issue 29), never tuned to them
SETTINGS = {"shared": "shared rate", "best": "own rate"}  # runs.json `setting` -> its label
_CSV = {"shared": "ablation_shared_lr.csv", "best": "ablation_best_lr.csv"}
_SECTIONS = {"shared": "## One shared rate", "best": "## Each variant at its best"}


@dataclass
class Table:
    """One rank's comparison at one setting: per variant, seed -> test score."""

    rank: str
    setting: str
    scores: dict[str, dict[int, float]]
    parts: dict[str, dict[str, float]]  # variant -> the csv's part_* means (fractions)


def _items(root: Path) -> int | None:
    return _record(root).get("spec", {}).get("test_items")


def _per_seed_from_markdown(md: str, setting: str, items: int | None, where: Path) -> dict:
    """The per-seed table of `setting`'s section of an `--lr-grid` ablation.md."""
    start = md.index(_SECTIONS[setting])
    following = [md.find(h, start + 1) for h in _SECTIONS.values()]
    end = min([i for i in following if i > start] or [len(md)])
    section = md[start:end]
    table = section[section.index("Per seed:") :].split("\n\n")[1]
    header, _, *rows = table.strip().splitlines()
    seeds = [int(cell.split()[-1]) for cell in header.strip("|").split("|")[1:]]
    scores: dict[str, dict[int, float]] = {}
    for row in rows:
        variant, *cells = (cell.strip() for cell in row.strip("|").split("|"))
        for seed, cell in zip(seeds, cells, strict=True):
            value = float(cell)
            if items:  # a score is k of `items` in per cent, printed to 2 decimals
                exact = round(value * items / 100) * 100 / items
                if abs(exact - value) > 0.006:
                    raise ValueError(
                        f"{where}: {variant} seed {seed} scores {cell}, not k/{items} of the "
                        "test items; fix or drop pretrained.json's `test_items`"
                    )
                value = exact
            scores.setdefault(variant, {})[seed] = value
    return scores


def read_tables(root: str | Path) -> tuple[list[Table], dict[str, dict[str, Any]]]:
    """Every (rank, setting) table under `root`, and each rank's lr_grid.json."""
    root = Path(root)
    ranks = sorted(
        (path.parent for path in root.glob(f"*/{CHOICE}")),
        key=lambda p: (int(m[0]) if (m := re.search(r"\d+", p.name)) else 0, p.name),
    )
    if not ranks:
        raise FileNotFoundError(
            f"{root} holds no `ablate --lr-grid` report (no */{CHOICE}): pass the folder that "
            "holds the rank folders (e.g. benchmarks/results/ablation_pretrained)"
        )
    tables, grids = [], {}
    for rank in ranks:
        grids[rank.name] = json.loads((rank / CHOICE).read_text())
        runs_path = rank / RUNS
        for setting in SETTINGS:
            if runs_path.is_file():
                scores: dict[str, dict[int, float]] = {}
                for run in json.loads(runs_path.read_text())["runs"]:
                    if run["setting"] == setting:
                        scores.setdefault(run["variant"], {})[int(run["seed"])] = run["score"]
            else:
                md = rank / "ablation.md"
                scores = _per_seed_from_markdown(md.read_text(), setting, _items(root), md)
            with open(rank / _CSV[setting], newline="") as f:
                rows = list(csv.DictReader(f))
            parts = {
                row["variant"]: {
                    key[len("part_") :]: float(value)
                    for key, value in row.items()
                    if key.startswith("part_") and value not in ("", "–")
                }
                for row in rows
            }
            for row in rows:  # the per-seed scores must give the csv's means
                mean = stats.spread(list(scores[row["variant"]].values())).mean
                if abs(mean - float(row["mean"])) > 5e-4:
                    raise ValueError(
                        f"{rank / _CSV[setting]}: {row['variant']}'s mean {row['mean']} is not "
                        f"the mean of its per-seed scores ({mean:.4f}): the report is inconsistent"
                    )
            tables.append(Table(rank.name, setting, scores, parts))
    return tables, grids


def comparisons(tables: Sequence[Table]) -> list[dict[str, Any]]:
    """Every comparison of every table (each variant vs LoRA, and the direct pairs), with its
    per-table Holm p (report.summarise), its p Holm-adjusted over all of them, and its TOST."""
    found = []
    for table in tables:
        results = [
            {"variant": v, "seed": s, "score": x}
            for v, by in table.scores.items()
            for s, x in by.items()
        ]
        for row in summarise(results):
            for suffix, control in (("", BASELINE), ("_vs_control", row.get("control"))):
                if f"p_paired_t{suffix}" not in row:
                    continue
                equal = stats.tost_paired(
                    table.scores[row["variant"]], table.scores[control], MARGIN
                )
                found.append(
                    {
                        "rank": table.rank,
                        "setting": table.setting,
                        "variant": row["variant"],
                        "control": control,
                        "p": row[f"p_paired_t{suffix}"],
                        "p_holm_table": row[f"p_paired_t{suffix}_holm"],
                        "tost": equal,
                    }
                )
    for comparison, adjusted in zip(found, stats.holm([c["p"] for c in found]), strict=True):
        comparison["p_holm_pooled"] = adjusted
    return found


def verdict(comparison: dict[str, Any]) -> str:
    if comparison["p_holm_pooled"] < stats.ALPHA:
        return "different (pooled Holm)"
    if comparison["tost"].equivalent:
        return f"equivalent within ±{MARGIN:g}"
    return "no difference detected; not shown equivalent"


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return f"> {stats.MAX_SEEDS:,}"
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _part_range(tables: Sequence[Table], part: str, settings: Sequence[str]) -> tuple[float, float]:
    values = [
        100 * parts[part]
        for t in tables
        if t.setting in settings
        for parts in t.parts.values()
        if part in parts
    ]
    return min(values), max(values)


def write_summary(root: str | Path) -> Path:
    """DIR/summary.md from the rank folders under DIR (module docstring); returns its path."""
    root = Path(root)
    tables, grids = read_tables(root)
    found = comparisons(tables)
    placed = _placements(grids)
    lines = [
        f"# Pooled summary of {root.name}",
        "",
        f"Generated by `llava-moslora ablate-report {root.name}` from each rank folder's "
        f"{CHOICE}, {RUNS} (or, in a report older than it, ablation.md's per-seed tables) and "
        "csv files: regenerate, do not edit.",
        "",
    ]
    lines += _headline(root, tables, grids, found, placed)
    lines += _design(tables, grids)
    lines += _rates(placed)
    lines += _pooled(tables, found)
    lines += _equivalence(found)
    lines += _parts(tables)
    out = root / SUMMARY
    out.write_text("\n".join(lines) + "\n")
    return out


HEADLINE = "## Headline"


def headline(summary_md: str) -> str:
    """The headline paragraph of a summary.md, whitespace folded: what the README quotes."""
    section = summary_md[summary_md.index(HEADLINE) + len(HEADLINE) :]
    return " ".join(section.split("\n## ", 1)[0].split())


def _headline(
    root: Path,
    tables: Sequence[Table],
    grids: dict[str, dict[str, Any]],
    found: Sequence[dict[str, Any]],
    placed: Sequence[tuple],
) -> list[str]:
    """One paragraph that says what the tables below support, and nothing they do not: the
    README quotes it (tests/test_ablate.py keeps the two equal)."""
    ranks = sorted({t.rank for t in tables}, key=lambda r: (len(r), r))
    seeds = sorted({s for t in tables for by in t.scores.values() for s in by})
    grid_seeds = sorted({s for g in grids.values() for s in g.get("grid_seeds", [])})
    interior = sum(p[-1] == INTERIOR for p in placed)
    smallest = min(found, key=lambda c: c["p_holm_pooled"])
    shown, different = _verdicts(found)
    record = _record(root)
    base = record.get("family_a_test", {}).get("overall")
    low, high = _part_range(tables, "overall", list(SETTINGS))
    old_low, old_high = _part_range(tables, "old_overall", list(SETTINGS))
    design = (
        f"rates chosen on grid seeds {', '.join(map(str, grid_seeds))}, disjoint from the test "
        "seeds"
        if grid_seeds and not set(grid_seeds) & set(seeds)
        else "rates chosen on test seeds as in the old design"
    )
    text = (
        f"Rank{'s' if len(ranks) > 1 else ''} {' and '.join(r.lstrip('r') for r in ranks)}, "
        f"{len(seeds)} test seeds, {design}, "
        f"{interior} of {len(placed)} chosen rates interior; at the paper's shared rate and at "
        f"each variant's own rate, {len(found)} comparisons (each variant vs LoRA, Kaiming vs "
        f"init-only); the new family's score, variant means, {low:.1f}–{high:.1f} %. "
    )
    if different:
        text += (
            f"{len(different)} differ after Holm over all {len(found)}: "
            + "; ".join(
                f"{_label(c).replace(' | ', ' ')} {c['tost'].mean_diff:+.2f} points "
                f"(p {c['p_holm_pooled']:.4f})"
                for c in different
            )
            + ". "
        )
    else:
        text += (
            f"None differs after Holm over all {len(found)} (smallest adjusted p "
            f"{smallest['p_holm_pooled']:.4f}, {_label(smallest).replace(' | ', ' ')}). "
        )
    text += (
        f"Paired TOST against ±{MARGIN:g} points shows equivalence for {len(shown)} of "
        f"{len(found)}"
        + (": " + "; ".join(_label(c).replace(" | ", " ") for c in shown) if shown else "")
        + f'; {len(found) - len(shown) - len(different)} are only "no difference detected"'
        + (
            f" (at their spreads TOST would need {_needed_range(rest)} seeds)"
            if (rest := [c for c in found if c not in shown and c not in different])
            else ""
        )
        + ". Every adapter made the base forget family A: "
        + (f"{100 * base:.1f} % before, " if base is not None else "")
        + f"{old_low:.1f}–{old_high:.1f} % after."
    )
    return [HEADLINE, "", text, ""]


def _record(root: Path) -> dict[str, Any]:
    path = root / "pretrained.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _design(tables: Sequence[Table], grids: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for rank, grid in grids.items():
        tests = sorted(
            {s for t in tables if t.rank == rank for by in t.scores.values() for s in by}
        )
        if "grid_seeds" in grid:
            grid_seeds = grid["grid_seeds"]
        else:  # before issue 29: the grid ran the first n test seeds
            n = max(len(v) for by in grid["grid"].values() for v in by.values())
            grid_seeds = tests[:n]
        shared = sorted(set(grid_seeds) & set(tests))
        lines.append(
            f"* `{rank}`: rates chosen on seeds {', '.join(map(str, grid_seeds))}, tested on "
            f"seeds {', '.join(map(str, tests))}: "
            + (
                "disjoint."
                if not shared
                else f"**old design: the grid's seeds {', '.join(map(str, shared))} are test "
                "seeds** (a run's validation and test scores move together, so the chosen "
                "rate's test mean is favoured on those seeds)."
            )
        )
    return ["## Design", "", *lines, ""]


def _rates(placed: Sequence[tuple]) -> list[str]:
    lines = [
        "## Chosen rates",
        "",
        f"Highest mean validation score; a tie goes to {TIE_RULE}. Placed: interior (a worse "
        "neighbour on both sides), tied with the next rate up, or at the grid's edge.",
        "",
        "| rank | variant | rates tried | chosen | placed |",
        "|---|---|---|---|---|",
    ]
    for rank, variant, rates, chosen, recorded, where in placed:
        note = f" (recorded {recorded:g}: another tie rule)" if recorded != chosen else ""
        lines.append(
            f"| {rank} | {variant} | {', '.join(f'{r:g}' for r in rates)} "
            f"| {chosen:g}{note} | {where} |"
        )
    interior = sum(p[-1] == INTERIOR for p in placed)
    return [*lines, "", f"Interior: {interior} of {len(placed)} choices.", ""]


def _placements(grids: dict[str, dict[str, Any]]) -> list[tuple]:
    """(rank, variant, rates tried, chosen by the tie rule, recorded choice, where it sits)."""
    placed = []
    for rank, record in grids.items():
        grid = {v: {float(r): s for r, s in by.items()} for v, by in record["grid"].items()}
        chosen = choose_rates(grid)
        for variant, by_rate in grid.items():
            where = placement(by_rate, chosen[variant])
            if "widen" not in record and where != INTERIOR:  # before issue 29: no widening
                where = where.replace("widening limit reached", "never widened")
            recorded = float(record["chosen"][variant])
            placed.append((rank, variant, sorted(by_rate), chosen[variant], recorded, where))
    return placed


def _verdicts(found: Sequence[dict[str, Any]]) -> tuple[list, list]:
    """(shown equivalent, different after the pooled correction), each in table order."""
    return (
        [c for c in found if verdict(c).startswith("equivalent")],
        [c for c in found if verdict(c).startswith("different")],
    )


def _label(c: dict[str, Any]) -> str:
    return f"{c['rank']} | {SETTINGS[c['setting']]} | {c['variant']} vs {c['control']}"


def _sign_flip_floor(tables: Sequence[Table], family: int) -> str:
    """Whether the exact sign-flip test could reject at all after Holm over `family` tests."""
    seeds = min(len(by) for t in tables for by in t.scores.values())
    floor = 2 / 2**seeds  # both all-positive and all-negative patterns: the smallest p
    if family * floor >= stats.ALPHA:
        return (
            f"The sign-flip test cannot help: over {seeds} seeds its smallest p is "
            f"2/{2**seeds}, {family} x 2/{2**seeds} >= {stats.ALPHA:g} after the pooled correction."
        )
    return (
        f"Over {seeds} seeds the sign-flip test's smallest p is 2/{2**seeds} (it could reject "
        "after the pooled correction; the per-table reports give it, the t-test is pooled here)."
    )


def _pooled(tables: Sequence[Table], found: Sequence[dict[str, Any]]) -> list[str]:
    smallest = min(found, key=lambda c: c["p_holm_pooled"])
    lines = [
        "## One family for the headline",
        "",
        f"Paired t-test p of every comparison the headline speaks for ({len(found)}: every "
        "rank, both rate settings, each variant vs LoRA and the direct pairs), Holm-adjusted "
        "within its table (as in the rank's report) and over all of them (the headline's "
        f"correction). Smallest pooled Holm p: **{smallest['p_holm_pooled']:.4f}** "
        f"({_label(smallest)}). {_sign_flip_floor(tables, len(found))}",
        "",
        "| rank | rate | comparison | Δ | p (t) | p (Holm, table) | p (Holm, pooled) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in found:
        lines.append(
            f"| {_label(c)} | {c['tost'].mean_diff:+.2f} | {c['p']:.4f} | "
            f"{c['p_holm_table']:.4f} | {c['p_holm_pooled']:.4f} |"
        )
    return [*lines, ""]


def _equivalence(found: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        f"## Equivalence: paired TOST against ±{MARGIN:g} points",
        "",
        f"The margin, ±{MARGIN:g} points of the score, was fixed before these data were looked "
        "at. Equivalent when both one-sided t-tests reject at 5 % (p below), i.e. the 90 % "
        "interval of the paired difference lies inside the margin. *Seeds needed*: the fewest "
        f"seeds for which TOST shows equivalence with {stats.POWER:.0%} chance if the true "
        "difference is 0 and the paired differences spread as observed (exact power, "
        "`stats.tost_power`). A claim that *every* listed variant matches its control is an "
        "intersection of these tests and holds only if each one does (no correction needed).",
        "",
        "| rank | rate | comparison | Δ | SD of Δ | 90 % CI | p (TOST) | seeds needed | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in found:
        e = c["tost"]
        lines.append(
            f"| {_label(c)} | {e.mean_diff:+.2f} | {_fmt(e.std_diff)} "
            f"| [{_fmt(e.ci90_low)}, {_fmt(e.ci90_high)}] | {_fmt(e.p, 4)} "
            f"| {_fmt(e.seeds_needed, 0) if e.seeds_needed is not None else _fmt(None)} "
            f"| {verdict(c)} |"
        )
    shown, different = _verdicts(found)
    lines += [
        "",
        "**What this supports.** "
        + (
            f"Shown equivalent within ±{MARGIN:g} points: "
            + "; ".join(_label(c).replace(" | ", " ") for c in shown)
            + ". "
            if shown
            else f"No comparison is shown equivalent within ±{MARGIN:g} points. "
        )
        + (
            "Different after the pooled correction: "
            + "; ".join(_label(c).replace(" | ", " ") for c in different)
            + ". "
            if different
            else "None differs after the pooled correction. "
        )
        + f"The other {len(found) - len(shown) - len(different)} of {len(found)}: no difference "
        "detected, which is not evidence of equality. At the observed spreads TOST would need "
        + _needed_range(found)
        + " seeds per comparison.",
        "",
    ]
    return lines


def _needed_range(found: Sequence[dict[str, Any]]) -> str:
    needed = [c["tost"].seeds_needed for c in found]
    known = [n for n in needed if n is not None]
    if not known:
        return f"more than {stats.MAX_SEEDS:,}"
    top = f"more than {stats.MAX_SEEDS:,}" if None in needed else str(max(known))
    return f"{min(known)}–{top}"


def _parts(tables: Sequence[Table]) -> list[str]:
    lines = ["## Parts of the score, over every table", ""]
    every = list(SETTINGS)
    if any("old_overall" in p for t in tables for p in t.parts.values()):
        low, high = _part_range(tables, "old_overall", every)
        own_low, own_high = _part_range(tables, "old_overall", ["best"])
        lines.append(
            f"* Family A (the old questions) after adaptation: {low:.1f}–{high:.1f} % over every "
            f"rank, rate and variant ({own_low:.1f}–{own_high:.1f} % at the own rates)."
        )
    # The new family's question kinds, as the runs recorded them (old_* is the old family).
    every_part = {k for t in tables for p in t.parts.values() for k in p}
    for part in sorted(k for k in every_part - {"overall", "chance"} if not k.startswith("old_")):
        low, high = _part_range(tables, part, every)
        lines.append(
            f"* `{part}` accuracy, variant means: {low / 100:.3f}–{high / 100:.3f} over every "
            "rank, rate and variant."
        )
    return [*lines, ""]
