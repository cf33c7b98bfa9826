"""Sub-commands for training and looking into a run: `train`, `plot-diagnostics`,
`eval-compositional`.

Registered into `llava-moslora` through `COMMAND_MODULES` in llava_moslora/cli.py; each import is
inside its command so `llava-moslora --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
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


def _eval_compositional(args: argparse.Namespace) -> int:
    from ..data.compositional import chance_accuracy, evaluate_run, read_eval_items
    from .launch import parse_cfg_options

    try:
        options = parse_cfg_options(args.cfg_options)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = evaluate_run(args.config, args.checkpoint, args.items, options)
    if args.items:
        result["chance"] = chance_accuracy(read_eval_items(args.items))
    print(json.dumps(result, indent=1))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `plot-diagnostics` and `eval-compositional`."""
    train = sub.add_parser(
        "train",
        help="`xtuner train` that returns the training's exit code (non-zero when it fails)",
        description="Takes the arguments of `xtuner train` (--work-dir, --deepspeed, --resume, "
        "--seed, --cfg-options, --launcher) and its environment variables (NPROC_PER_NODE, "
        "NNODES, NODE_RANK, ADDR, PORT). Exit code: 0 when training finished, 2 for an input to "
        "fix (bad samples, a missing data file, config or model path; one `error:` line), "
        "anything else for a crash.",
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

    evaluate = sub.add_parser(
        "eval-compositional",
        help="held-out accuracy of a run (options scored by log-likelihood): the config's "
        "heldout_eval_path items, else the compositional task's",
        description="Prints per-category and overall accuracy as JSON. Without --checkpoint: "
        "the untrained model (adapters at init).",
    )
    evaluate.add_argument("config", help="e.g. configs/tiny_compositional_moslora.py")
    evaluate.add_argument("--checkpoint", help="iter_N.pth (file or DeepSpeed folder)")
    evaluate.add_argument(
        "--items",
        help="held-out items JSON (default: the config's heldout_eval_path, else "
        "compositional_eval.json next to its data_path)",
    )
    evaluate.add_argument(
        "--cfg-options",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides the run was trained with, e.g. model.llm_lora.r=2",
    )
    evaluate.set_defaults(func=_eval_compositional)
