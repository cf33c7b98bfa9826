"""Sub-commands for training and looking into a run: `train`, `plot-diagnostics`.

Registered into `llava-moslora` through `COMMAND_MODULES` in llava_moslora/cli.py; each import is
inside its command so `llava-moslora --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    if args.engine == "hf":
        return _train_hf(args.config, args.xtuner_args)
    from .launch import train

    return train([args.config, *args.xtuner_args])


def _train_hf(config: str, argv: list[str]) -> int:
    """`train --engine hf CONFIG ARGS`: the arguments of `xtuner train` the hf engine takes."""
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="llava-moslora train --engine hf CONFIG")
    parser.add_argument("--work-dir", help="default ./work_dirs/CONFIG_NAME, as XTuner's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="from WORK_DIR/last_checkpoint")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-iters", type=int, help="stop after this many iterations")
    parser.add_argument(
        "--deepspeed",
        metavar="PRESET",
        help="deepspeed_zero2 or deepspeed_zero3: XTuner's preset, through accelerate",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="fully shard the model (torch's FSDP2): one process, or several under torchrun",
    )
    parser.add_argument(
        "--write-recipe", metavar="FILE", help="only write the config's recipe (JSON) to FILE"
    )
    args = parser.parse_args(argv)
    from .hf_recipe import RecipeError, recipe_from_file, write_recipe

    try:
        options = None
        if args.cfg_options:
            from .launch import parse_cfg_options

            options = parse_cfg_options(args.cfg_options)
        recipe = recipe_from_file(config, options)
    except (RecipeError, ValueError) as error:
        print(f"error: training refused: {error}", file=sys.stderr)
        return 2
    if args.write_recipe:
        print(write_recipe(recipe, args.write_recipe))
        return 0
    from .hf_engine import train

    work_dir = args.work_dir or str(Path("work_dirs") / Path(config).stem)
    return train(
        recipe,
        work_dir,
        seed=args.seed,
        resume=args.resume,
        max_iters=args.max_iters,
        deepspeed=args.deepspeed,
        fsdp=args.fsdp,
    )


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
    train.add_argument(
        "--engine",
        choices=("xtuner", "hf"),
        default="xtuner",
        help="xtuner (default; transformers 4.57) or hf: the same recipe on transformers' "
        "LlavaForConditionalGeneration with a plain loop, no XTuner (transformers 4.57 or 5.x; "
        "takes --work-dir, --seed, --resume, --cfg-options, --max-iters, --deepspeed, --fsdp, --write-recipe FILE; "
        "CONFIG may then be a recipe .json). docs/training.md#two-engines",
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
