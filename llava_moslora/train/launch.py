"""`llava-moslora train CONFIG [xtuner train's arguments]`: XTuner's launcher, with an exit code.

XTuner 0.2.0's `xtuner train` starts `python xtuner/tools/train.py ARGS` (or `torchrun ... ARGS
--launcher pytorch` when NPROC_PER_NODE or NNODES is above 1) and returns 0 whatever the child
returned, so a crashed or refused run looks like a finished one to a scheduler, a script or CI.

This command starts the same child the same way, from the same environment variables (NNODES,
NPROC_PER_NODE, NODE_RANK, ADDR, PORT; `--launcher slurm` runs one process, as XTuner does), but:

    parent   python -m torch.distributed.run [--nnodes ...] -m llava_moslora.train.launch ARGS
    child    llava_moslora.train.launch: XTuner's own `tools/train.py` main(), unchanged

and returns the child's exit code. Before it starts the child, the parent checks what it can
without XTuner (preflight.py: environment, `--cfg-options`, the config, the adapter options, the
model paths; one `error:` line, exit code 2) and claims the work dir for this run (work_dir.py:
a lock naming its PID while it trains, no other run's checkpoints unless `--resume`). The child
turns the errors a user can fix (the data check's bad samples, a missing or unreadable data file,
config or model path, a checkpoint refused as unsafe or corrupt) into one `error:` line that says
what is wrong and where, exit code 2; anything else is a crash and keeps its traceback (exit 1).
`xtuner train CONFIG` keeps working for users who call XTuner directly.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .preflight import Launcher, TrainInputError

USAGE_ERROR = 2  # what the child returns for an input the user can fix; argparse uses 2 as well


def parse_cfg_options(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` items as a dict, each value parsed as `xtuner train --cfg-options` parses it."""
    from mmengine.config import DictAction

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(
                f"`--cfg-options` items should be KEY=VALUE but the value passed is {item!r}. "
                "Write e.g. model.llm_lora.r=2."
            )
        options[key] = DictAction._parse_iterable(value)
    return options


def launch_command(args: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The command `xtuner train ARGS` would run, with this module as the child (`env`: the
    environment it reads, os.environ as it is when called by default)."""
    env = os.environ if env is None else env
    args = list(args)
    slurm = "--launcher" in args and args[args.index("--launcher") + 1 :][:1] == ["slurm"]
    launcher = Launcher.from_env(env)  # TrainInputError for a value that is not a number
    child = ["-m", __name__, *args]
    if slurm or (launcher.nnodes == 1 and launcher.nproc_per_node == 1):
        return [sys.executable, *child]
    port = launcher.port or random.randint(20000, 29999)  # XTuner's choice
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",  # `torchrun`, from this interpreter's environment
        f"--nnodes={launcher.nnodes}",
        f"--node_rank={launcher.node_rank}",
        f"--nproc_per_node={launcher.nproc_per_node}",
        f"--master_addr={env.get('ADDR', '127.0.0.1')}",
        f"--master_port={port}",
        *child,
        "--launcher",
        "pytorch",
    ]


@dataclass(frozen=True)
class Prepared:
    """A checked training: the child's arguments and the work dir it claims (None: another
    node or task of the same run claims it)."""

    args: list[str]
    work_dir: Path | None


def prepare(args: Sequence[str], env: Mapping[str, str], log=print) -> Prepared:
    """Check the inputs of `train(args)` before XTuner starts (preflight.py); TrainInputError
    (or WorkDirError) says what to fix in one line."""
    from . import preflight
    from .work_dir import check_no_other_run, default_work_dir

    launcher = Launcher.from_env(env)
    known = preflight.parse_args(args)
    try:
        options = parse_cfg_options(known.cfg_options)
    except ValueError as error:
        raise TrainInputError(str(error)) from None
    cfg = preflight.read_config(known.config)
    derived = preflight.merge_options(cfg, options)
    for item in derived:
        log(
            f"note: {item} (derived again from the `--cfg-options` override; see "
            "llava_moslora/builders/vision_layers.py)"
        )
    work_dir = Path(known.work_dir or cfg.get("work_dir") or default_work_dir(known.config))
    resuming = known.resume is not None or cfg.get("resume") is True
    first = launcher.node_rank == 0 and (
        known.launcher != "slurm" or env.get("SLURM_PROCID", "0") == "0"
    )
    if first:
        check_no_other_run(work_dir, resuming)
    preflight.check_adapters(cfg)
    preflight.check_model_paths(cfg)
    preflight.check_deepspeed(cfg, known.deepspeed)
    child_args = [*args, "--cfg-options", *derived] if derived else list(args)
    return Prepared(child_args, work_dir if first else None)


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM / SIGHUP raise SystemExit here, so the child is stopped and the lock released
    (their default would end this process at once and leave both behind)."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(args: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Check `args` (`prepare`), claim the work dir, run `launch_command(args)`; return the
    child's exit code (torchrun's, when distributed), or USAGE_ERROR for an input to fix."""
    from .work_dir import acquire, release

    env = os.environ if env is None else env

    def note(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        prepared = prepare(args, env, log=note)
        command = launch_command(prepared.args, env)
        lock = acquire(prepared.work_dir, note) if prepared.work_dir is not None else None
    except TrainInputError as error:  # WorkDirError included
        print(f"error: training refused: {error}", file=sys.stderr)
        return USAGE_ERROR
    try:
        with _terminate_as_exit():
            return subprocess.run(command).returncode
    finally:
        if lock is not None:
            release(lock)


def user_error(error: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a crash."""
    from huggingface_hub.errors import HFValidationError

    from llava_moslora.data.check import DataFileError
    from llava_moslora.data.dataset import BadSamplesError
    from llava_moslora.hub import one_line
    from llava_moslora.moslora.safety import CorruptCheckpointError, UnsafeCheckpointError

    # A checkpoint refused as unsafe or corrupt: `--resume`, `load_from`, `pretrained_pth`.
    refused = UnsafeCheckpointError | CorruptCheckpointError
    if isinstance(error, BadSamplesError | DataFileError | refused):
        return str(error)
    if isinstance(error, HFValidationError):
        # transformers took a local path that does not exist for a hub id
        return f"{error}. If this is a local path, it does not exist: check the config's paths."
    if isinstance(error, OSError):  # FileNotFoundError, transformers' "Incorrect path_or_model_id"
        return one_line(error)  # transformers' "couldn't connect" spans two lines
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The child: XTuner's `tools/train.py` main() with `argv` as its arguments."""
    from xtuner.tools import train as xtuner_train

    sys.argv = [xtuner_train.__file__, *(sys.argv[1:] if argv is None else argv)]
    try:
        xtuner_train.main()
    except Exception as error:
        message = user_error(error)
        if message is None:
            raise
        print(f"error: training refused: {message}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
