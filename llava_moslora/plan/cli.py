"""`llava-moslora plan CONFIG --gpus N [--gpu-memory GiB] [--deepspeed zero2|zero3]`."""

from __future__ import annotations

import argparse
import sys


def _plan(args: argparse.Namespace) -> int:
    from ..train.launch import parse_cfg_options
    from .planner import format_plan, plan_memory

    try:
        options = parse_cfg_options(args.cfg_options)
        plan = plan_memory(
            args.config,
            gpus=args.gpus,
            gpu_memory_gib=args.gpu_memory,
            deepspeed=args.deepspeed,
            cfg_options=options,
            llm_layers=args.llm_layers,
            vit_layers=args.vit_layers,
            seq_len=args.seq_len,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `plan`."""
    plan = sub.add_parser(
        "plan",
        help="predict per-GPU memory of a config's run (weights, adapters, gradients, AdamW, "
        "activations) and the largest per-device batch that fits, without allocating weights",
        description="See llava_moslora/plan/planner.py for how each figure is computed.",
    )
    plan.add_argument("config", help="e.g. configs/llama3_moslora.py")
    plan.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (ZeRO shards)")
    plan.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB")
    plan.add_argument("--deepspeed", default="none", choices=("none", "zero2", "zero3"))
    plan.add_argument(
        "--llm-layers", type=int, help="plan at this LLM depth (e.g. 32 for a stand-in)"
    )
    plan.add_argument("--vit-layers", type=int, help="plan at this ViT depth")
    plan.add_argument(
        "--seq-len",
        type=int,
        help="LLM positions per sample (default: max_length - 1 + image tokens)",
    )
    plan.add_argument(
        "--cfg-options", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (paths)"
    )
    plan.set_defaults(func=_plan)
