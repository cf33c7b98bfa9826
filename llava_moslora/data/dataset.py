"""`CheckedLLaVADataset`: XTuner's LLaVADataset behind the `check_data` gate.

    llava_dataset = dict(type=CheckedLLaVADataset, data_path=..., image_folder=..., ...,
                         on_bad_samples="error")   # or "drop"

With "error" (the default) a dataset with any bad sample (see check.py) refuses to build, so
`xtuner train` stops before step 1 with the counts, the first ids and the fix of each problem,
instead of crashing in a DataLoader worker hours later or silently training on less data. With
"drop" the bad samples are logged (how many, which ids) and the rest is handed to XTuner's own
`LLaVADataset` through its public constructor, as a filtered copy of the JSON in a temporary file.

Under torch.distributed the check runs on rank 0 only (decoding 665K images once, not once per
GPU) and its report is broadcast, the way XTuner's `process_hf_dataset` shares its tokenization.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from mmengine import print_log
from mmengine.config import Config, ConfigDict
from xtuner.dataset import LLaVADataset
from xtuner.registry import BUILDER

from .check import DataReport, check_records, load_records

ON_BAD_SAMPLES = ("error", "drop")


class BadSamplesError(ValueError):
    """The training data has bad samples and the config did not ask to drop them."""


def _build(obj: Any) -> Any:
    """Build a config dict the way LLaVADataset would later; pass built objects through."""
    return BUILDER.build(obj) if isinstance(obj, (dict, Config, ConfigDict)) else obj


def _on_rank0(compute: Callable[[], DataReport]) -> DataReport:
    """`compute()` on rank 0 only, its result (or its exception) broadcast to every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    # Same timeout knob as XTuner's dataset processing; gloo carries Python objects on any backend.
    timeout = timedelta(minutes=int(os.getenv("XTUNER_DATASET_TIMEOUT", default=60)))
    group = dist.new_group(backend="gloo", timeout=timeout)
    result: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result[0] = compute()
        except Exception as error:  # re-raised on every rank, so none waits forever
            result[0] = error
    dist.broadcast_object_list(result, src=0, group=group)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


