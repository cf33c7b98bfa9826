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
import glob
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava_moslora.moslora.kinds import label_of

from .benchmarks import (
    BENCHMARKS,
    MMBENCH_ABILITIES,
    MMBENCH_SPLITS,
    MME_SCALE,
    TABLE_COLUMNS,
    extra_columns,
    split_row,
)
from .protocol import EXACT_MATCHING, protocol_key
from .runner import SUMMARY_NAME, load_summary

MISSING = "–"  # en dash: never 0
ID_COLUMNS = ("Run", "Config", "Adapter", "Seed", "Scorer")
DIFFERS = "†"  # marks a column whose rows were scored under different protocols


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


def _checked_score(run_dir: str | Path, name: str, score: Any) -> float:
    """`score` as a float; ValueError naming the run and benchmark if it is not a possible score."""
    top = BENCHMARKS[name].top  # MME: raw total, at most 2800
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= top:
        raise ValueError(
            f"{Path(run_dir) / SUMMARY_NAME}: the {name} score is {score!r}, which is not a score "
            f"(should be a number from 0 to {top:g}): the file is damaged or was edited. Score the "
            f"run again with `llava-moslora eval ... --score-only`, or leave {run_dir} out."
        )
    return float(score)


def scored_entries(summary: dict[str, Any], run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Benchmark name -> its entry, for the benchmarks this run scored that have a column.

    An entry that is not a JSON object is refused, naming the file and the entry: a damaged
    results file must never lose a benchmark silently.
    """
    out = {}
    for name, entry in summary.get("benchmarks", {}).items():
        if not isinstance(entry, dict):
            raise ValueError(
                f"{Path(run_dir) / SUMMARY_NAME}: the entry {name!r} is {entry!r}, not an object "
                "(status, score, files ...): the file is damaged or was edited. Score the run "
                f"again with `llava-moslora eval ... --score-only`, or leave {run_dir} out."
            )
        if name not in BENCHMARKS or BENCHMARKS[name].column is None:
            continue
        if entry.get("status") != "scored" or entry.get("score") is None:
            continue
        out[name] = entry
    return out


def run_scores(summary: dict[str, Any], run_dir: str | Path) -> dict[str, float]:
    """Table column -> score on the 0-100 scale, for the benchmarks this run scored.

    A NaN, negative or impossible score (> 100, MME > 2800) is refused, naming `run_dir` and the
    benchmark: a damaged results file must never become a row of the table.
    """
    return {
        BENCHMARKS[name].column: BENCHMARKS[name].table_score(
            _checked_score(run_dir, name, entry["score"])
        )
        for name, entry in scored_entries(summary, run_dir).items()
    }


def _scorer(entry: dict[str, Any]) -> str:
    """Who scored an entry: its protocol's scorer (schema 1 results: the entry's `judge`)."""
    scorer = (entry.get("protocol") or {}).get("scorer") or entry.get("judge")
    if scorer in (None, "exact_matching"):
        return EXACT_MATCHING if scorer else "not recorded"
    return str(scorer)


def _scorer_label(summary: dict[str, Any], entries: dict[str, dict[str, Any]]) -> str:
    """One cell: the scorer most benchmarks had, then each benchmark scored otherwise."""
    by_column = {BENCHMARKS[n].column: _scorer(e) for n, e in entries.items()}
    pending = summary.get("pending") or []
    if not by_column:
        label = MISSING
    else:
        scorers = list(by_column.values())
        common = max(dict.fromkeys(scorers), key=scorers.count)
        others = [f"{column}: {who}" for column, who in by_column.items() if who != common]
        label = "; ".join([common, *others])
    if pending:
        label += f"; pending: {', '.join(pending)}"
    return label


def _cell(text: str) -> str:
    """`text` safe in a Markdown table cell: `|` escaped, line breaks as spaces."""
    return " ".join(str(text).replace("|", "\\|").splitlines())


def _table(run_dirs: Sequence[str | Path]) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The rows, and per row {column: (benchmark name, entry)} for the protocol notes."""
    rows, sources = [], []
    for run_dir in run_dirs:
        summary = load_summary(run_dir)
        manifest = summary.get("manifest") or {}
        entries = scored_entries(summary, run_dir)
        scores = run_scores(summary, run_dir)
        row = {
            "Run": str(summary.get("run") or Path(run_dir).name),
            "Config": Path(manifest["config"]).stem if manifest.get("config") else MISSING,
            "Adapter": _adapter_label(manifest),
            "Seed": MISSING if manifest.get("seed") is None else str(manifest["seed"]),
            "Scorer": _scorer_label(summary, entries),
        }
        for column in (*TABLE_COLUMNS, *extra_columns()):
            row[column] = f"{scores[column]:.1f}" if column in scores else MISSING
        present = [scores[c] for c in TABLE_COLUMNS if c in scores]
        if not present:
            row["Avg"] = MISSING
        else:
            avg = f"{sum(present) / len(present):.1f}"
            row["Avg"] = avg if len(present) == len(TABLE_COLUMNS) else avg + "*"
        row["Avg over"] = f"{len(present)}/{len(TABLE_COLUMNS)}"
        rows.append(row)
        sources.append({BENCHMARKS[n].column: (n, e) for n, e in entries.items()})
    return rows, sources


