"""Train every variant x seed, evaluate each run, and keep what finished.

Layout under the ablation's work dir (one folder per run, so runs are independent and resumable):

    WORK/VARIANT/seed_S/train/          `llava-moslora train` work dir (checkpoints, logs)
    WORK/VARIANT/seed_S/train.log       its output
    WORK/VARIANT/seed_S/result.json     written last: the run counts as finished only with it
    WORK/ablation.{md,csv,png}          the report (`report.py`)

A run with `result.json` is never redone. A run whose training finished (`last_checkpoint` points
at the final iteration) but whose evaluation did not is only re-evaluated. Anything else is
trained again from scratch in a clean folder: mmengine's resume restores optimizer and schedule but
not the RNG stream, so a resumed run would not be the same seed's run. `trained.json` and
`result.json` record the config and the `--cfg-options` they were made with (`result.json` also
the evaluator): a work dir holds one setting, and resuming it with other ones is refused, so a
report never mixes two settings.

Training goes through `llava-moslora train` (XTuner's launcher with the run's exit code; or a
user-given launcher command in front of the config, e.g. `srun -p gpu llava-moslora train`;
environment variables such as NPROC_PER_NODE pass through). Evaluation is one of:

    heldout      held-out multiple-choice accuracy on the config's `heldout_eval_path` items
                 (tiny_ablation.py: colour / shape / count on new images) or, without it, the
                 compositional task's; each option scored by its log-likelihood
                 (`llava_moslora.eval.heldout.score_sets`): exact, no generation, the
                 offline default. A config that names `forgetting_eval_path` (the old task's
                 items, tiny_ablation_pretrained.py) is scored there too, as `old_*` details
    heldout:val  the same on the config's `heldout_val_path` items: the validation split that
                 `ablate --lr-grid` picks each variant's rate on (lr_grid.py), never the test
                 items; its record is `result_val.json`, next to the test split's
    suite:NAME   export the checkpoint (`xtuner` format) and run `llava-moslora eval --suite NAME`
                 through VLMEvalKit; the score is the mean of the suite's benchmark scores
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..jsonfile import read_json_object
from ..train.checkpoints import last_checkpoint
from ..train.launch import launch_command, parse_cfg_options
from .variants import cfg_options

RESULT = "result.json"
VAL_RESULT = "result_val.json"  # `--eval heldout:val`: one training, scored on either split
# The config keys of the held-out items a split reads (`heldout` without them: the compositional
# task's items next to `data_path`), and of the old task's items a test evaluation also scores.
SPLIT_KEYS = {None: "heldout_eval_path", "val": "heldout_val_path"}
FORGETTING_KEY = "forgetting_eval_path"


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    dir: Path
    result_name: str = RESULT

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"

    @property
    def result_path(self) -> Path:
        return self.dir / self.result_name

    def finished(self) -> bool:
        return self.result_path.is_file()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"model.llm_lora.r": 8, ...}: every leaf of a nested config dict under its dotted key."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _stable_name(value: Any) -> str:
    # Classes and functions by their import path: their repr would hold a memory address.
    if hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return repr(value)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def _existing_path(value: Any) -> Path | None:
    if not isinstance(value, str) or not value or "\n" in value:
        return None
    path = Path(value).expanduser()
    try:
        return path.resolve() if path.exists() else None
    except OSError:  # a name too long for a path
        return None


def content_of(value: Any, parents: frozenset[Path] = frozenset()) -> Any:
    """A config value that names a file or folder, as the SHA-256 of what is there; else itself.

    A path says where the data is, not what it is: `./tiny/llm` and its absolute spelling are one
    setting, and data regenerated under the same path is another. A folder's content is each
    file's relative path and content, sorted. Files are read once per process (by size and mtime).
    A folder in `parents` (one that holds the config's other folders, such as the tiny configs'
    `tiny_dir`) counts by those paths alone: whatever else lies in it (an ablation's own work
    dir, say) is not the setting.
    """
    path = _existing_path(value)
    if path is None:
        return value
    if path in parents:
        return "folder of the config's other paths"
    try:
        if path.is_file():
            return f"file sha256 {_file_sha256(path)}"
        if path.is_dir():
            digest = hashlib.sha256()
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(
                    f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode()
                )
            return f"folder sha256 {digest.hexdigest()}"
    except OSError:  # a name too long for a path, an unreadable file: compared as written
        return value
    return value


def config_sha256(config: str | Path) -> str:
    """The SHA-256 of the resolved config (bases merged, flattened, keys sorted, every path
    replaced by the content there, `content_of`): the setting.

    Two files with the same content are one setting wherever they lie and whatever their name,
    and however the paths inside them are spelled; a file edited between two runs of one work dir
    (or another file of the same name), or data regenerated under the same path, is not.
    """
    from mmengine.config import Config

    try:
        resolved = Config.fromfile(str(config)).to_dict()
    except Exception as error:  # noqa: BLE001 - SyntaxError, ImportError, KeyError ... of the file
        raise ValueError(
            f"`--config` {str(config)!r} cannot be read as an XTuner config "
            f"({type(error).__name__}: {error}); fix it (`xtuner train` would fail the same way)."
        ) from None
    flat = _flatten(resolved)
    paths = {path for path in map(_existing_path, flat.values()) if path is not None}
    folders = {path for path in paths if path.is_dir()}
    parents = frozenset(p for p in folders if any(p in other.parents for other in folders))
    flat = {key: content_of(value, parents) for key, value in flat.items()}
    text = json.dumps(flat, sort_keys=True, default=_stable_name)
    return hashlib.sha256(text.encode()).hexdigest()


def settings(config: str | Path, extra: Sequence[str], evaluator: str | None = None) -> dict:
    """What must match for a finished run to be reused: the config's content (`config_sha256`;
    its file name is recorded only to be shown), the extra `--cfg-options` and, for a result, the
    evaluator."""
    found = {
        "config": Path(config).name,
        "config_sha256": config_sha256(config),
        "cfg_options": list(extra),
    }
    if evaluator is not None:
        found["evaluator"] = evaluator
    return found


def check_settings(path: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """Read the JSON record at `path`; refuse it if it was made with other `settings`.

    The config is compared by content; a record older than `config_sha256` by file name.
    """
    record = read_json_object(
        path, fix=f"delete {path.parent} to redo that run, or restore the file."
    )
    recorded = dict(record)
    if "config" in recorded:
        recorded["config"] = Path(recorded["config"]).name
    by_content = "config_sha256" in recorded
    for key, value in wanted.items():
        if (key == "config" and by_content) or (key == "config_sha256" and not by_content):
            continue
        if recorded.get(key) == value:
            continue
        flag = {"cfg_options": "--cfg-options", "evaluator": "--eval"}.get(key, "--config")
        if key == "config_sha256":
            made = f"{recorded.get('config')!r} (resolved content sha256 {str(recorded[key])[:12]})"
            passed = f"{wanted.get('config')!r} (sha256 {value[:12]}): another config content"
        else:
            made, passed = repr(recorded.get(key)), repr(value)
        raise ValueError(
            f"{path} was made with `{flag}` {made} but this command passes {passed}. A work dir "
            f"holds one setting: pass the same `{flag}` to resume it, or give these settings "
            "their own `--work-dir`."
        )
    return record


def plan(
    work_dir: str | Path,
    variants: Sequence[str],
    seeds: Sequence[int],
    result_name: str = RESULT,
) -> list[Run]:
    """Every variant x seed, seeds outermost: an interrupted ablation has whole seeds done.

    `result_name` is VAL_RESULT for runs scored on the validation split (`heldout:val`)."""
    return [
        Run(variant, seed, Path(work_dir) / variant / f"seed_{seed}", result_name)
        for seed in seeds
        for variant in variants
    ]


def parse_evaluator(text: str) -> tuple[str, str | None]:
    """`heldout` -> ("heldout", None); `heldout:val` -> ("heldout", "val");
    `suite:tiny` -> ("suite", "tiny")."""
    kind, _, rest = text.partition(":")
    if kind == "heldout" and rest in ("", "val"):
        return kind, rest or None
    if kind == "suite" and rest:
        return kind, rest
    raise ValueError(
        "`--eval` should be `heldout`, `heldout:val` or `suite:NAME` (e.g. suite:tiny, "
        f"suite:paper9), got {text!r}"
    )


def heldout_items(config: str | Path, split: str | None) -> tuple[str | None, str | None]:
    """The config's items for `split` (None: the test split) and its old task's items (None
    when it names none). The test split may be left to `evaluate_run`'s default (None); the
    validation split must be named: without it there is nothing to choose a rate on."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    items = cfg.get(SPLIT_KEYS[split])
    if split == "val" and not items:
        raise ValueError(
            f"`--eval heldout:val` needs `{SPLIT_KEYS['val']}` in {str(config)!r}: the "
            "validation items (e.g. configs/tiny_ablation_pretrained.py and make-tiny "
            "--pretrain); the test items are never used to choose a learning rate."
        )
    return items, cfg.get(FORGETTING_KEY)


