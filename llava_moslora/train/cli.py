"""Sub-commands for training and looking into a run: `train`, `plot-diagnostics`.

Registered into `llava-moslora` through `COMMAND_MODULES` in llava_moslora/cli.py; each import is
inside its command so `llava-moslora --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from .launch import train

    return train([args.config, *args.xtuner_args])


def _plot_diagnostics(args: argparse.Namespace) -> int:
    from .diagnostics import plot_diagnostics

    try:
        out = plot_diagnostics(args.work_dir, args.out)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `plot-diagnostics`."""
    train = sub.add_parser(
        "train",
        help="`xtuner train` that returns the training's exit code (non-zero when it fails)",
        description="Takes the arguments of `xtuner train` (--work-dir, --deepspeed, --resume, "
        "--seed, --cfg-options, --launcher) and its environment variables (NPROC_PER_NODE, "
        "NNODES, NODE_RANK, ADDR, PORT). Exit code: 0 when training finished, 2 for an input to "
        "fix (a bad adapter option, config, --cfg-options item or environment variable, bad "
        "samples, a missing data file or model path, a work dir in use by another training or "
        "holding another run's checkpoints without --resume; one `error:` line), anything else "
        "for a crash.",
    )
    train.add_argument("config", help="an XTuner config, e.g. configs/llama3_moslora.py")
    train.add_argument(
        "xtuner_args", nargs=argparse.REMAINDER, help="the rest of `xtuner train`'s arguments"
    )
    train.set_defaults(func=_train)

    plot = sub.add_parser(
        "plot-diagnostics",
        help="plot the mixer diagnostics of a run (distance, condition number, effective rank)",
        description="Reads WORK_DIR/mixer_diagnostics.jsonl, written by MixerDiagnosticsHook.",
    )
    plot.add_argument("work_dir", help="the run's work dir (xtuner train --work-dir)")
    plot.add_argument("--out", help="PNG to write (default WORK_DIR/mixer_diagnostics.png)")
    plot.set_defaults(func=_plot_diagnostics)
