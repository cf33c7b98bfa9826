"""`llava-moslora train CONFIG [xtuner train's arguments]`: XTuner's launcher, with an exit code.

XTuner 0.2.0's `xtuner train` starts `python xtuner/tools/train.py ARGS` (or `torchrun ... ARGS
--launcher pytorch` when NPROC_PER_NODE or NNODES is above 1) and returns 0 whatever the child
returned, so a crashed or refused run looks like a finished one to a scheduler, a script or CI.

This command starts the same child the same way, from the same environment variables (NNODES,
NPROC_PER_NODE, NODE_RANK, ADDR, PORT; `--launcher slurm` runs one process, as XTuner does), but:

    parent   python -m torch.distributed.run [--nnodes ...] -m llava_moslora.train.launch ARGS
    child    llava_moslora.train.launch: XTuner's own `tools/train.py` main(), unchanged

and returns the child's exit code. The child turns the errors a user can fix (the data check's
bad samples, a missing or unreadable data file, config or model path, a checkpoint refused as
unsafe or corrupt) into one `error:` line that says what is wrong and where, exit code 2;
anything else is a crash and keeps its traceback (exit 1). `xtuner train CONFIG` keeps working for users who call XTuner directly.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

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


def launch_command(args: Sequence[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """The command `xtuner train ARGS` would run, with this module as the child."""
    args = list(args)
    slurm = "--launcher" in args and args[args.index("--launcher") + 1 :][:1] == ["slurm"]
    nnodes = int(env.get("NNODES", 1))
    nproc_per_node = int(env.get("NPROC_PER_NODE", 1))
    child = ["-m", __name__, *args]
    if slurm or (nnodes == 1 and nproc_per_node == 1):
        return [sys.executable, *child]
    port = env.get("PORT") or str(random.randint(20000, 29999))  # XTuner's choice
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",  # `torchrun`, from this interpreter's environment
        f"--nnodes={nnodes}",
        f"--node_rank={env.get('NODE_RANK', 0)}",
        f"--nproc_per_node={nproc_per_node}",
        f"--master_addr={env.get('ADDR', '127.0.0.1')}",
        f"--master_port={port}",
        *child,
        "--launcher",
        "pytorch",
    ]


def train(args: Sequence[str]) -> int:
    """Run `launch_command(args)`; return the child's exit code (torchrun's, when distributed)."""
    return subprocess.run(launch_command(args)).returncode


def user_error(error: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a crash."""
    from huggingface_hub.errors import HFValidationError

    from llava_moslora.data.check import DataFileError
    from llava_moslora.data.dataset import BadSamplesError
    from llava_moslora.moslora.safety import CorruptCheckpointError, UnsafeCheckpointError

    # A checkpoint refused as unsafe or corrupt: `--resume`, `load_from`, `pretrained_pth`.
    refused = UnsafeCheckpointError | CorruptCheckpointError
    if isinstance(error, BadSamplesError | DataFileError | refused):
        return str(error)
    if isinstance(error, HFValidationError):
        # transformers took a local path that does not exist for a hub id
        return f"{error}. If this is a local path, it does not exist: check the config's paths."
    if isinstance(error, OSError):  # FileNotFoundError, transformers' "Incorrect path_or_model_id"
        return str(error)
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
