"""A training's work dir belongs to one run: a lock while it trains, no other run's checkpoints.

mmengine writes `iter_N.pth` / `epoch_N.pth` and `last_checkpoint` into the work dir and never
looks at what is already there, so two runs into one folder both finish with exit 0 and the
second's checkpoints replace the first's (or mix with them: `last_checkpoint` names whichever
wrote last). `llava-moslora train` therefore, before XTuner starts:

    WORK_DIR/.llava_moslora_train.lock   "PID HOST" of the `llava-moslora train` that trains there,
                                         created exclusively, removed when it ends; a second
                                         training into WORK_DIR is refused while that PID lives.
                                         A lock whose PID is gone (on this host) is reclaimed,
                                         with a message.
    WORK_DIR/iter_N.pth, last_checkpoint ...  another run's checkpoints: refused unless the run
                                         resumes (`--resume`, or `resume=True` in the config).

Only the first node (NODE_RANK 0) and, under `--launcher slurm`, the first task claim the folder:
on a shared file system the others write into the same one.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from llava_moslora.owner import mark_text, read_mark

from .preflight import TrainInputError

LOCK_NAME = ".llava_moslora_train.lock"
CHECKPOINT = re.compile(r"(iter|epoch)_\d+\.pth|last_checkpoint")
SHOWN = 3  # checkpoints named in a refusal


class WorkDirError(TrainInputError):
    """The work dir belongs to another run (in use, or holding its checkpoints)."""


def default_work_dir(config: str | Path) -> Path:
    """XTuner's work dir when neither `--work-dir` nor the config's `work_dir` names one."""
    return Path("work_dirs") / Path(config).stem


def earlier_checkpoints(work_dir: Path) -> list[str]:
    """The checkpoint files and folders (DeepSpeed's) an earlier run wrote into `work_dir`."""
    if not work_dir.is_dir():
        return []
    return sorted(p.name for p in work_dir.iterdir() if CHECKPOINT.fullmatch(p.name))


def check_no_other_run(work_dir: Path, resuming: bool) -> None:
    """Refuse a fresh run into a work dir that holds another run's checkpoints."""
    found = earlier_checkpoints(work_dir)
    if found and not resuming:
        shown = ", ".join(found[:SHOWN]) + (
            f" and {len(found) - SHOWN} more" * (len(found) > SHOWN)
        )
        raise WorkDirError(
            f"`--work-dir` {work_dir} holds another run's checkpoints ({shown}): a new run would "
            "replace them. Pass `--resume` to continue that run, or another `--work-dir`."
        )


def _take(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        file.write(mark_text())
    return True


def acquire(work_dir: Path, log: Callable[[str], None]) -> Path:
    """Create `work_dir`'s lock naming this process; return its path. Refuse a live one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = work_dir / LOCK_NAME
    while not _take(lock):
        mark = read_mark(lock)
        if mark is None:
            raise WorkDirError(
                f"`--work-dir` {work_dir} has a lock file {lock} that names no process: another "
                "training may be starting there. Pass another `--work-dir`, or delete the lock "
                "if no training uses that folder."
            )
        if mark.alive:
            elsewhere = "" if mark.here else f" (check there; delete {lock} if it has ended)"
            raise WorkDirError(
                f"`--work-dir` {work_dir} is in use by a training: PID {mark.pid} on {mark.host} "
                f"holds {lock}{elsewhere}. Wait for it to finish, or pass another `--work-dir`."
            )
        # Its process is gone: move the stale lock aside (one process wins the rename), and put
        # it back if what was moved is no longer the stale mark (a newer training's lock).
        aside = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(lock, aside)
        except FileNotFoundError:
            continue
        if read_mark(aside) != mark:
            with contextlib.suppress(FileExistsError):
                os.link(aside, lock)
            aside.unlink()
            continue
        aside.unlink()
        log(
            f"note: {lock} named training PID {mark.pid} on {mark.host}, which has ended: "
            "lock reclaimed"
        )
    return lock


def release(lock: Path) -> None:
    """Remove `lock` if it is still this process's."""
    mark = read_mark(lock)
    if mark is not None and mark.here and mark.pid == os.getpid():
        lock.unlink(missing_ok=True)