def table_rows(run_dirs: Sequence[str | Path]) -> list[dict[str, str]]:
    """One row per run: identification columns, the scores, Avg and `Avg over`."""
    return _table(run_dirs)[0]


def chance_row(chance: dict[str, float]) -> dict[str, str]:
    """A table row for a uniform random guesser's scores (Table 5 column -> score)."""
    row = dict.fromkeys(ID_COLUMNS, MISSING) | {"Run": "chance"}
    for column in (*TABLE_COLUMNS, *extra_columns()):
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


def _decoding(protocol: dict[str, Any], name: str) -> str:
    settings = protocol.get("decoding")
    if not isinstance(settings, dict):
        return "decoding not recorded"
    greedy = not settings.get("do_sample") and settings.get("num_beams", 1) == 1
    budget = (
        settings.get("short_max_new_tokens")
        if BENCHMARKS[name].family.short_answer
        else settings.get("max_new_tokens")
    )
    mode = "greedy" if greedy else f"sampling {settings}"
    return f"{mode}, at most {budget} new tokens"


def describe_protocol(name: str, entry: dict[str, Any]) -> str:
    """One line: a score's benchmark file, version, scorer, prompt and decoding."""
    protocol = entry.get("protocol") or {}
    data = protocol.get("data") or {}
    md5 = data.get("md5")
    listed = data.get("listed_md5")
    file_note = f"md5 {md5}" if md5 else "md5 not recorded"
    if md5 and listed and listed != md5:
        file_note += f", not VLMEvalKit's listed {listed}"
    version = protocol.get("vlmevalkit_scoring") or protocol.get("vlmevalkit_inference")
    return (
        f"{name} ({BENCHMARKS[name].version}; {file_note}), "
        f"{BENCHMARKS[name].family.name} scored by {_scorer(entry)}; "
        f"prompt: {protocol.get('prompt') or 'not recorded'}; {_decoding(protocol, name)}"
        + (f"; {version}" if version else "")
    )


def protocol_notes(
    rows: list[dict[str, str]], sources: list[dict[str, Any]], columns: Sequence[str]
) -> tuple[set[str], list[str]]:
    """(columns whose rows differ in protocol, one note line per column with scores)."""
    differing, notes = set(), []
    for column in columns:
        used = [
            (row["Run"], *src[column])
            for row, src in zip(rows, sources, strict=True)
            if column in src
        ]
        if not used:
            continue
        keys = {protocol_key(name, entry.get("protocol")) for _, name, entry in used}
        if len(keys) == 1:
            _, name, entry = used[0]
            notes.append(f"- {column}: {describe_protocol(name, entry)}.")
            continue
        differing.add(column)
        notes.append(f"- {column}{DIFFERS} (rows differ in protocol, not comparable):")
        notes += [
            f"  - {_cell(run)}: {describe_protocol(name, entry)}." for run, name, entry in used
        ]
    return differing, notes


def output_paths(out: str | Path) -> tuple[Path, Path]:
    """OUT.md and OUT.csv. OUT's own suffix is kept (`x.v2` -> x.v2.md), except .md / .csv."""
    out = Path(out)
    if out.suffix in (".md", ".csv"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".md"), out.with_name(out.name + ".csv")


def write_table(
    run_dirs: Sequence[str | Path], out: str | Path, chance: dict[str, float] | None = None
) -> tuple[Path, Path]:
    """Write OUT.md and OUT.csv (Table 5 layout); return their paths. With `chance` (column ->
    a random guesser's score), a last row "chance" shows it next to the runs.

    Columns beyond Table 5's nine (MMBench V1.1 test) appear only when a run has them. Under the
    Markdown table, every column's protocol (file, md5, scorer, prompt, decoding), and a column
    whose rows differ in any of them is marked.
    """
    rows, sources = _table(run_dirs)
    extra = [c for c in extra_columns() if any(row[c] != MISSING for row in rows)]
    columns = [*TABLE_COLUMNS, *extra]
    differing, notes = protocol_notes(rows, sources, columns)
    rows += [chance_row(chance)] if chance else []
    md_path, csv_path = output_paths(out)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    header = [*ID_COLUMNS, *columns, "Avg", "Avg over"]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_header = [*ID_COLUMNS, *columns, "Avg"]
    shown = [c + DIFFERS if c in differing else c for c in md_header]
    lines = [
        "| " + " | ".join(shown) + " |",
        "|"
        + "|".join(["---"] * len(ID_COLUMNS) + ["---:"] * (len(md_header) - len(ID_COLUMNS)))
        + "|",
    ]
    lines += ["| " + " | ".join(_cell(row[c]) for c in md_header) + " |" for row in rows]
    footer = [
        "",
        f"MME: total (perception + cognition) / {MME_SCALE:g}, as in the paper. MMBench EN/CN: "
        "the dev split (v1.0, the paper's comparison point); the V1.1 test split, scored "
        "locally, has columns of its own when run and is not in Avg. "
        f"{MISSING}: not run, or pending (e.g. waiting for a judge).",
    ]
    if any(row["Avg"].endswith("*") for row in rows):
        footer.append(
            "\\* average over the benchmarks present only (see `Avg over` in the CSV); not "
            "comparable with the paper's 9-benchmark average."
        )
    if notes:
        footer += ["", "Protocol of each column:", *notes]
    md_path.write_text("\n".join(lines + footer) + "\n")
    return md_path, csv_path


