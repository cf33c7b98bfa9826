"""The export's output folder: written aside, swapped in atomically, never deleting what is not ours.

    OUT/                      the finished export (its manifest lists every file it wrote)
    .OUT.partial-PID/         the export being written by process PID
    .OUT.old-PID/             the previous export, moved aside by PID while the new one moves in

The swap is rename, rename, delete: OUT -> .OUT.old-PID, .OUT.partial-PID -> OUT, then the old
one is removed. `--overwrite` replaces OUT only if it is an earlier export holding nothing but the
files its manifest lists (and not the checkpoint or config being exported). A killed export leaves
its hidden folders behind; the next export into OUT removes those whose process is gone and whose
marker file says they are an export's (restoring the old export if the new one never moved in),
and names any other. Those folders are found by their literal name, never a glob pattern built
from OUT's (an OUT named `exp[1]` would otherwise reach `exp1`'s).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..owner import pid_alive, read_mark, write_mark
from .manifest import MANIFEST_NAME, read_manifest

logger = logging.getLogger("llava_moslora.export")

# Written into .OUT.partial-PID/ (and into OUT just before it is moved aside): "this folder is
# an export's, by process PID". Nothing else is ever removed by an export.
MARKER_NAME = ".llava_moslora_export_pid"
SHOWN_FILES = 5  # files named per refusal


def list_files(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN_FILES} more" if len(names) > SHOWN_FILES else ""
    return ", ".join(names[:SHOWN_FILES]) + more


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_out_dir(out: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an OUT that is a file, non-empty without `overwrite`, or not only an earlier export.

    `inputs` (the checkpoint, the config) must not lie in OUT: replacing OUT would delete them.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"`OUT` {out} is a file; give a folder path.")
    inside = [str(p) for p in inputs if p is not None and _inside(Path(p), out)]
    if inside:
        raise FileExistsError(
            f"`OUT` {out} contains the export's own input {', '.join(inside)}: writing the export "
            "there could delete it. Choose an OUT folder outside the work dir and the checkpoint."
        )
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"`OUT` {out} is not empty. Pass `--overwrite` to replace an earlier export there, or "
            "choose another folder."
        )
    if not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"`OUT` {out} holds files but no {MANIFEST_NAME}: it is not an earlier export, so "
            "`--overwrite` does not delete it. Remove it yourself or choose another folder."
        )
    listed = read_manifest(out).files
    if listed is None:
        raise FileExistsError(
            f"`OUT` {out} is an export by an older version whose {MANIFEST_NAME} does not list "
            "its files, so `--overwrite` cannot tell them from yours. Remove it yourself or "
            "choose another folder."
        )
    ours = set(listed) | {MANIFEST_NAME, MARKER_NAME}
    foreign = [name for name in list_files(out) if name not in ours]
    if foreign:
        raise FileExistsError(
            f"`OUT` {out} holds {len(foreign)} file(s) the earlier export did not write: "
            f"{_shown(foreign)}. `--overwrite` replaces only an export's own files; move these "
            "out of it first, or choose another folder."
        )


def _marked_pid(folder: Path) -> int | None:
    """The PID in `folder`'s marker when it was written on this machine, else None."""
    mark = read_mark(folder / MARKER_NAME)
    return mark.pid if mark is not None and mark.here else None


def _mark(folder: Path) -> None:
    write_mark(folder / MARKER_NAME)


def _left_by(out: Path, kind: str) -> list[Path]:
    """The `.OUT.<kind>-*` folders next to `out`, matched literally: an OUT named `exp[1]` or
    `a*` must not reach another export's folders, as a glob pattern built from its name would."""
    prefix = f".{out.name}.{kind}-"
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))


def clean_stale(out: Path) -> None:
    """Remove the hidden folders a killed export into `out` left; name those that are not ours."""
    for folder in _left_by(out, "partial") + _left_by(out, "old"):
        suffix = folder.name.rsplit("-", 1)[-1]
        pid = _marked_pid(folder) if folder.is_dir() else None
        if pid is None or str(pid) != suffix:
            logger.warning(
                "%s looks like an unfinished export's folder but has no %s marker naming its "
                "process on this machine: left alone. Remove it yourself if it is not needed.",
                folder,
                MARKER_NAME,
            )
        elif pid_alive(pid):
            logger.warning("%s: export process %d is still running; left alone.", folder, pid)
        elif folder.name.startswith(f".{out.name}.old-") and not out.exists():
            # Killed between moving the old export aside and moving the new one in: put it back.
            (folder / MARKER_NAME).unlink()
            os.replace(folder, out)
            logger.warning(
                "restored the earlier export %s left aside by killed process %d", out, pid
            )
        else:
            shutil.rmtree(folder)
            logger.warning("removed %s, left by killed export process %d", folder, pid)


def make_staging(out: Path) -> Path:
    """A fresh, marked .OUT.partial-PID folder next to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)  # our own PID's: a previous export in this process
    staging.mkdir()
    _mark(staging)
    return staging


def move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished `staging` folder in as `out`: rename old aside, rename new in, delete old.

    The marker moves in with the new export and is removed right after (check_out_dir ignores one
    left by a kill in between).
    """
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        _mark(out)  # an empty folder or an earlier export, checked by check_out_dir
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:  # put the earlier export back (a kill instead: see clean_stale)
        if old.exists():
            os.replace(old, out)
            (out / MARKER_NAME).unlink()
        raise
    (out / MARKER_NAME).unlink()
    if old.exists():
        shutil.rmtree(old)
