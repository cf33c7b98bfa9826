"""`llava-moslora eval | report | radar | make-tiny-bench | eval-compositional`: the evaluation
subcommands.

llava-moslora eval OUT/ --suite paper9 [--datasets MMBench_DEV_EN,MME] [--work-dir eval_runs]
    [--judge-model gpt-4o-mini --judge-base-url URL --judge-api-key-env VAR] [--limit N]
llava-moslora eval OUT/ --score-only            # score saved predictions (e.g. once a judge is set)
llava-moslora eval OUT/ --suite tiny --data-root tiny_bench/   # offline (make-tiny-bench first)
llava-moslora eval OUT/ ... --overwrite | --reuse     # into a run folder with earlier predictions
llava-moslora report eval_runs/*/ --out table   # table.md + table.csv (Table 5)
llava-moslora radar eval_runs/*/ --out mmbench_radar.png      # Figure 5
llava-moslora make-tiny-bench tiny_bench/       # the offline TSVs only
llava-moslora eval-compositional CONFIG [--checkpoint iter_N.pth]   # held-out items, no VLMEvalKit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _eval(args: argparse.Namespace) -> int:
    from .benchmarks import resolve_datasets
    from .manifest import export_identity, read_export_manifest
    from .offline import LMU_ENV
    from .runner import check_run_name

    try:
        datasets = resolve_datasets(args.suite, args.datasets)
        run_name = check_run_name(args.run_name or Path(args.model_dir).resolve().name)
        if args.data_root is not None:
            root = Path(args.data_root)
            if not root.is_dir():
                if not args.create_data_root or root.exists():
                    return _error(
                        f"`--data-root` {str(root)!r} is not a folder; check the path, or pass "
                        "`--create-data-root` to create it (with `--suite tiny`, the tiny "
                        "benchmarks are then written there)."
                    )
                root.mkdir(parents=True)
            os.environ[LMU_ENV] = str(root.resolve())
        manifest = read_export_manifest(args.model_dir)
    except (ValueError, FileNotFoundError) as error:
        return _error(str(error))

    offline = args.offline or args.suite == "tiny" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if args.suite == "tiny":
        from .offline import data_root
        from .tiny_bench import has_tiny_bench, write_tiny_bench

        try:
            root = data_root()
        except FileNotFoundError as error:
            return _error(str(error))
        if not has_tiny_bench(root):
            if not args.create_data_root:
                return _error(
                    f"the data root {str(root)!r} lacks the tiny benchmarks; write them with "
                    f"`llava-moslora make-tiny-bench {root}`, or pass `--create-data-root`."
                )
            write_tiny_bench(root)
            print(f"wrote the tiny offline benchmarks to {root}")

    from .model import GenerationSettings, LLaVAMoSLoRA
    from .offline import OfflineError
    from .runner import SUMMARY_NAME, resolve_judge, run_benchmarks

    try:
        judge = resolve_judge(args.judge_model, args.judge_base_url, args.judge_api_key_env)
        generation = GenerationSettings(
            max_new_tokens=args.max_new_tokens, short_max_new_tokens=args.short_max_new_tokens
        )
        if args.score_only and args.datasets is None:
            from .runner import load_summary

            previous = load_summary(Path(args.work_dir) / run_name)["benchmarks"]
            datasets = [n for n, entry in previous.items() if entry["status"] == "pending"]
            if not datasets:
                print("nothing pending: every benchmark of this run is scored already")
                return 0
        export = {
            "dir": str(Path(args.model_dir).resolve()),
            "identity": export_identity(args.model_dir, manifest),
        }
        summary = run_benchmarks(
            datasets,
            work_dir=args.work_dir,
            run_name=run_name,
            model_factory=lambda: LLaVAMoSLoRA(
                args.model_dir, generation=generation, trust_remote_code=args.trust_remote_code
            ),
            manifest=manifest,
            export=export,
            generation=generation.as_dict() if not args.score_only else None,
            judge=judge,
            limit=args.limit,
            score_only=args.score_only,
            offline=offline,
            overwrite=args.overwrite,
            reuse=args.reuse,
            textvqa_ocr=args.textvqa_ocr,
        )
    except (ValueError, FileNotFoundError, OfflineError) as error:
        return _error(str(error))

    run_dir = Path(args.work_dir) / run_name
    for name, entry in summary["benchmarks"].items():
        if name not in datasets:
            continue
        score = entry.get("score")
        shown = f"{score:.2f} ({entry.get('unit')})" if score is not None else entry["status"]
        print(f"{name:>22}: {shown}" + (f"  — {entry['note']}" if entry.get("note") else ""))
    if summary["pending"]:
        print(f"PENDING (no judge): {', '.join(summary['pending'])}; see {run_dir / SUMMARY_NAME}")
    print(f"results: {run_dir / SUMMARY_NAME}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import versus_chance, write_table

    try:
        chance = None
        if args.chance_from is not None:
            from .tiny_bench import chance_scores

            chance = chance_scores(args.chance_from)
        md_path, csv_path = write_table(args.run_dirs, args.out, chance)
    except (ValueError, FileNotFoundError) as error:
        return _error(str(error))
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path}")
    if chance is not None:
        print("\n".join(versus_chance(args.run_dirs, chance)))
    if args.radar:
        return _radar(
            argparse.Namespace(
                run_dirs=args.run_dirs, out=args.radar, mmbench_split=args.mmbench_split
            )
        )
    return 0


def _radar(args: argparse.Namespace) -> int:
    from .report import draw_radar

    try:
        path = draw_radar(args.run_dirs, args.out, split=args.mmbench_split)
    except (ValueError, FileNotFoundError) as error:
        return _error(str(error))
    print(f"wrote {path}")
    return 0


def _make_tiny_bench(args: argparse.Namespace) -> int:
    from .tiny_bench import write_tiny_bench

    records = write_tiny_bench(args.dir, seed=args.seed, per_category=args.per_category)
    for name, recs in records.items():
        print(f"{name}: {len(recs)} rows -> {Path(args.dir) / (name + '.tsv')}")
    print(f"use it with: LMUData={args.dir} (or `llava-moslora eval ... --data-root {args.dir}`)")
    return 0


def _eval_compositional(args: argparse.Namespace) -> int:
    from ..data.items import read_eval_items
    from ..train.launch import parse_cfg_options
    from .heldout import chance_accuracy, evaluate_run

    try:
        options = parse_cfg_options(args.cfg_options)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = evaluate_run(args.config, args.checkpoint, args.items, options)
    # ValueError: a checkpoint (or `pretrained_pth`) refused as unsafe, corrupt, non-finite or
    # not fitting the config; OSError: a missing file.
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.items:
        result["chance"] = chance_accuracy(read_eval_items(args.items))
    print(json.dumps(result, indent=1))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to `llava-moslora`'s sub-parsers."""
    from .benchmarks import MMBENCH_SPLITS, SUITES_DIR, suite_names

    ev = sub.add_parser(
        "eval",
        help="run VLMEvalKit benchmarks on an exported model (paper9 or the offline tiny suite)",
        description=f"Suites: the files of {SUITES_DIR} (one benchmark name per line).",
    )
    ev.add_argument("model_dir", help="a folder written by `llava-moslora export`")
    ev.add_argument("--suite", choices=suite_names(), default="paper9")
    ev.add_argument("--datasets", help="comma-separated subset of the suite (default: all of it)")
    ev.add_argument("--work-dir", default="eval_runs", help="results go to WORK_DIR/RUN_NAME/")
    ev.add_argument("--run-name", help="default: the model folder's name")
    ev.add_argument("--data-root", help="benchmark TSV folder (sets $LMUData); must exist")
    ev.add_argument(
        "--create-data-root",
        action="store_true",
        help="create `--data-root` if it does not exist and, with --suite tiny, write the tiny "
        "benchmarks there if they are absent",
    )
    ev.add_argument(
        "--overwrite",
        action="store_true",
        help="the run folder holds predictions (of this or another export): remove the files "
        "eval wrote there and predict afresh",
    )
    ev.add_argument(
        "--reuse",
        action="store_true",
        help="keep the run folder's predictions even if another export made them (as "
        "VLMEvalKit's run.py --reuse); recorded in the results",
    )
    ev.add_argument(
        "--textvqa-ocr",
        metavar="JSONL",
        help="ask TextVQA with LLaVA-1.5's own prompt (reference OCR tokens), verbatim from its "
        "question file llava_textvqa_val_v051_ocr.jsonl; recorded as the prompt variant",
    )
    ev.add_argument("--judge-model", help="OpenAI-compatible judge model (MathVista, MM-Vet)")
    ev.add_argument("--judge-base-url", help="judge API root, e.g. http://host:8000/v1")
    ev.add_argument(
        "--judge-api-key-env", help="environment variable holding the judge key (OPENAI_API_KEY)"
    )
    ev.add_argument(
        "--limit",
        type=int,
        help="first N questions per benchmark (smoke tests; MME rounded up to whole pairs)",
    )
    ev.add_argument("--score-only", action="store_true", help="score saved predictions only")
    ev.add_argument(
        "--offline",
        action="store_true",
        help="any download or network use is an error (always on for --suite tiny)",
    )
    ev.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running model code shipped with the export or its base model (needed for "
        "backbones transformers does not include, e.g. InternLM2); only for folders you trust",
    )
    ev.add_argument("--max-new-tokens", type=int, default=512)
    ev.add_argument("--short-max-new-tokens", type=int, default=32, help="MCQ, yes/no, TextVQA")
    ev.set_defaults(func=_eval)

    rep = sub.add_parser("report", help="Table 5 (Markdown + CSV) from eval runs")
    rep.add_argument("run_dirs", nargs="+", help="WORK_DIR/RUN_NAME folders")
    rep.add_argument(
        "--out", default="table", help="writes OUT.md and OUT.csv (OUT may end in .md or .csv)"
    )
    rep.add_argument("--radar", help="also draw the MMBench radar to this PNG")
    rep.add_argument("--mmbench-split", default="dev", choices=MMBENCH_SPLITS, help="radar's split")
    rep.add_argument(
        "--chance-from",
        metavar="DATA_ROOT",
        help="the tiny benchmarks' folder: add a row with a random guesser's scores on them",
    )
    rep.set_defaults(func=_report)

    rad = sub.add_parser("radar", help="MMBench ability radar (Figure 5) from eval runs")
    rad.add_argument("run_dirs", nargs="+", help="WORK_DIR/RUN_NAME folders")
    rad.add_argument("--out", default="mmbench_radar.png")
    rad.add_argument(
        "--mmbench-split",
        default="dev",
        choices=MMBENCH_SPLITS,
        help="which MMBench split to plot: dev (v1.0, the paper's) or V1.1 test",
    )
    rad.set_defaults(func=_radar)

    tiny = sub.add_parser(
        "make-tiny-bench", help="write the offline tiny benchmark TSVs (a $LMUData folder)"
    )
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--per-category", type=int, default=2)
    tiny.set_defaults(func=_make_tiny_bench)

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
