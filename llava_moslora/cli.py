"""`llava-moslora`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    results = run_demo(steps=args.steps, r=args.r, lr=args.lr, seed=args.seed)
    # The demo is also a smoke check: both adapters must have learned something.
    failed = [res.name for res in results if res.losses[-1] >= res.losses[0]]
    if failed:
        print(f"error: the loss did not fall for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from .model.make_tiny import make_tiny

    paths = make_tiny(args.dir, seed=args.seed, samples=args.samples)
    for name, path in paths.items():
        print(f"{name:>9}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-moslora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="fine-tune a tiny LLaMA with LoRA and MoSLoRA on CPU, side by side"
    )
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--r", type=int, default=8)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    tiny = sub.add_parser(
        "make-tiny",
        help="write a tiny LLaVA (LLaMA-3-shaped LLM, CLIP ViT, projector, synthetic data) to DIR",
    )
    tiny.add_argument("dir", help="output folder (configs/tiny_*.py read $LLAVA_MOSLORA_TINY_DIR)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--samples", type=int, default=320, help="synthetic training samples")
    tiny.set_defaults(func=_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
