"""Running benchmarks through VLMEvalKit's own code and writing the run's summary JSON.

For each benchmark: `vlmeval.dataset.build_dataset` (or, for the offline stand-ins, the VLMEvalKit
class that scores them), `vlmeval.inference.infer_data_job` (resumable; writes
`<run>_<benchmark>.xlsx`, the prediction file), then `dataset.evaluate` (VLMEvalKit's scoring:
`*_acc.csv` for multiple choice, `*_score.csv` for MME / MM-Vet / MathVista). This mirrors what
`vlmeval/run.py` does, which only accepts registered model names.

    WORK_DIR/RUN/RUN_<benchmark>.xlsx          predictions (MMBench test: the file to submit)
    WORK_DIR/RUN/RUN_<benchmark>_*_acc.csv ... VLMEvalKit's scores
    WORK_DIR/RUN/llava_moslora_results.json    the summary `report` and `radar` read

A benchmark graded by an LLM judge (MathVista, MM-Vet) without a judge configured gets its
predictions and the status "pending"; `--score-only` later scores the saved predictions.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..jsonfile import CorruptJSONError, read_json_object
from .benchmarks import (
    COLUMN_OF,
    DEFAULT_JUDGE,
    MMBENCH_ABILITIES,
    NEEDS_JUDGE,
    SUBMIT_ONLY,
    TINY_CLASS,
    benchmark_type,
)
from .manifest import recorded_fields

SUMMARY_NAME = "llava_moslora_results.json"
SCHEMA_VERSION = 1
MCQ_JUDGE = "gpt-4o-mini"  # run.py's choice extractor for MCQ / yes-no when a judge is available


@dataclass(frozen=True)
class Judge:
    """An OpenAI-compatible judge. The key stays in the environment, never in files."""

    model: str | None  # None: VLMEvalKit's default judge per benchmark
    base_url: str | None
    api_key_env: str

    def model_for(self, benchmark: str) -> str:
        if self.model:
            return self.model
        return DEFAULT_JUDGE.get(benchmark, MCQ_JUDGE)

    def kwargs_for(self, benchmark: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model_for(benchmark),
            "key": os.environ[self.api_key_env],
        }
        if self.base_url:
            # As run.py's --judge-base-url: the OpenAI-compatible root, chat endpoint appended.
            kwargs["api_base"] = f"{self.base_url.rstrip('/')}/chat/completions"
        return kwargs

    def record(self) -> dict[str, Any]:
        base = self.base_url or os.environ.get("OPENAI_API_BASE") or "OpenAI (official)"
        return {
            "model": self.model or "VLMEvalKit default",
            "base_url": base,
            "api_key_env": self.api_key_env,
        }

    def host(self) -> str | None:
        url = self.base_url or os.environ.get("OPENAI_API_BASE")
        return urlparse(url).hostname if url else "api.openai.com"


def resolve_judge(
    model: str | None = None, base_url: str | None = None, api_key_env: str | None = None
) -> Judge | None:
    """The judge from the flags, else from OPENAI_API_KEY / OPENAI_API_BASE; None if neither."""
    key_env = api_key_env or "OPENAI_API_KEY"
    if model is None:
        if base_url is not None or api_key_env is not None:
            raise ValueError(
                "`--judge-base-url` / `--judge-api-key-env` were given without `--judge-model`; "
                "name the judge model too (e.g. --judge-model gpt-4o-mini)."
            )
        if not os.environ.get("OPENAI_API_KEY"):
            return None
        return Judge(model=None, base_url=None, api_key_env="OPENAI_API_KEY")
    if not os.environ.get(key_env):
        raise ValueError(
            f"`--judge-api-key-env` is {key_env!r}, but ${key_env} is not set in the environment; "
            f"export {key_env}=<the judge's API key> (keys are never taken on the command line)."
        )
    return Judge(model=model, base_url=base_url, api_key_env=key_env)


def build_benchmark(name: str):
    """The VLMEvalKit dataset object for `name` (VLMEvalKit's class for the offline stand-ins)."""
    import warnings

    import vlmeval.dataset as vd

    with warnings.catch_warnings():
        # VLMEvalKit warns that every custom name is "not officially supported".
        warnings.simplefilter("ignore", UserWarning)
        if name in TINY_CLASS:
            dataset = getattr(vd, TINY_CLASS[name])(dataset=name)
        else:
            dataset = vd.build_dataset(name)
    if dataset is None:
        raise FileNotFoundError(f"VLMEvalKit could not build `{name}`: is {name}.tsv in $LMUData?")
    return dataset


def _split_row(frame):
    """The one row of an *_acc table that holds the overall split (dev/test/none)."""
    if "split" in frame and len(frame) > 1:
        for split in ("dev", "test", "val", "none"):
            rows = frame[frame["split"] == split]
            if len(rows):
                return rows.iloc[0]
    return frame.iloc[0]


def _number(value: Any) -> float:
    return float(value)


def headline(name: str, result: Any) -> dict[str, Any]:
    """Pull the Table 5 number (and extras) out of what `dataset.evaluate` returned.

    Units: percent for all but MME, whose score is its raw total (perception + cognition, /2800);
    the report scales it.
    """
    import pandas as pd

    kind = benchmark_type(name)
    if isinstance(result, dict):
        result = pd.DataFrame({key: [value] for key, value in result.items()})
    columns = list(result.columns)
    if "MME" in name:
        row = result.iloc[0]
        perception = _number(row.get("perception", 0.0))
        reasoning = _number(row.get("reasoning", 0.0))
        categories = {c: _number(row[c]) for c in columns if c not in ("perception", "reasoning")}
        return {
            "score": perception + reasoning,
            "unit": "MME total (perception + cognition, max 2800)",
            "perception": perception,
            "cognition": reasoning,
            "categories": categories,
        }
    if "Task&Skill" in columns or "Category" in columns:  # MathVista / MM-Vet score tables
        key = "Task&Skill" if "Task&Skill" in columns else "Category"
        row = result[result[key] == "Overall"].iloc[0]
        return {"score": _number(row["acc"]), "unit": "%"}
    if kind == "MCQ":
        row = _split_row(result)
        abilities = {
            abbr: 100 * _number(row[abbr]) for _, abbr, _ in MMBENCH_ABILITIES if abbr in row
        }
        out = {"score": 100 * _number(row["Overall"]), "unit": "%"}
        if abilities:
            out["abilities"] = abilities
        return out
    row = result.iloc[0]
    return {"score": _number(row["Overall"]), "unit": "%"}


def whole_pair_limit(data: Any, limit: int | None) -> int | None:
    """`limit` moved forward so that it never cuts an MME question pair in half.

    MME asks two questions per image (one "Yes", one "No") and scores acc+ per image, rows of a
    pair sharing `image_path`; VLMEvalKit's `limit` takes the first `limit` rows, so an odd limit
    would leave the last image with one question. Other benchmarks are taken as they are.
    """
    if limit is None or "image_path" not in getattr(data, "columns", ()):
        return limit
    paths = data["image_path"]
    while limit < len(paths) and paths.iloc[limit] == paths.iloc[limit - 1]:
        limit += 1
    return limit


def _run_files(run_dir: Path, run_name: str, benchmark: str) -> list[str]:
    prefix = f"{run_name}_{benchmark}"
    return sorted(
        p.name
        for p in run_dir.iterdir()
        if p.name.startswith(prefix) and p.suffix in (".csv", ".xlsx", ".json", ".tsv")
    )


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"`RUN_DIR` {str(run_dir)!r} has no {SUMMARY_NAME}; pass a folder that "
            "`llava-moslora eval` wrote (WORK_DIR/<run name>/)."
        )
    summary = read_json_object(
        path, fix="it is damaged; run `llava-moslora eval` for this run again (or restore it)."
    )
    if not isinstance(summary.get("benchmarks"), dict):
        raise CorruptJSONError(
            f"{path} has no `benchmarks` object: it is not a results file written by "
            "`llava-moslora eval`; run the evaluation again (or restore the file)."
        )
    return summary


