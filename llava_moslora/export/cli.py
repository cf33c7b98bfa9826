"""`llava-moslora export CKPT --config CFG --to FORMAT OUT`."""

from __future__ import annotations

import argparse
import logging
import sys

from .manifest import DTYPES, FORMATS


def _export(args: argparse.Namespace) -> int:
    from ..runs import CheckpointMismatchError
    from .exporter import UnsupportedFormatError, export

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("llava_moslora.export").setLevel(logging.INFO)
    try:
        manifest = export(
            args.checkpoint,
            args.config,
            args.to,
            args.out,
            dtype=args.dtype,
            cfg_options=args.cfg_options,
            overwrite=args.overwrite,
        )
    except UnsupportedFormatError as error:  # another `--to` works: a usage error
        print(f"error: {error}", file=sys.stderr)
        return 2
    # OSError: FileExistsError, FileNotFoundError, and transformers' "couldn't connect" for a
    # config whose base models are hub ids that are not cached, offline.
    except (CheckpointMismatchError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote a {manifest.format} export ({manifest.dtype}) to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `export` sub-command to the `llava-moslora` parser.

    Export reads runs through mmengine and XTuner; where they are absent (the hf5 environment)
    the command is still listed, so that `llava-moslora train --engine hf` can parse.
    """
    try:
        from mmengine.config import DictAction
    except ImportError:
        DictAction = "extend"  # noqa: N806 - the export itself then names what is missing

    parser = sub.add_parser(
        "export",
        help="turn an xtuner train checkpoint into XTuner / PEFT / HF LLaVA folders",
        description=(
            "xtuner: XTuner's LLaVA layout with MoSLoRA adapters (load with "
            "llava_moslora.moslora.load_adapter); peft-folded: the same with plain LoRA adapters "
            "(mixer folded into B) for stock PEFT, `xtuner chat --llava` and VLMEvalKit; hf-llava: "
            "a merged transformers LlavaForConditionalGeneration + LlavaProcessor (LLaMA "
            "backbones); merged-xtuner: merged llm/, visual_encoder/, projector/ (any backbone). "
            "Every export writes llava_moslora_export.json."
        ),
    )
    parser.add_argument(
        "checkpoint", metavar="CKPT", help="iter_N.pth file, or DeepSpeed iter_N.pth/ folder"
    )
    parser.add_argument("out", metavar="OUT", help="output folder (new, or empty)")
    parser.add_argument(
        "--config", required=True, help="the XTuner config the checkpoint was trained with"
    )
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=DTYPES,
        help="dtype of the written weights (merges are computed in float32)",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config settings as in `xtuner train`, e.g. model.llm_lora.r=16",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in OUT: only if OUT holds nothing but the files its "
        "manifest lists (never the checkpoint, config or files you added); swapped in atomically",
    )
    parser.set_defaults(func=_export)