# ----------------------------------------------------------------------------- radar (Figure 5)
def mmbench_abilities(run_dir: str | Path, split: str = "dev") -> dict[str, dict[str, float]]:
    """{"EN": {"CP": acc, ...}, "CN": {...}} (0-1) from the run's VLMEvalKit *_acc.csv files of
    the MMBench benchmarks whose radar split is `split` ("dev" or "V1.1 test").

    A missing, non-numeric or NaN ability is refused, naming the run and the file: a damaged
    file must not become a point on the plot.
    """
    import pandas as pd

    summary = load_summary(run_dir)
    run_name = summary.get("run") or Path(run_dir).name
    out: dict[str, dict[str, float]] = {}
    for name, entry in scored_entries(summary, run_dir).items():
        radar = BENCHMARKS[name].radar
        if radar is None or radar[1] != split:
            continue
        acc_files = [f for f in entry.get("files", []) if f.endswith("_acc.csv")]
        if not acc_files:
            # The run's name is taken literally: a run named "exp[1]" must not read "exp1"'s files.
            pattern = f"{glob.escape(run_name)}_{glob.escape(name)}_*_acc.csv"
            acc_files = [p.name for p in Path(run_dir).glob(pattern)]
        if not acc_files:
            raise FileNotFoundError(
                f"`RUN_DIR` {str(run_dir)!r}: {name} is scored but its VLMEvalKit *_acc.csv is "
                "missing; re-run `llava-moslora eval ... --score-only`."
            )
        path = Path(run_dir) / sorted(acc_files)[0]
        row = split_row(pd.read_csv(path))
        missing = [abbr for _, abbr, _ in MMBENCH_ABILITIES if abbr not in row]
        if missing:
            raise ValueError(
                f"{name} in {run_dir}: the acc file has no {missing} column(s); the radar needs "
                "all six MMBench L2 abilities (`l2-category` in the TSV)."
            )
        abilities = {}
        for _, abbr, _ in MMBENCH_ABILITIES:
            value = pd.to_numeric(row[abbr], errors="coerce")
            if not (isinstance(value, numbers.Real) and 0 <= value <= 1):
                raise ValueError(
                    f"{path}: ability {abbr} is {row[abbr]}, not an accuracy from 0 to 1: the "
                    f"file is damaged or was edited; re-run `llava-moslora eval ... --score-only` "
                    f"or leave {run_dir} out."
                )
            abilities[abbr] = float(value)
        out[radar[0]] = abilities
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


def draw_radar(
    run_dirs: Sequence[str | Path], out: str | Path, *, split: str = "dev", dpi: int = 100
) -> Path:
    """Figure 5: MMBench's six abilities, EN and CN side by side, runs overlaid, per-axis max=1.

    `split`: "dev" (v1.0, the paper's comparison point) or "v11-test" (V1.1 test), in the titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{Path(d).name}" for d in run_dirs]
    if split not in MMBENCH_SPLITS:
        raise ValueError(f"`split` should be one of {list(MMBENCH_SPLITS)}, got {split!r}.")
    split_label = MMBENCH_SPLITS[split]
    per_run = [mmbench_abilities(d, split_label) for d in run_dirs]
    languages = [lang for lang in ("EN", "CN") if any(lang in r for r in per_run)]
    if not languages:
        raise ValueError(
            f"`RUN_DIR`s hold no scored MMBench run of the {split_label} split (MMBench_DEV_EN/CN "
            "or the tiny stand-ins; MMBench_TEST_EN/CN_V11 with --mmbench-split v11-test): "
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
            ax.set_title(f"MMBench {lang} {split_label}: not run", fontsize=12)
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
        ax.set_title(f"MMBench {lang} ({split_label})", fontsize=13, pad=24)
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