class CheckedLLaVADataset(LLaVADataset):
    """`xtuner.dataset.LLaVADataset` that checks its data first; see the module docstring.

    Takes LLaVADataset's arguments plus:
        on_bad_samples: "error" (refuse to build, listing the problems) or "drop" (log and skip).
        decode_images: decode every image with PIL (finds truncated/corrupt files; minutes for
            the 665K mix on rank 0); False checks only that the files exist.
        check_workers: threads for the image check (default: 4 per CPU, at most 32).

    The length check uses the configured tokenizer, template and `max_length`, so the samples
    it calls `too_long` are exactly the ones XTuner would otherwise filter out without a word.
    `data_report` keeps the full report and `dropped_ids` the ids that were left out.
    """

    def __init__(
        self,
        image_folder: str,
        image_processor: Any,
        data_path: str | None = None,
        tokenizer: Any = None,
        offline_processed_text_folder: str | None = None,
        max_dataset_length: int | None = None,
        dataset_map_fn: Any = None,
        template_map_fn: Any = None,
        max_length: int = 2048,
        pad_image_to_square: bool = False,
        *,
        on_bad_samples: str = "error",
        decode_images: bool = True,
        check_workers: int | None = None,
    ) -> None:
        if on_bad_samples not in ON_BAD_SAMPLES:
            raise ValueError(
                f"`on_bad_samples` should be one of {ON_BAD_SAMPLES}, got {on_bad_samples!r}: "
                '"error" stops before training, "drop" trains on the good samples only'
            )
        self.on_bad_samples = on_bad_samples
        self.data_report: DataReport | None = None
        self.dropped_ids: list[str] = []
        self._max_dataset_length = max_dataset_length
        kwargs = dict(
            image_folder=image_folder,
            image_processor=image_processor,
            tokenizer=tokenizer,
            offline_processed_text_folder=offline_processed_text_folder,
            max_dataset_length=max_dataset_length,
            dataset_map_fn=dataset_map_fn,
            template_map_fn=template_map_fn,
            max_length=max_length,
            pad_image_to_square=pad_image_to_square,
        )
        if offline_processed_text_folder is not None or data_path is None:
            print_log(
                "CheckedLLaVADataset: the data check reads `data_path`; with "
                "`offline_processed_text_folder` the text is already tokenized and is not checked",
                logger="current",
                level=logging.WARNING,
            )
            super().__init__(data_path=data_path, **kwargs)
            return

        # Build once here and hand the built objects on (LLaVADataset builds only config dicts).
        kwargs["tokenizer"] = tokenizer = _build(tokenizer)
        kwargs["template_map_fn"] = template_map_fn = _build(template_map_fn)
        records = load_records(data_path)
        report = _on_rank0(
            lambda: check_records(
                records,
                image_folder,
                tokenizer=tokenizer,
                max_length=max_length,
                dataset_map_fn=_map_fn(dataset_map_fn),
                template_map_fn=template_map_fn,
                decode_images=decode_images,
                workers=check_workers,
                progress=True,
            )
        )
        self.data_report = report
        if report.ok:
            print_log(f"CheckedLLaVADataset: {report.summary()} ({data_path})", logger="current")
            super().__init__(data_path=data_path, **kwargs)
            self._expect_kept(records, report)
            return
        if on_bad_samples == "error":
            raise BadSamplesError(
                f"`data_path` {data_path!r} with `image_folder` {image_folder!r}: "
                f"{report.summary()}\n"
                "Fix the data (`llava-moslora check-data` re-checks it without training), or set "
                f'`on_bad_samples="drop"` in llava_dataset to train on the '
                f"{report.total - len(report.bad_indices)} good samples."
            )

        bad = report.bad_indices
        self.dropped_ids = report.bad_ids()
        print_log(
            f'CheckedLLaVADataset (on_bad_samples="drop"): {report.summary()}\n'
            f"Dropping them: training on the {report.total - len(bad)} good samples.",
            logger="current",
            level=logging.WARNING,
        )
        for kind, found in report.findings.items():
            print_log(
                f"CheckedLLaVADataset: dropped {kind}: {', '.join(f.id for f in found)}",
                logger="current",
            )
        kept = [record for index, record in enumerate(records) if index not in bad]
        with tempfile.TemporaryDirectory(prefix="checked_llava_") as folder:
            filtered = os.path.join(folder, os.path.basename(data_path))
            if filtered.endswith(".jsonl"):  # LLaVADataset picks its reader by the suffix
                filtered = filtered[: -len(".jsonl")] + ".json"
            with open(filtered, "w", encoding="utf-8") as file:
                json.dump(kept, file)
            super().__init__(data_path=filtered, **kwargs)
        self._expect_kept(records, report)

    def _expect_kept(self, records: list[Any], report: DataReport) -> None:
        """Warn if XTuner left out a sample the check passed: the check would then be incomplete.

        `max_dataset_length` subsamples on purpose, so the comparison only runs without it.
        """
        expected = len(records) - len(report.bad_indices)
        if self._max_dataset_length is not None or len(self.text_data) == expected:
            return
        print_log(
            f"CheckedLLaVADataset: the check passed {expected} "
            f"samples but XTuner kept {len(self.text_data)} (fewer is expected only with "
            "`max_dataset_length`)",
            logger="current",
            level=logging.WARNING,
        )


def _map_fn(dataset_map_fn: Any) -> Callable[[dict], dict] | None:
    """Resolve `dataset_map_fn` as XTuner's `map_dataset` does (a callable, or a MAP_FUNC name)."""
    if not isinstance(dataset_map_fn, str):
        return dataset_map_fn
    from mmengine.utils.misc import get_object_from_string
    from xtuner.registry import MAP_FUNC

    resolved = MAP_FUNC.get(dataset_map_fn) or get_object_from_string(dataset_map_fn)
    if resolved is None:
        raise ValueError(
            f"`dataset_map_fn` {dataset_map_fn!r} is neither a function nor a MAP_FUNC name"
        )
    return resolved
