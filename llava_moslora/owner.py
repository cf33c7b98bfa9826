"""Which process owns a folder: a small marker file naming its PID and host.

An export marks its staging folders with one (export/out_dir.py), a training marks its work dir
with one held as a lock for as long as it runs (train/work_dir.py). The host is part of the mark:
on a shared file system another machine's PIDs mean nothing here, so only a mark written on this
machine can be found stale (its process gone) and reclaimed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mark:
    """What a marker file says: the process that wrote it and the machine it ran on."""

    pid: int
    host: str

    @property
    def here(self) -> bool:
        """Written on this machine: its PID can be checked."""
        return self.host == socket.gethostname()

    @property
    def alive(self) -> bool:
        """Its process still runs (always True for another machine's: it cannot be checked)."""
        return not self.here or pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (someone else's live process counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def mark_text() -> str:
    """This process's mark, as written into a marker file."""
    return f"{os.getpid()} {socket.gethostname()}\n"


def write_mark(path: Path) -> None:
    """Write this process's mark to `path` (replacing what is there)."""
    path.write_text(mark_text())


def read_mark(path: Path) -> Mark | None:
    """The mark in `path`, or None when it is missing or not a mark."""
    try:
        pid, host = path.read_text().split()
        return Mark(int(pid), host)
    except (OSError, ValueError):
        return None
