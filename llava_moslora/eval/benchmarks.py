"""The benchmarks, in one table: each entry names its family, its Table 5 column and scale, its
radar split and its protocol labels (no VLMEvalKit import here).

    BENCHMARKS["MME"]  -> Benchmark(family=YES_NO_PAIRS, column="MME", scale=28, ...)

A family says how a benchmark is asked and scored: circular multiple choice (MMBench), plain
multiple choice (SEED, AI2D, SciQA), yes/no pairs (MME), short answers (TextVQA) or free answers
graded by an LLM judge (MathVista, MM-Vet). The runner, the model class and the report read the
family and the entry, never substrings of the name: adding a benchmark is one `Benchmark(...)`
entry here (plus, for a family of its own, one `Family` with its headline function) and its name
in a suite file of the top-level `eval/suites/` folder (eval/README.md has the recipe).

The suites (`paper9`, `tiny`) are data: one benchmark name per line in `eval/suites/NAME.txt`.

Kept free of `vlmeval` imports on purpose: importing VLMEvalKit takes ~50 s on a busy CPU, and
`llava-moslora report` / `radar` only need this table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The top-level eval/ folder of the repository (beside llava_moslora/, configs/, tests/).
EVAL_DIR = Path(__file__).resolve().parents[2] / "eval"
SUITES_DIR = EVAL_DIR / "suites"

# Table 5's columns, in the paper's order. MME is reported as its total (perception + cognition,
# out of 2800) divided by 28 so that it sits on the 0-100 scale of the others (paper §4.2).
TABLE_COLUMNS: tuple[str, ...] = (
    "MMBench EN",
    "MMBench CN",
    "SEED",
    "AI2D",
    "SciQA",
    "TextVQA",
    "MathVista",
    "MM-Vet",
    "MME",
)
MME_SCALE = 28.0  # 2800 / 100

# The radar's MMBench splits: the option's value -> the split in the entries' `radar`.
MMBENCH_SPLITS: dict[str, str] = {"dev": "dev", "v11-test": "V1.1 test"}

# The judge VLMEvalKit's run.py picks for each judged benchmark when none is named.
DEFAULT_JUDGE: dict[str, str] = {"MathVista_MINI": "gpt-4o-mini", "MMVet": "gpt-4-turbo"}

# MMBench's six L2 abilities: the `l2-category` value in the TSV -> the column VLMEvalKit's
# report_acc writes in *_acc.csv (its MMB_abbrs) -> the label on the radar plot.
MMBENCH_ABILITIES: tuple[tuple[str, str, str], ...] = (
    ("coarse_perception", "CP", "Coarse\nPerception"),
    (
        "finegrained_perception (instance-level)",
        "FP-S",
        "Fine-grained Perception\n(Single-instance)",
    ),
    (
        "finegrained_perception (cross-instance)",
        "FP-C",
        "Fine-grained Perception\n(Cross-instance)",
    ),
    ("attribute_reasoning", "AR", "Attribute\nReasoning"),
    ("relation_reasoning", "RR", "Relation\nReasoning"),
    ("logic_reasoning", "LR", "Logic\nReasoning"),
)


# ----------------------------------------------------------------------------- headline numbers
def split_row(frame):
    """The one row of an *_acc table that holds the overall split (dev/test/none)."""
    if "split" in frame and len(frame) > 1:
        for split in ("dev", "test", "val", "none"):
            rows = frame[frame["split"] == split]
            if len(rows):
                return rows.iloc[0]
    return frame.iloc[0]


def _mcq_headline(result) -> dict[str, Any]:
    row = split_row(result)
    abilities = {abbr: 100 * float(row[abbr]) for _, abbr, _ in MMBENCH_ABILITIES if abbr in row}
    out: dict[str, Any] = {"score": 100 * float(row["Overall"]), "unit": "%"}
    if abilities:
        out["abilities"] = abilities
    return out


def _yes_no_pairs_headline(result) -> dict[str, Any]:
    row = result.iloc[0]
    perception = float(row.get("perception", 0.0))
    reasoning = float(row.get("reasoning", 0.0))
    categories = {c: float(row[c]) for c in result.columns if c not in ("perception", "reasoning")}
    return {
        "score": perception + reasoning,
        "unit": "MME total (perception + cognition, max 2800)",
        "perception": perception,
        "cognition": reasoning,
        "categories": categories,
    }


def _short_answer_headline(result) -> dict[str, Any]:
    return {"score": float(result.iloc[0]["Overall"]), "unit": "%"}


def _judged_headline(result) -> dict[str, Any]:
    """MathVista's and MM-Vet's score tables: the `Overall` row's acc."""
    key = "Task&Skill" if "Task&Skill" in result.columns else "Category"
    return {"score": float(result[result[key] == "Overall"].iloc[0]["acc"]), "unit": "%"}