def check_run_name(run_name: str) -> str:
    """Refuse a run name that would put the results outside WORK_DIR (or in WORK_DIR itself)."""
    if (
        not run_name
        or run_name in (".", "..")
        or "/" in run_name
        or "\\" in run_name
        or os.sep in run_name
        or (os.altsep is not None and os.altsep in run_name)
    ):
        raise ValueError(
            f"`--run-name` should be a plain folder name inside `--work-dir`, but the value passed "
            f"is {run_name!r}: no path separators, no '..', not absolute. Use e.g. "
            "`--run-name llama3_moslora_seed0`."
        )
    return run_name


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    pending = [n for n, b in summary["benchmarks"].items() if b["status"] == "pending"]
    summary["pending"] = pending
    summary["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    path = run_dir / SUMMARY_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(path)


SCRATCH_DIR = Path("/tmp")  # VLMEvalKit's literal, in mcq_circular_eval
SCRATCH_PREFIX = "llava_moslora_scratch_"


@contextlib.contextmanager
def private_scratch_files() -> Iterator[None]:
    """Give VLMEvalKit's circular multiple-choice scoring a scratch file of its own, and remove it.

    `mcq_circular_eval` (MMBench's scoring) round-trips its table through
    `/tmp/<timestr()>.xlsx`: a name to the second, never removed. Two scorings in the same second
    (the main job scores its two runs side by side) then read each other's table, and every MMBench
    scoring leaves a file in /tmp. Within the block, that module's `timestr` returns a name unique
    to the call, and the files written under those names (made here, so ours to remove) are
    deleted on the way out.
    """
    from vlmeval.dataset.utils import multiple_choice

    original = multiple_choice.timestr
    made: list[Path] = []

    def unique_name(granularity: str = "second") -> str:
        name = f"{SCRATCH_PREFIX}{os.getpid()}_{uuid.uuid4().hex}"
        made.append(SCRATCH_DIR / name)
        return name

    multiple_choice.timestr = unique_name
    try:
        yield
    finally:
        multiple_choice.timestr = original
        for stem in made:
            for path in stem.parent.glob(f"{stem.name}.*"):
                path.unlink(missing_ok=True)


def run_benchmarks(
    datasets: list[str],
    *,
    work_dir: str | Path,
    run_name: str,
    model: Any | None = None,
    model_factory: Callable[[], Any] | None = None,
    manifest: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    judge: Judge | None = None,
    limit: int | None = None,
    score_only: bool = False,
    offline: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Infer (unless `score_only`) and score `datasets`; return and write the run's summary.

    `model` is any VLMEvalKit BaseModel; `model_factory` builds one only if inference is needed
    (score-only runs and finished predictions never load the weights).
    """
    from . import import_vlmeval

    infer_data_job = import_vlmeval("vlmeval.inference").infer_data_job
    from vlmeval.smp import get_pred_file_path

    from .offline import check_local_tsv, data_root, no_network

    if limit is not None and limit < 1:
        raise ValueError(f"`--limit` should be a positive integer, got {limit}.")
    run_dir = Path(work_dir) / check_run_name(run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / SUMMARY_NAME
    summary: dict[str, Any] = (
        load_summary(run_dir) if summary_path.is_file() else {"benchmarks": {}}
    )
    summary.update(schema=SCHEMA_VERSION, run=run_name)
    if manifest is not None:
        summary["manifest"] = recorded_fields(manifest)
    summary.setdefault("manifest", recorded_fields(None))
    if generation is not None:
        summary["generation"] = generation
    summary["data_root"] = str(data_root())

    allow = (judge.host(),) if judge is not None and judge.host() else ()
    guard = no_network(allow_hosts=allow) if offline else contextlib.nullcontext()
    with guard:
        for name in datasets:
            if offline:
                check_local_tsv(name)
            dataset = build_benchmark(name)
            pred_file = Path(get_pred_file_path(str(run_dir), run_name, name))
            entry: dict[str, Any] = dict(summary["benchmarks"].get(name, {}))
            entry.update(column=COLUMN_OF.get(name), prediction_file=pred_file.name)
            if score_only:
                if not pred_file.is_file():
                    raise FileNotFoundError(
                        f"`--score-only`: no predictions for {name} at {pred_file}; run "
                        "`llava-moslora eval` without --score-only first."
                    )
                limit_used = entry.get("limit")
                if limit_used:  # score against the questions that were asked
                    dataset.data = dataset.data.iloc[:limit_used]
            else:
                if model is None:
                    if model_factory is None:
                        raise ValueError("`model` or `model_factory` is needed to run inference.")
                    model = model_factory()
                log(f"[{name}] inference -> {pred_file}")
                asked = whole_pair_limit(dataset.data, limit)
                infer_data_job(
                    model, work_dir=str(run_dir), model_name=run_name, dataset=dataset, limit=asked
                )
                entry["limit"] = asked
            entry["questions"] = len(dataset.data)

            if name in SUBMIT_ONLY:
                entry.update(
                    status="submit",
                    score=None,
                    note=f"no public answers: submit {pred_file.name} to the MMBench server",
                )
            elif name in NEEDS_JUDGE and judge is None:
                entry.update(
                    status="pending",
                    score=None,
                    note="needs an OpenAI-compatible judge (set OPENAI_API_KEY or --judge-model), "
                    "then `llava-moslora eval MODEL_DIR --score-only`",
                )
            else:
                judge_kwargs: dict[str, Any] = {"nproc": 4}
                if judge is not None:
                    judge_kwargs.update(judge.kwargs_for(name))
                    entry["judge"] = judge_kwargs["model"]
                else:
                    judge_kwargs["model"] = "exact_matching"
                    entry["judge"] = "exact_matching"
                log(f"[{name}] scoring with {entry['judge']}")
                with private_scratch_files():
                    result = dataset.evaluate(str(pred_file), **judge_kwargs)
                entry.update(headline(name, result), status="scored", note=None)
                if not math.isfinite(entry["score"]):
                    raise ValueError(f"VLMEvalKit gave {name} a non-finite score: {entry['score']}")
            entry["files"] = _run_files(run_dir, run_name, name)
            summary["benchmarks"][name] = entry
            summary["judge"] = judge.record() if judge is not None else None
            _write_summary(run_dir, summary)
    return summary
