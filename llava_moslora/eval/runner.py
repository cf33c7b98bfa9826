"""Running benchmarks through VLMEvalKit's own code and writing the run's summary JSON.

For each benchmark: `vlmeval.dataset.build_dataset` (or, for the offline stand-ins, the VLMEvalKit
class that scores them), `vlmeval.inference.infer_data_job` (resumable; writes
`<run>_<benchmark>.xlsx`, the prediction file), then `dataset.evaluate` (VLMEvalKit's scoring:
`*_acc.csv` for multiple choice, `*_score.csv` for MME / MM-Vet / MathVista). This mirrors what
`vlmeval/run.py` does, which only accepts registered model names.

    WORK_DIR/RUN/RUN_<benchmark>.xlsx          predictions
    WORK_DIR/RUN/RUN_<benchmark>_*_acc.csv ... VLMEvalKit's scores
    WORK_DIR/RUN/llava_moslora_results.json    the summary `report` and `radar` read: per
        benchmark its score and `protocol`, the export's identity, the files eval wrote

A run folder holds one export's predictions (`claim_run_dir`): VLMEvalKit resumes from any
prediction file of the same run name, so another export's are refused, not reused.

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
from .benchmarks import BENCHMARKS, DEFAULT_JUDGE, Benchmark
from .manifest import recorded_fields
from .protocol import (
    EXACT_MATCHING,
    LLAVA_PROMPT_COLUMN,
    data_record,
    llava_prompts,
    vlmevalkit_version,
)

SUMMARY_NAME = "llava_moslora_results.json"
SCHEMA_VERSION = 2  # 2: `export` (identity), per-benchmark `protocol`, `written`
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


def check_judge_answers(judge_kwargs: dict[str, Any], host: str | None) -> None:
    """Raise ValueError unless the judge answers a test call (VLMEvalKit's `working()`).

    VLMEvalKit's multiple-choice and yes/no scoring fall back to exact matching, with only a
    warning, when the judge does not answer: the results would then record a judge that scored
    nothing. Asking first makes that an error naming the judge, before any scoring.
    """
    from vlmeval.dataset.utils import build_judge

    if not build_judge(**dict(judge_kwargs)).working():
        raise ValueError(
            f"the judge {judge_kwargs.get('model')!r} at {host} did not answer a test call, so "
            "VLMEvalKit would score by exact matching while the results named the judge; check "
            "`--judge-base-url` and the key, or run without a judge (exact matching, recorded)."
        )


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


def build_benchmark(name: str, tsv: dict[str, Any] | None = None):
    """The VLMEvalKit dataset object for `name` (VLMEvalKit's class for the offline stand-ins).

    `tsv` (from `offline.local_tsv`): when the local file's md5 is not the one VLMEvalKit lists,
    the dataset is built by a subclass of VLMEvalKit's class that lists the local md5, so
    VLMEvalKit reads the user's file instead of downloading over it.
    """
    import warnings

    import vlmeval.dataset as vd

    from .offline import listed_tsv

    entry = BENCHMARKS[name]
    with warnings.catch_warnings():
        # VLMEvalKit warns that every custom name is "not officially supported".
        warnings.simplefilter("ignore", UserWarning)
        if entry.vlmeval_class is not None:
            dataset = getattr(vd, entry.vlmeval_class)(dataset=name)
        elif tsv and tsv.get("md5") and tsv.get("listed_md5") not in (None, tsv["md5"]):
            owner = listed_tsv(name)[0]
            local = type(
                owner.__name__, (owner,), {"DATASET_MD5": {**owner.DATASET_MD5, name: tsv["md5"]}}
            )
            dataset = local(dataset=name)
        else:
            dataset = vd.build_dataset(name)
    if dataset is None:
        raise FileNotFoundError(f"VLMEvalKit could not build `{name}`: is {name}.tsv in $LMUData?")
    return dataset


def headline(name: str, result: Any) -> dict[str, Any]:
    """The Table 5 number (and extras) of what `dataset.evaluate` returned, by the benchmark's
    family. Units: percent for all but MME, whose score is its raw total (perception +
    cognition, /2800); the report scales it."""
    import pandas as pd

    if isinstance(result, dict):
        result = pd.DataFrame({key: [value] for key, value in result.items()})
    return BENCHMARKS[name].family.headline(result)


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


PREDICTION_SUFFIXES = (".xlsx", ".tsv", ".json", ".pkl", ".csv")


class RunFolderError(ValueError):
    """A run folder holds predictions that are not this export's."""


def _listing(run_dir: Path) -> dict[str, int]:
    """File name -> mtime (ns) of the plain files directly in `run_dir`."""
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}


def _vlmevalkit_files(run_dir: Path, run_name: str) -> list[str]:
    """Files in `run_dir` named like VLMEvalKit's predictions and scores of run `run_name`."""
    return sorted(
        p.name
        for p in run_dir.iterdir()
        if p.is_file() and p.name.startswith(f"{run_name}_") and p.suffix in PREDICTION_SUFFIXES
    )


def files_eval_wrote(summary: dict[str, Any]) -> set[str]:
    """The files of a run folder that `llava-moslora eval` wrote, from its results file: what
    `--overwrite` may remove (plain names only: nothing outside the folder)."""
    names = set(summary.get("written") or ())
    for entry in summary["benchmarks"].values():
        if isinstance(entry, dict):
            names.update(entry.get("files") or ())
            if entry.get("prediction_file"):
                names.add(entry["prediction_file"])
    return {n for n in names if isinstance(n, str) and n and "/" not in n and "\\" not in n}


def _describe(export: dict[str, Any] | None) -> str:
    if not export or not export.get("identity"):
        return "an export whose identity was not recorded (written before eval recorded it)"
    return f"the export {export.get('dir')!r} ({export['identity'][:19]}...)"


def claim_run_dir(
    run_dir: Path,
    run_name: str,
    export: dict[str, Any] | None,
    *,
    overwrite: bool = False,
    reuse: bool = False,
) -> dict[str, Any]:
    """The run's summary to continue from, after checking that `run_dir` holds no other
    export's predictions.

    VLMEvalKit's `infer_data_job` resumes from any prediction file of the same run name, so
    evaluating export B into a folder holding export A's predictions would score A's answers as
    B's. `export` ({"dir", "identity"}) is compared with the one the folder recorded:
    the same export resumes; another (or one not recorded) is refused unless `overwrite` (the
    files eval wrote are removed, predictions start afresh) or `reuse` (the user vouches that
    the predictions are this export's). An `export` of None (a model object given directly,
    no export folder) resumes only into a folder that recorded none either.
    """
    summary_path = run_dir / SUMMARY_NAME
    summary: dict[str, Any] = (
        load_summary(run_dir) if summary_path.is_file() else {"benchmarks": {}}
    )
    stray = _vlmevalkit_files(run_dir, run_name)
    if not summary["benchmarks"] and not stray:
        return summary  # nothing predicted here yet
    recorded = summary.get("export")
    same = (recorded or {}).get("identity") == (export or {}).get("identity")
    if overwrite:
        if not summary_path.is_file():
            raise RunFolderError(
                f"`--overwrite`: {run_dir} holds {', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}"
                f" but no {SUMMARY_NAME}, so nothing says `llava-moslora eval` wrote them; remove "
                "them yourself, or choose another `--run-name`."
            )
        for name in sorted(files_eval_wrote(summary) | {SUMMARY_NAME}):
            (run_dir / name).unlink(missing_ok=True)
        return {"benchmarks": {}}
    if same or reuse:
        if not same:
            summary["reused_predictions_of"] = recorded
        return summary
    raise RunFolderError(
        f"`--run-name` {run_name!r}: {run_dir} holds predictions of {_describe(recorded)}, not of "
        f"{_describe(export)}; evaluating into it would score the old predictions as this "
        "export's. Pass `--overwrite` for fresh predictions (only the files eval wrote there are "
        "removed), `--reuse` to keep the predictions as this export's, or another `--run-name`."
    )


def _prompt_variant(model: Any, name: str, ocr: dict[str, Any] | None) -> str:
    describe = getattr(model, "prompt_variant", None)
    if describe is not None:
        label = describe(name)
    else:
        label = "the model's own" if model.use_custom_prompt(name) else "VLMEvalKit's"
    if ocr is not None:
        label += f" + reference OCR tokens, LLaVA-1.5's prompt verbatim from {ocr['file']} (md5 {ocr['md5']})"
    return label


def _textvqa_ocr(dataset: Any, entry: Benchmark, model: Any, ocr_file: Path) -> dict[str, Any]:
    """Put LLaVA-1.5's OCR-token prompt of every row in the dataset's table; the record of it."""
    from vlmeval.smp import md5

    if not getattr(model, "READS_LLAVA_PROMPT", False):
        raise ValueError(
            f"`--textvqa-ocr`: the model {type(model).__name__} does not read the "
            f"`{LLAVA_PROMPT_COLUMN}` column; only LLaVAMoSLoRA asks LLaVA-1.5's prompts."
        )
    dataset.data[LLAVA_PROMPT_COLUMN] = llava_prompts(dataset.data, ocr_file)
    return {"file": Path(ocr_file).name, "md5": md5(str(ocr_file))}


def run_benchmarks(
    datasets: list[str],
    *,
    work_dir: str | Path,
    run_name: str,
    model: Any | None = None,
    model_factory: Callable[[], Any] | None = None,
    manifest: dict[str, Any] | None = None,
    export: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    judge: Judge | None = None,
    limit: int | None = None,
    score_only: bool = False,
    offline: bool = False,
    overwrite: bool = False,
    reuse: bool = False,
    textvqa_ocr: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Infer (unless `score_only`) and score `datasets`; return and write the run's summary.

    `model` is any VLMEvalKit BaseModel; `model_factory` builds one only if inference is needed
    (score-only runs and finished predictions never load the weights). `export` ({"dir",
    "identity"}, see `manifest.export_identity`) is recorded, and a folder holding another
    export's predictions is refused unless `overwrite` or `reuse` (`claim_run_dir`).
    `textvqa_ocr`: LLaVA-1.5's TextVQA question file, to ask TextVQA with its OCR-token prompt.
    """
    from . import import_vlmeval

    infer_data_job = import_vlmeval("vlmeval.inference").infer_data_job
    from vlmeval.smp import get_pred_file_path

    from .offline import data_root, local_tsv, no_network

    if limit is not None and limit < 1:
        raise ValueError(f"`--limit` should be a positive integer, got {limit}.")
    if overwrite and (reuse or score_only):
        raise ValueError(
            "`--overwrite` starts fresh predictions; it cannot go with `--reuse` or `--score-only`."
        )
    unknown = [name for name in datasets if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"no benchmark entry for {', '.join(unknown)} (see eval/README.md).")
    if textvqa_ocr is not None and not any(BENCHMARKS[name].ocr_prompt for name in datasets):
        raise ValueError(
            "`--textvqa-ocr` applies to the benchmarks LLaVA-1.5 asks with OCR tokens ("
            f"{', '.join(n for n, b in BENCHMARKS.items() if b.ocr_prompt)}); none is among "
            f"{', '.join(datasets)}."
        )
    run_dir = Path(work_dir) / check_run_name(run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = claim_run_dir(run_dir, run_name, export, overwrite=overwrite, reuse=reuse)
    summary.update(schema=SCHEMA_VERSION, run=run_name)
    summary.pop("judge", None)  # schema 1's run-wide judge: each benchmark records its scorer
    if export is not None:
        summary["export"] = export
    if manifest is not None:
        summary["manifest"] = recorded_fields(manifest)
    summary.setdefault("manifest", recorded_fields(None))
    if generation is not None:
        summary["generation"] = generation
    summary["data_root"] = str(data_root())
    version = vlmevalkit_version()
    checked_judges: set[str] = set()

    allow = (judge.host(),) if judge is not None and judge.host() else ()
    guard = no_network(allow_hosts=allow) if offline else contextlib.nullcontext()
    with guard:
        for name in datasets:
            bench = BENCHMARKS[name]
            before = _listing(run_dir)
            tsv = local_tsv(name, offline=offline)
            if tsv["md5"] and tsv["listed_md5"] not in (None, tsv["md5"]):
                log(
                    f"warning: {name}: {data_root() / tsv['file']} has md5 {tsv['md5']}, "
                    f"VLMEvalKit lists {tsv['listed_md5']}; using your file as it is (never "
                    "re-downloaded; move it aside to let VLMEvalKit fetch its release)."
                )
            dataset = build_benchmark(name, tsv)
            if tsv["md5"] is None:  # downloaded just now by VLMEvalKit
                tsv = local_tsv(name, offline=offline)
            pred_file = Path(get_pred_file_path(str(run_dir), run_name, name))
            entry: dict[str, Any] = dict(summary["benchmarks"].get(name, {}))
            entry.update(column=bench.column, prediction_file=pred_file.name)
            protocol: dict[str, Any] = dict(entry.get("protocol") or {})
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
                ocr = None
                if textvqa_ocr is not None and bench.ocr_prompt:
                    ocr = _textvqa_ocr(dataset, bench, model, Path(textvqa_ocr))
                log(f"[{name}] inference -> {pred_file}")
                asked = whole_pair_limit(dataset.data, limit)
                infer_data_job(
                    model, work_dir=str(run_dir), model_name=run_name, dataset=dataset, limit=asked
                )
                entry["limit"] = asked
                protocol.update(
                    data=data_record(name, tsv),
                    prompt=_prompt_variant(model, name, ocr),
                    decoding=generation,
                    vlmevalkit_inference=version,
                )
            entry["questions"] = len(dataset.data)

            if bench.family.needs_judge and judge is None:
                entry.update(
                    status="pending",
                    score=None,
                    note="needs an OpenAI-compatible judge (set OPENAI_API_KEY or --judge-model), "
                    "then `llava-moslora eval MODEL_DIR --score-only`",
                )
                protocol["scorer"] = None
            else:
                judge_kwargs: dict[str, Any] = {"nproc": 4}
                if judge is not None:
                    judge_kwargs.update(judge.kwargs_for(name))
                    if judge_kwargs["model"] not in checked_judges:
                        check_judge_answers(judge_kwargs, judge.host())
                        checked_judges.add(judge_kwargs["model"])
                    entry["judge"] = judge_kwargs["model"]
                    protocol["scorer"] = f"{judge_kwargs['model']} (judge at {judge.host()})"
                else:
                    judge_kwargs["model"] = "exact_matching"
                    entry["judge"] = "exact_matching"
                    protocol["scorer"] = EXACT_MATCHING
                log(f"[{name}] scoring with {entry['judge']}")
                with private_scratch_files():
                    result = dataset.evaluate(str(pred_file), **judge_kwargs)
                entry.update(headline(name, result), status="scored", note=None)
                protocol["vlmevalkit_scoring"] = version
                if not math.isfinite(entry["score"]):
                    raise ValueError(f"VLMEvalKit gave {name} a non-finite score: {entry['score']}")
            entry["protocol"] = protocol
            entry["files"] = _run_files(run_dir, run_name, name)
            after = _listing(run_dir)
            written = {n for n, t in after.items() if before.get(n) != t and n != SUMMARY_NAME}
            summary["written"] = sorted(set(summary.get("written") or ()) | written)
            summary["benchmarks"][name] = entry
            _write_summary(run_dir, summary)
    return summary