@dataclass(frozen=True)
class Family:
    """How a kind of benchmark is asked and scored.

    `vlm_type` is VLMEvalKit's TYPE ('MCQ', 'Y/N', 'VQA'); `short_answer`: the model asks with
    LLaVA-1.5's own prompt and a short token budget (a letter, yes/no, a word); `needs_judge`:
    only an LLM judge scores it; `headline` turns what `dataset.evaluate` returned (a DataFrame)
    into the summary's numbers ({"score": ..., "unit": ..., extras}).
    """

    name: str
    vlm_type: str
    short_answer: bool
    needs_judge: bool
    headline: Callable[[Any], dict[str, Any]]


CIRCULAR_MCQ = Family("circular multiple choice", "MCQ", True, False, _mcq_headline)
MCQ = Family("multiple choice", "MCQ", True, False, _mcq_headline)
YES_NO_PAIRS = Family("yes/no pairs", "Y/N", True, False, _yes_no_pairs_headline)
SHORT_ANSWER = Family("short answer", "VQA", True, False, _short_answer_headline)
JUDGED = Family("judged free answer", "VQA", False, True, _judged_headline)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its VLMEvalKit name, family, Table 5 column and what labels its protocol.

    `scale`: the raw score divided by it sits on Table 5's 0-100 scale (MME: /28); `top`: the
    highest raw score possible. `radar`: (language, split) when the run's per-ability accuracies
    feed the MMBench radar. `version`: which release/split of the data it is, shown in the
    results. `vlmeval_class`: VLMEvalKit's class for a name VLMEvalKit does not know (the offline
    stand-ins), else None (`build_dataset` picks it). `ocr_prompt`: LLaVA-1.5's evaluation asks
    it with reference OCR tokens (TextVQA), available as an option.
    """

    name: str
    family: Family
    column: str | None
    version: str
    scale: float = 1.0
    radar: tuple[str, str] | None = None
    vlmeval_class: str | None = None
    ocr_prompt: bool = False

    @property
    def top(self) -> float:
        return 100.0 * self.scale

    def table_score(self, raw: float) -> float:
        return raw / self.scale


_ENTRIES = (
    Benchmark("MMBench_DEV_EN", CIRCULAR_MCQ, "MMBench EN", "MMBench v1.0 dev", radar=("EN", "dev")),
    Benchmark("MMBench_DEV_CN", CIRCULAR_MCQ, "MMBench CN", "MMBench v1.0 dev", radar=("CN", "dev")),
    # Public with answers since the MMBench server closed (2026-03-31): VLMEvalKit scores it here.
    Benchmark(
        "MMBench_TEST_EN_V11", CIRCULAR_MCQ, "MMBench EN V1.1 test", "MMBench V1.1 test",
        radar=("EN", "V1.1 test"),
    ),
    Benchmark(
        "MMBench_TEST_CN_V11", CIRCULAR_MCQ, "MMBench CN V1.1 test", "MMBench V1.1 test",
        radar=("CN", "V1.1 test"),
    ),
    Benchmark("SEEDBench_IMG", MCQ, "SEED", "SEED-Bench image"),
    Benchmark("AI2D_TEST", MCQ, "AI2D", "AI2D test"),
    Benchmark("ScienceQA_TEST", MCQ, "SciQA", "ScienceQA test (image)"),
    Benchmark("TextVQA_VAL", SHORT_ANSWER, "TextVQA", "TextVQA 0.5.1 val", ocr_prompt=True),
    Benchmark("MathVista_MINI", JUDGED, "MathVista", "MathVista testmini"),
    Benchmark("MMVet", JUDGED, "MM-Vet", "MM-Vet"),
    Benchmark("MME", YES_NO_PAIRS, "MME", "MME", scale=MME_SCALE),
    # The offline stand-ins (tiny_bench.py). Names VLMEvalKit does not know (it has no md5 or
    # URL for them, so nothing to check or fetch); "MMBench" in the MCQ names gives them VLMEvalKit's
    # circular scoring, "TextVQA" in the VQA name the VQA score. build_dataset would pick
    # CustomVQADataset for the last two, whose evaluate() raises NotImplementedError.
    Benchmark(
        "TinyShapes_MMBench_EN", CIRCULAR_MCQ, "MMBench EN", "TinyShapes (synthetic)",
        radar=("EN", "dev"), vlmeval_class="CustomMCQDataset",
    ),
    Benchmark(
        "TinyShapes_MMBench_CN", CIRCULAR_MCQ, "MMBench CN", "TinyShapes (synthetic)",
        radar=("CN", "dev"), vlmeval_class="CustomMCQDataset",
    ),
    Benchmark(
        "TinyShapes_MME", YES_NO_PAIRS, "MME", "TinyShapes (synthetic)", scale=MME_SCALE,
        vlmeval_class="ImageYORNDataset",
    ),
    Benchmark(
        "TinyShapes_TextVQA", SHORT_ANSWER, "TextVQA", "TinyShapes (synthetic)",
        vlmeval_class="ImageVQADataset",
    ),
)  # fmt: skip
BENCHMARKS: dict[str, Benchmark] = {entry.name: entry for entry in _ENTRIES}


def extra_columns() -> tuple[str, ...]:
    """The columns of entries outside Table 5's nine (MMBench V1.1 test, which is not the v1.0
    split the paper and LLaVA report, and any benchmark added since), in entry order: shown
    beside the nine when a run has them, never part of their average."""
    columns = (entry.column for entry in BENCHMARKS.values() if entry.column)
    return tuple(dict.fromkeys(c for c in columns if c not in TABLE_COLUMNS))


TINY_MMBENCH_EN = "TinyShapes_MMBench_EN"
TINY_MMBENCH_CN = "TinyShapes_MMBench_CN"
TINY_MME = "TinyShapes_MME"
TINY_TEXTVQA = "TinyShapes_TextVQA"
TINY: tuple[str, ...] = (TINY_MMBENCH_EN, TINY_MMBENCH_CN, TINY_MME, TINY_TEXTVQA)
# VLMEvalKit TYPE of each offline set (its DATASET_TYPE guesses 'MCQ' for names it does not know).
TINY_TYPE: dict[str, str] = {name: BENCHMARKS[name].family.vlm_type for name in TINY}


def benchmark(name: str, table: Mapping[str, Benchmark] | None = None) -> Benchmark:
    """The entry of `name`; ValueError listing the known names if there is none."""
    table = BENCHMARKS if table is None else table
    if name not in table:
        raise ValueError(
            f"benchmark {name!r} has no entry in llava_moslora/eval/benchmarks.py; known: "
            f"{', '.join(table)} (eval/README.md says how to add one)."
        )
    return table[name]


def column_of(name: str) -> str | None:
    """The table column a benchmark fills (None for names this version does not know)."""
    entry = BENCHMARKS.get(name)
    return entry.column if entry else None


# ----------------------------------------------------------------------------- suites (data)
def suite_names(suites_dir: Path | None = None) -> list[str]:
    """The suites: the `*.txt` files of eval/suites/, by stem."""
    return sorted(p.stem for p in (suites_dir or SUITES_DIR).glob("*.txt"))


def read_suite(name: str, suites_dir: Path | None = None) -> tuple[str, ...]:
    """The benchmark names of suite `name`: one per line of eval/suites/NAME.txt (`#` comments).

    Every name must have an entry in BENCHMARKS: a typo in the file is an error naming the file
    and the line, not a benchmark silently left out.
    """
    suites_dir = suites_dir or SUITES_DIR
    path = suites_dir / f"{name}.txt"
    if not path.is_file():
        known = suite_names(suites_dir)
        raise ValueError(f"`--suite` should be one of {known}, got {name!r}.")
    names = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if text not in BENCHMARKS:
            raise ValueError(
                f"{path}:{number}: {text!r} is not a known benchmark; use a name of "
                "llava_moslora/eval/benchmarks.py's BENCHMARKS (or add its entry there)."
            )
        names.append(text)
    return tuple(dict.fromkeys(names))


def resolve_datasets(suite: str, datasets: str | None = None) -> list[str]:
    """The benchmark names to run: the whole `suite`, or the comma-separated subset `datasets`.

    Unknown names are refused with the allowed ones listed, before anything slow happens.
    """
    allowed = read_suite(suite)
    if datasets is None:
        return list(allowed)
    names = [name.strip() for name in datasets.split(",") if name.strip()]
    if not names:
        raise ValueError(f"`--datasets` is empty; choose from {', '.join(allowed)}.")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(
            f"`--datasets` has {', '.join(map(repr, unknown))}, not in suite {suite!r}; "
            f"choose from {', '.join(allowed)}."
        )
    return list(dict.fromkeys(names))


def benchmark_type(name: str | None) -> str | None:
    """VLMEvalKit's TYPE of a benchmark ('MCQ', 'Y/N', 'VQA') from its family; None if unknown."""
    entry = BENCHMARKS.get(name) if name else None
    return entry.family.vlm_type if entry else None
