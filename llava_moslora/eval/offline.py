"""Keeping VLMEvalKit off the network: every download attempt becomes an error that says why.

VLMEvalKit fetches a benchmark's TSV when it is missing from $LMUData or its md5 differs from the
one it knows (`ImageBaseDataset.prepare_tsv` → `download_file`), the hub loaders reach for
huggingface.co, and an LLM judge is an HTTP API. Offline, each of these would hang on timeouts or
retry loops instead of failing. `no_network()` turns them into an immediate `OfflineError`:

- HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE = 1 for the hub libraries;
- VLMEvalKit's `download_file`, in every module that imported it, raises;
- any TCP connect to a host not explicitly allowed (e.g. a local judge) raises.

`local_tsv` runs first for a known benchmark, so the usual case (data not copied yet) reads as
"put MMVet.tsv with md5 X in $LMUData" rather than as a failed download, and a local TSV whose md5
is not VLMEvalKit's is used as it is, with a warning naming both md5s, never re-downloaded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

LMU_ENV = "LMUData"  # VLMEvalKit's data-root variable, spelled its way
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class OfflineError(RuntimeError):
    """Something tried to reach the network while evaluation runs offline."""


def data_root() -> Path:
    """VLMEvalKit's data root ($LMUData), refusing its silent fallback to ~/LMUData.

    VLMEvalKit's LMUDataRoot() ignores a $LMUData that does not exist and uses ~/LMUData instead,
    which would make a typo look like "benchmark missing, downloading".
    """
    value = os.environ.get(LMU_ENV)
    if value is None:
        return Path.home() / "LMUData"
    if not Path(value).is_dir():
        raise FileNotFoundError(
            f"`LMUData` is {value!r}, which is not a folder; create it or point $LMUData (or "
            "`--data-root`) at the folder holding the benchmark TSVs."
        )
    return Path(value)


def listed_tsv(name: str) -> tuple[type | None, str | None, str | None]:
    """(VLMEvalKit's class, download URL, listed md5) of benchmark `name`; Nones for a name
    VLMEvalKit does not download (a custom TSV, read as it is)."""
    from vlmeval.dataset import DATASET_CLASSES

    owner = next((cls for cls in DATASET_CLASSES if name in cls.supported_datasets()), None)
    url = getattr(owner, "DATASET_URL", {}).get(name) if owner is not None else None
    if not url:
        return owner, None, None
    return owner, url, getattr(owner, "DATASET_MD5", {}).get(name)


def local_tsv(name: str, *, offline: bool) -> dict[str, str | None]:
    """What VLMEvalKit will read for benchmark `name`: {"file", "md5", "listed_md5"}.

    A TSV in $LMUData whose md5 differs from VLMEvalKit's list (an older or newer release, e.g.
    MMBench V1.1 before VLMEvalKit's 2026-06-18 md5 change) is the user's file: it is used as
    it is, never replaced by a download (`build_benchmark` skips VLMEvalKit's md5 check for it),
    and the caller warns with both md5s. A missing file is an OfflineError offline; online,
    VLMEvalKit downloads it (md5 then None here: the caller records it after the build).
    """
    from vlmeval.smp import md5

    owner, url, listed = listed_tsv(name)
    path = data_root() / f"{name}.tsv"
    if not path.is_file():
        if offline and url:
            raise OfflineError(
                f"`--datasets` {name}: {path} does not exist and evaluation is offline, so "
                f"VLMEvalKit cannot download it from {url}. Copy {name}.tsv"
                f"{f' (md5 {listed})' if listed else ''} into $LMUData, or run without --offline."
            )
        return {"file": path.name, "md5": None, "listed_md5": listed}
    return {"file": path.name, "md5": md5(str(path)), "listed_md5": listed}


@contextlib.contextmanager
def no_network(allow_hosts: tuple[str, ...] = ()) -> Iterator[None]:
    """Within the block, downloads and TCP connections (except to `allow_hosts`) raise OfflineError."""
    saved_env = {key: os.environ.get(key) for key in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)

    def refuse_download(url: str, filename: str | None = None, *args, **kwargs):
        raise OfflineError(
            f"VLMEvalKit tried to download {url} (to {filename}) while evaluation is offline. Put "
            "the file in $LMUData yourself, or run without --offline."
        )

    patched = []
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if name.startswith("vlmeval") and hasattr(module, "download_file"):
            patched.append((module, module.download_file))
            module.download_file = refuse_download

    real_connect = socket.socket.connect
    allowed: set[str] = set()

    def guarded_connect(sock: socket.socket, address, *args, **kwargs):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) else str(address)
            if host not in allowed:
                raise OfflineError(
                    f"a network connection to {host} was attempted while evaluation is offline "
                    "(no downloads, no judge API); run without --offline to allow it."
                )
        return real_connect(sock, address, *args, **kwargs)

    allowed = set(allow_hosts)
    for host in allow_hosts:  # connect() sees addresses, not names: allow what the names resolve to
        with contextlib.suppress(OSError):
            allowed.update(info[4][0] for info in socket.getaddrinfo(host, None))
    socket.socket.connect = guarded_connect
    try:
        yield
    finally:
        socket.socket.connect = real_connect
        for module, original in patched:
            module.download_file = original
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