def train_command(
    run: Run, config: str | Path, launcher: str | None, extra: Sequence[str]
) -> list[str]:
    args = [
        str(config),
        "--work-dir",
        str(run.train_dir),
        "--seed",
        str(run.seed),
        "--cfg-options",
        *cfg_options(run.variant),
        *extra,
    ]
    return [*shlex.split(launcher), *args] if launcher else launch_command(args)


def _final_checkpoint(run: Run) -> Path | None:
    try:
        return last_checkpoint(run.train_dir)
    except FileNotFoundError:
        return None


def train(
    run: Run,
    config: str | Path,
    *,
    launcher: str | None = None,
    extra: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> Path:
    """Train `run` (unless its training already finished); return its final checkpoint.

    Success is its exit code and what it leaves: a `last_checkpoint` and a log without a
    traceback (a user's `--launcher` may be `xtuner train`, which exits 0 even when it crashed).
    """
    marker = run.dir / "trained.json"
    if marker.is_file():
        return Path(check_settings(marker, settings(config, extra))["checkpoint"])
    if run.dir.exists():  # a half-finished run: start the seed again, cleanly
        log(
            f"[{run.variant} seed {run.seed}] deleting {run.dir}: a half-finished run (no "
            "trained.json), trained again from scratch"
        )
        shutil.rmtree(run.dir)
    run.dir.mkdir(parents=True)
    command = train_command(run, config, launcher, extra)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log(f"[{run.variant} seed {run.seed}] training: {shlex.join(command)}")
    started = time.monotonic()
    with open(run.dir / "train.log", "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    output = (run.dir / "train.log").read_text(errors="replace")
    checkpoint = _final_checkpoint(run)
    if code != 0 or checkpoint is None or "Traceback (most recent call last)" in output:
        raise RuntimeError(
            f"training {run.variant} seed {run.seed} failed (exit {code}); the last lines of "
            f"{run.dir / 'train.log'}:\n" + "\n".join(output.splitlines()[-15:])
        )
    marker.write_text(
        json.dumps(
            {
                "checkpoint": str(checkpoint),
                "seconds": time.monotonic() - started,
                **settings(config, extra),
            }
        )
    )
    return checkpoint


def evaluate(
    run: Run,
    checkpoint: Path,
    config: str | Path,
    *,
    evaluator: str = "heldout",
    extra: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score `run`'s checkpoint; return {"score": float, "details": {...}}."""
    kind, arg = parse_evaluator(evaluator)
    options = parse_cfg_options([*cfg_options(run.variant), *extra])
    if kind == "heldout":
        from ..eval.heldout import score_sets

        split = arg
        items, old_items = heldout_items(config, split)
        log(f"[{run.variant} seed {run.seed}] {split or 'test'} accuracy of {checkpoint.name}")
        keep_old = split is None and old_items  # what the adapter kept of the old task
        scored = score_sets(
            config, checkpoint, [items, old_items] if keep_old else [items], options
        )
        details = scored[0].accuracy()
        if keep_old:
            details.update({f"old_{key}": value for key, value in scored[1].accuracy().items()})
        unit = "% held-out" if split is None else "% validation"
        return {"score": 100 * details["overall"], "unit": unit, "details": details}

    from ..eval.benchmarks import resolve_datasets
    from ..eval.manifest import export_identity, read_export_manifest
    from ..eval.model import LLaVAMoSLoRA
    from ..eval.runner import run_benchmarks
    from ..export import export

    suite = arg
    export_dir = run.dir / "export"
    log(f"[{run.variant} seed {run.seed}] export + VLMEvalKit suite {suite!r}")
    export(checkpoint, config, "xtuner", export_dir, cfg_options=options, overwrite=True)
    # A redone run re-exports into the same folder: its predictions are made afresh, never reused
    # from the run it replaces (the export's identity is recorded with the scores).
    identity = export_identity(export_dir, read_export_manifest(export_dir))
    summary = run_benchmarks(
        resolve_datasets(suite),
        work_dir=run.dir / "eval",
        run_name=f"{run.variant}_seed{run.seed}",
        model_factory=lambda: LLaVAMoSLoRA(str(export_dir)),
        export={"dir": str(export_dir), "identity": identity},
        overwrite=True,
        offline=suite == "tiny",
        log=log,
    )
    scores = {
        name: entry["score"]
        for name, entry in summary["benchmarks"].items()
        if entry.get("score") is not None
    }
    if not scores:
        raise RuntimeError(f"suite {suite!r} gave no score for {run.dir} (all pending?)")
    return {"score": sum(scores.values()) / len(scores), "unit": "mean", "details": scores}


def run_all(
    runs: Sequence[Run],
    config: str | Path,
    *,
    launcher: str | None = None,
    extra: Sequence[str] = (),
    evaluator: str = "heldout",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train and evaluate every unfinished run; return every finished run's result."""
    parse_evaluator(evaluator)  # refuse a bad --eval or --cfg-options before hours of training
    parse_cfg_options(extra)
    wanted = settings(config, extra, evaluator)
    # Every finished run is checked before any training: a mismatch is found in seconds.
    done = {run: check_settings(run.result_path, wanted) for run in runs if run.finished()}
    results = []
    for index, run in enumerate(runs, 1):
        if run in done:
            log(f"[{index}/{len(runs)}] {run.variant} seed {run.seed}: done already")
            results.append(done[run])
        else:
            log(f"[{index}/{len(runs)}] {run.variant} seed {run.seed}")
            checkpoint = train(run, config, launcher=launcher, extra=extra, log=log)
            result = evaluate(run, checkpoint, config, evaluator=evaluator, extra=extra, log=log)
            result.update(
                variant=run.variant,
                seed=run.seed,
                checkpoint=str(checkpoint),
                **{**wanted, "config": str(config)},  # the path, not only its name
                train_seconds=json.loads((run.dir / "trained.json").read_text())["seconds"],
            )
            tmp = run.result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(run.result_path)
            results.append(json.loads(run.result_path.read_text()))
    return results
