"""`llava-moslora ablate`: the command-line face of runner.py and report.py."""

from __future__ import annotations

import argparse
import sys


def _ablate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .lr_grid import config_lr, parse_grid_seeds, parse_rates, run_lr_grid
    from .report import write_lr_grid_report, write_report
    from .runner import RESULT, VAL_RESULT, parse_evaluator, plan, run_all
    from .variants import parse_variants

    try:
        variants = parse_variants(args.variants)
        parse_evaluator(args.eval)
        if args.seeds < 1:
            raise ValueError(f"`--seeds` should be a positive integer, got {args.seeds}")
        if not Path(args.config).is_file():
            raise ValueError(f"`--config` {args.config!r} is not a file")
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        if args.lr_grid is not None:
            rates = parse_rates(args.lr_grid)
            grid_seeds = parse_grid_seeds(args.grid_seeds, seeds)
            if args.grid_widen < 0:
                raise ValueError(
                    f"`--grid-widen` should be a non-negative integer, got {args.grid_widen}"
                )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    title = f"Ablation of {Path(args.config).name}"
    if args.cfg_options:
        title += f" with {' '.join(args.cfg_options)}"
    common = dict(launcher=args.launcher, extra=args.cfg_options or [], evaluator=args.eval)
    try:
        if args.lr_grid is None:
            # scored on the validation split: its own record, so a test-split run reuses the training
            split = parse_evaluator(args.eval)[1] == "val"
            runs = plan(args.work_dir, variants, seeds, VAL_RESULT if split else RESULT)
            results = run_all(runs, args.config, **common)
            paths = write_report(results, args.work_dir, title=title)
        else:
            outcome = run_lr_grid(
                args.config,
                variants,
                seeds,
                rates,
                args.work_dir,
                shared_lr=config_lr(args.config),
                grid_seeds=grid_seeds,
                widen=args.grid_widen,
                **common,
            )
            paths = write_lr_grid_report(outcome, args.work_dir, title=title)
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(Path(paths["md"]).read_text())
    for kind, path in paths.items():
        print(f"{kind:>4}: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    ablate = sub.add_parser(
        "ablate",
        help="train and evaluate adapter variants x seeds; mean, 95%% CI, paired tests vs LoRA",
        description="Finished runs (VARIANT/seed_S/result.json under --work-dir) are not redone; "
        "rerun the same command to resume an interrupted ablation.",
    )
    ablate.add_argument("--config", required=True, help="base XTuner config (any MoSLoRA/LoRA one)")
    from llava_moslora.moslora.inits import MIXER_INITS

    from .variants import DEFAULT_VARIANTS, VARIANTS

    ablate.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated: {', '.join(VARIANTS)}, or moslora_<init> for any mixer init "
        f"({', '.join(MIXER_INITS)}); default: all but dora",
    )
    ablate.add_argument("--seeds", type=int, default=5, help="seeds per variant (default 5)")
    ablate.add_argument("--first-seed", type=int, default=0)
    ablate.add_argument("--work-dir", default="work_dirs/ablation")
    ablate.add_argument(
        "--eval",
        default="heldout",
        help="heldout (held-out test items of the config, option log-likelihood), heldout:val "
        "(its validation items) or suite:NAME (VLMEvalKit)",
    )
    ablate.add_argument(
        "--launcher",
        help="command that trains, in front of CONFIG (default: `llava-moslora train`), e.g. "
        "'srun -p gpu llava-moslora train'",
    )
    ablate.add_argument(
        "--cfg-options", nargs="+", help="KEY=VALUE overrides for every run (e.g. the rank)"
    )
    ablate.add_argument(
        "--lr-grid",
        metavar="RATES",
        help="comma-separated learning rates (at least 3, e.g. 5e-4,1e-3,2e-3): pick each "
        "variant's rate on the config's validation items over the --grid-seeds, widening its "
        "grid while its best rate is at an edge, then run every test seed at that rate and at "
        "the config's own shared rate; the report shows both",
    )
    ablate.add_argument(
        "--grid-seeds",
        default="100,101",
        help="comma-separated seeds of --lr-grid's runs, none of them a test seed (100,101)",
    )
    ablate.add_argument(
        "--grid-widen",
        type=int,
        default=2,
        help="at most this many rates, each a factor 2 further, added beyond each edge of "
        "--lr-grid for a variant whose best rate is at that edge (2; 0: none)",
    )
    ablate.set_defaults(func=_ablate)
    register_report(sub)


def _ablate_report(args: argparse.Namespace) -> int:
    from .summary import write_summary

    try:
        path = write_summary(args.dir)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"  md: {path}")
    return 0


def register_report(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "ablate-report",
        help="pool every `ablate --lr-grid` report under DIR: Holm over all their comparisons, "
        "paired TOST (equivalence) per comparison; writes DIR/summary.md",
    )
    report.add_argument(
        "dir", help="the folder holding one `--lr-grid` work dir per rank (r8/, ...)"
    )
    report.set_defaults(func=_ablate_report)
