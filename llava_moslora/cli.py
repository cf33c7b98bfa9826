"""`llava-moslora`: the command-line entry point."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommands that live next to their code: each module has `register(sub)`, which adds its
# parser(s) to the `llava-moslora` sub-parsers and sets `func` on them.
COMMAND_MODULES: tuple[str, ...] = (
    "llava_moslora.export.cli",
    "llava_moslora.train.cli",
    "llava_moslora.eval.cli",
    "llava_moslora.ablate.cli",
    "llava_moslora.plan.cli",
)
# make_tiny.TASKS (a test checks they agree), spelled out so `--help` does not import torch.
TASKS = ("shapes", "compositional")
# standin.STANDINS' names (a test checks they agree), spelled out for the same reason.
STANDIN_NAMES = ("llama3-8b", "vicuna-7b", "qwen2.5-7b", "internlm2-7b", "mid")


def _standin_options(args: argparse.Namespace) -> int:
    from .builders.standin import path_overrides, standin_paths

    paths = standin_paths(args.dir)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        print(
            f"error: {args.dir} is no stand-in folder: missing {', '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    print(" ".join(f"{k}={v}" for k, v in path_overrides(args.config, paths).items()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    results = run_demo(steps=args.steps, r=args.r, lr=args.lr, seed=args.seed)
    # The demo is also a smoke check: both adapters must have learned something.
    failed = [res.name for res in results if res.losses[-1] >= res.losses[0]]
    if failed:
        print(f"error: the loss did not fall for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _score_base(model, tokenizer, image_processor, items_path) -> dict[str, float]:
    """Held-out accuracy of a pretrained base (in memory) on the items at `items_path`, and the
    chance level of those items: what `make-tiny --pretrain` records for each family."""
    from pathlib import Path

    from xtuner.utils import PROMPT_TEMPLATE

    from .builders.pretrain import TEMPLATE
    from .data.items import read_eval_items
    from .eval.heldout import chance_accuracy, score_items

    items = read_eval_items(items_path)
    accuracy = score_items(
        model, tokenizer, image_processor, items, Path(items_path).parent, PROMPT_TEMPLATE[TEMPLATE]
    ).accuracy()
    return {**accuracy, "chance": chance_accuracy(items)}


def _pretrain(args: argparse.Namespace) -> int:
    from .builders.pretrain import PretrainSpec, pretrain_tiny

    try:
        spec = PretrainSpec(
            seed=args.seed,
            hidden_size=args.hidden_size,
            samples=args.samples if args.samples is not None else PretrainSpec.samples,
            steps=args.pretrain,
        )
        base = pretrain_tiny(args.dir, spec, score=_score_base)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    record = base.record
    print(
        f"{'reused' if base.reused else 'built'}: {base.dir} (built in {record['seconds']:.0f} s)"
    )
    for family in ("a", "b"):
        scores = record.get(f"family_{family}_test", {})
        if scores:
            print(
                f"family {family.upper()} test: {100 * scores['overall']:.1f} % "
                f"(chance {100 * scores['chance']:.1f} %; "
                + ", ".join(
                    f"{k} {v:.2f}" for k, v in scores.items() if k not in ("overall", "chance")
                )
                + ")"
            )
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from .builders.make_tiny import check_out_dir, make_tiny, record_written

    if args.verdict_steps is not None:
        from .builders.verdict import check_steps

        if args.pretrain is not None or args.shape != "tiny" or args.task != "shapes":
            print(
                "error: `--verdict-steps` trains the random LLM of the tiny shapes LLaVA: drop "
                "`--pretrain` / `--shape` / `--task`",
                file=sys.stderr,
            )
            return 2
        try:
            check_steps(args.verdict_steps)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.pretrain is not None:
        if args.shape != "tiny" or args.task != "shapes":
            print(
                "error: `--pretrain` builds the tiny shapes LLaVA: drop `--shape` / `--task`",
                file=sys.stderr,
            )
            return 2
        return _pretrain(args)
    try:
        check_out_dir(args.dir, overwrite=args.overwrite)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.shape != "tiny":
        from .builders.standin import make_standin

        try:
            paths = make_standin(
                args.dir,
                args.shape,
                llm_layers=args.llm_layers,
                vit_layers=args.vit_layers,
                samples=args.samples if args.samples is not None else 32,
                seed=args.seed,
            )
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        record_written(args.dir)
        for name, path in paths.items():
            print(f"{name:>11}: {path}")
        return 0
    if args.llm_layers is not None or args.vit_layers is not None:
        print("error: `--llm-layers` / `--vit-layers` go with `--shape`", file=sys.stderr)
        return 2
    rounds = tuple(fmt for fmt in args.benchmark_rounds.split(",") if fmt)
    try:
        paths = make_tiny(
            args.dir,
            seed=args.seed,
            samples=args.samples if args.samples is not None else 320,
            task=args.task,
            benchmark_rounds=rounds,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.verdict_steps is not None:
        from .builders.verdict import teach_verdict

        teach_verdict(paths, steps=args.verdict_steps, seed=args.seed)
    record_written(args.dir)
    for name, path in paths.items():
        print(f"{name:>11}: {path}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from .data.check import DataFileError, check_data

    tokenizer = template_map_fn = None
    if (args.tokenizer is None) != (args.max_length is None):
        print(
            "error: `--tokenizer` and `--max-length` go together: the length check needs both",
            file=sys.stderr,
        )
        return 2
    if args.tokenizer is not None:
        import transformers
        from xtuner.dataset.map_fns import template_map_fn_factory
        from xtuner.utils import PROMPT_TEMPLATE

        from .hub import HubUnreachableError, load_tokenizer

        if args.template not in PROMPT_TEMPLATE:
            print(
                f"error: `--template` should be one of XTuner's PROMPT_TEMPLATE names "
                f"{sorted(PROMPT_TEMPLATE)}, got {args.template!r}",
                file=sys.stderr,
            )
            return 2
        try:
            tokenizer = load_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
        except HubUnreachableError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        template_map_fn = template_map_fn_factory(PROMPT_TEMPLATE[args.template])
        # The check encodes untruncated on purpose; transformers' "longer than the specified
        # maximum sequence length" warning would only confuse its report.
        transformers.utils.logging.set_verbosity_error()
    try:
        report = check_data(
            args.data,
            args.images,
            tokenizer=tokenizer,
            max_length=args.max_length,
            image_tokens=args.image_tokens,
            template_map_fn=template_map_fn,
            decode_images=not args.skip_image_decode,
            workers=args.workers,
            tokenize_workers=args.tokenize_workers,
            progress=not args.no_progress,
        )
    except (DataFileError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    checks = "images " + ("decoded" if report.images_decoded else "found (not decoded)")
    checks += ", lengths checked" if report.lengths_checked else ", lengths not checked"
    rate = report.total / report.seconds if report.seconds else float("inf")
    print(
        f"checked {report.total} samples, {report.images_checked} distinct images ({checks}) "
        f"in {report.seconds:.1f} s ({rate:.0f} samples/s)"
    )
    print(report.summary(first=args.first))
    return 0 if report.ok else 1


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

    from .data.synthetic import BENCHMARK_FORMATS, BENCHMARK_ROUNDS

    tiny = sub.add_parser(
        "make-tiny",
        help="write a tiny LLaVA (LLaMA-3-shaped LLM, CLIP ViT, projector, synthetic data) to DIR",
    )
    tiny.add_argument("dir", help="output folder (configs/tiny_*.py read $LLAVA_MOSLORA_TINY_DIR)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--samples",
        type=int,
        help="synthetic training samples (320; 32 with --shape; 1000 per family with --pretrain)",
    )
    tiny.add_argument(
        "--shape",
        default="tiny",
        choices=("tiny",) + STANDIN_NAMES,
        help="tiny (default): toy widths; llama3-8b / internlm2-7b: the paper's towers at their "
        "real widths with few layers and 2048-position samples (llava_moslora/builders/standin.py); "
        "mid: hidden 1024, the CPU benchmark size",
    )
    tiny.add_argument("--llm-layers", type=int, help="LLM layers of a --shape stand-in")
    tiny.add_argument("--vit-layers", type=int, help="ViT layers of a --shape stand-in")
    tiny.add_argument(
        "--task",
        default="shapes",
        choices=TASKS,
        help="training data: synthetic shapes (default) or the compositional task "
        "(llava_moslora/data/compositional.py, with held-out evaluation items)",
    )
    tiny.add_argument(
        "--benchmark-rounds",
        default=",".join(BENCHMARK_ROUNDS),
        metavar="FORMATS",
        help="benchmark-format rounds per shapes conversation, comma-separated from "
        f"{', '.join(BENCHMARK_FORMATS)} ('' for none); mcq_text answers a multiple-choice "
        "question with the option's text, mcq with its letter; default: %(default)s",
    )
    tiny.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files of the same names in DIR that make-tiny did not write (by default "
        "it refuses, naming them; files listed in DIR/make_tiny_files.json are its own)",
    )
    tiny.add_argument(
        "--verdict-steps",
        type=int,
        metavar="STEPS",
        help="then align the projector on captions (LLaVA's stage 1, 300 steps) and train the "
        "LLM STEPS steps on the yes/no verdict after the picture's words (the yes_no_read "
        "format): the tiny stand-in for a pretrained projector and language pretraining "
        "(llava_moslora/builders/verdict.py); without it the LLM and projector stay random",
    )
    tiny.add_argument(
        "--hidden-size", type=int, default=64, help="both towers' width with --pretrain (64)"
    )
    tiny.add_argument(
        "--pretrain",
        nargs="?",
        type=int,
        const=400,
        metavar="STEPS",
        help="train every weight of the tiny LLaVA for STEPS (400) optimizer steps on question "
        "family A (colour, shape) and save it as the base, with family B (count questions) to "
        "adapt on (llava_moslora/builders/pretrain.py); DIR is a cache: the same arguments reuse it",
    )
    tiny.set_defaults(func=_make_tiny)

    options = sub.add_parser(
        "standin-options",
        help="print the --cfg-options (paths only) that point CONFIG at the stand-in in DIR",
    )
    options.add_argument("config", help="e.g. configs/llama3_moslora.py")
    options.add_argument("dir", help="a make-tiny folder")
    options.set_defaults(func=_standin_options)

    check = sub.add_parser(
        "check-data",
        help="find the samples of a LLaVA-format dataset that would break or vanish in training",
        description="Exit status 1 when any sample has an error, 0 when all pass.",
    )
    check.add_argument("--data", required=True, help="LLaVA JSON/JSONL (llava_v1_5_mix665k.json)")
    check.add_argument("--images", required=True, help="folder the `image` paths are relative to")
    check.add_argument(
        "--tokenizer", help="tokenizer path or hub id: with --max-length, finds over-long samples"
    )
    check.add_argument(
        "--max-length",
        type=int,
        help="the config's max_length (XTuner's, which counts <image> as one token: 2048 - 576)",
    )
    check.add_argument(
        "--image-tokens",
        type=int,
        default=1,
        help="positions one <image> takes in --max-length: 1 as in XTuner (default), or e.g. "
        "576 with --max-length 2048 to count against the LLM's whole context",
    )
    check.add_argument(
        "--template", default="llama3_chat", help="XTuner PROMPT_TEMPLATE name (llama3_chat)"
    )
    check.add_argument("--trust-remote-code", action="store_true", help="for the tokenizer")
    check.add_argument(
        "--skip-image-decode",
        action="store_true",
        help="only check that image files exist (fast); by default every image is decoded",
    )
    check.add_argument("--workers", type=int, help="image-check threads (default 4 per CPU, <=32)")
    check.add_argument(
        "--tokenize-workers", type=int, help="tokenizing processes (default: CPUs, <=16)"
    )
    check.add_argument("--first", type=int, default=5, help="offending ids shown per problem")
    check.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    check.set_defaults(func=_check_data)

    machine = sub.add_parser(
        "machine",
        help="print the machine a measurement runs on (CPU, kernel-selecting flags, numeric pins, "
        "stack versions) as Markdown, for the results files",
    )
    machine.set_defaults(func=_machine)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _machine(args: argparse.Namespace) -> int:
    from .machine import describe_machine

    print(describe_machine())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
