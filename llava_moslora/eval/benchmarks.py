"""The benchmark names, suites and table columns, in one place (no VLMEvalKit import here).

The paper's Table 5 reports 9 benchmarks; VLMEvalKit knows them under these names. The offline
"tiny" suite stands in for some of them with synthetic TSVs (`tiny_bench.py`); `COLUMN_OF` maps
both kinds of name to the Table 5 column they fill, so `report`/`radar` read either kind of run.

Kept free of `vlmeval` imports on purpose: importing VLMEvalKit takes ~50 s on a busy CPU, and
`llava-moslora report` / `radar` only need these tables.
"""

from __future__ import annotations

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

# The paper's benchmarks by their VLMEvalKit names, in the order `--suite paper9` runs them.
PAPER9: tuple[str, ...] = (
    "MMBench_DEV_EN",
    "MMBench_DEV_CN",
    "MMBench_TEST_EN",
    "MMBench_TEST_CN",
    "SEEDBench_IMG",
    "AI2D_TEST",
    "ScienceQA_TEST",
    "TextVQA_VAL",
    "MathVista_MINI",
    "MMVet",
    "MME",
)
# No ground truth is published for these: VLMEvalKit writes the prediction file that the official
# MMBench server scores (https://mmbench.opencompass.org.cn), and refuses to score them locally.
SUBMIT_ONLY: frozenset[str] = frozenset({"MMBench_TEST_EN", "MMBench_TEST_CN"})
# Free-form answers graded by an LLM: scored only with an OpenAI-compatible judge.
NEEDS_JUDGE: frozenset[str] = frozenset({"MathVista_MINI", "MMVet"})
# The judge VLMEvalKit's run.py picks for each of them when none is named.
DEFAULT_JUDGE: dict[str, str] = {"MathVista_MINI": "gpt-4o-mini", "MMVet": "gpt-4-turbo"}

# The offline stand-ins. Names must not be VLMEvalKit benchmark names (a known name with another
# md5 triggers a re-download). "MMBench" in the MCQ names gives them VLMEvalKit's circular scoring;
# "MME" in the yes/no name gives it MME's paired acc + acc+ rating; "TextVQA" in the VQA name gives
# it the VQA score.
TINY_MMBENCH_EN = "TinyShapes_MMBench_EN"
TINY_MMBENCH_CN = "TinyShapes_MMBench_CN"
TINY_MME = "TinyShapes_MME"
TINY_TEXTVQA = "TinyShapes_TextVQA"
TINY: tuple[str, ...] = (TINY_MMBENCH_EN, TINY_MMBENCH_CN, TINY_MME, TINY_TEXTVQA)
# VLMEvalKit dataset class for each offline set (resolved in vlmeval.dataset lazily). build_dataset
# would pick CustomMCQDataset for the MCQ sets too; for the others it would pick CustomVQADataset,
# whose evaluate() raises NotImplementedError, so they are built with the class that scores them.
TINY_CLASS: dict[str, str] = {
    TINY_MMBENCH_EN: "CustomMCQDataset",
    TINY_MMBENCH_CN: "CustomMCQDataset",
    TINY_MME: "ImageYORNDataset",
    TINY_TEXTVQA: "ImageVQADataset",
}
TINY_TYPE: dict[str, str] = {
    TINY_MMBENCH_EN: "MCQ",
    TINY_MMBENCH_CN: "MCQ",
    TINY_MME: "Y/N",
    TINY_TEXTVQA: "VQA",
}

SUITES: dict[str, tuple[str, ...]] = {"paper9": PAPER9, "tiny": TINY}

COLUMN_OF: dict[str, str] = {
    # MMBench's test split has no local score; the table shows dev, as VLMEvalKit can score it.
    "MMBench_DEV_EN": "MMBench EN",
    "MMBench_DEV_CN": "MMBench CN",
    "SEEDBench_IMG": "SEED",
    "AI2D_TEST": "AI2D",
    "ScienceQA_TEST": "SciQA",
    "TextVQA_VAL": "TextVQA",
    "MathVista_MINI": "MathVista",
    "MMVet": "MM-Vet",
    "MME": "MME",
    TINY_MMBENCH_EN: "MMBench EN",
    TINY_MMBENCH_CN: "MMBench CN",
    TINY_MME: "MME",
    TINY_TEXTVQA: "TextVQA",
}
# The benchmarks whose per-ability accuracies feed the radar plot, by language.
MMBENCH_LANGUAGE: dict[str, str] = {
    "MMBench_DEV_EN": "EN",
    "MMBench_DEV_CN": "CN",
    TINY_MMBENCH_EN: "EN",
    TINY_MMBENCH_CN: "CN",
}

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


def resolve_datasets(suite: str, datasets: str | None = None) -> list[str]:
    """The benchmark names to run: the whole `suite`, or the comma-separated subset `datasets`.

    Unknown names are refused with the allowed ones listed, before anything slow happens.
    """
    if suite not in SUITES:
        raise ValueError(f"`--suite` should be one of {sorted(SUITES)}, got {suite!r}.")
    allowed = SUITES[suite]
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


def benchmark_type(name: str) -> str:
    """VLMEvalKit's TYPE of a benchmark ('MCQ', 'Y/N', 'VQA'), offline names included.

    VLMEvalKit's own DATASET_TYPE guesses 'MCQ' for every name it does not know, which would give
    the yes/no and VQA stand-ins the wrong prompt and answer length.
    """
    if name in TINY_TYPE:
        return TINY_TYPE[name]
    from vlmeval.dataset import DATASET_TYPE

    return DATASET_TYPE(name)
