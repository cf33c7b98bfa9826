"""`llava_moslora_export.json`: what an exported folder holds and how to run it.

Every `llava-moslora export` writes this manifest next to the model files, so that evaluation code
(and people) can load the export without the training config: which base models the adapters go
on, the prompt template and system prompt the model was trained with, how images were fed
(`visual_select_layer`, `pad_image_to_square`) and what kind of adapter was trained.

    from llava_moslora.export import read_manifest
    manifest = read_manifest("exports/llama3_moslora")
    manifest.format            # "xtuner" | "peft-folded" | "hf-llava" | "merged-xtuner"
    manifest.adapter_kind_of("llm")

The schema is shared with the evaluation code: change it only together with its readers.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..jsonfile import read_json_object

MANIFEST_NAME = "llava_moslora_export.json"

# xtuner        XTuner's LLaVA layout with our MoSLoRA adapters (load with moslora.load_adapter)
# peft-folded   the same layout with plain LoRA adapters (mixer folded into B): stock PEFT loads it
# hf-llava      one merged transformers LlavaForConditionalGeneration + LlavaProcessor
# merged-xtuner merged llm/ + visual_encoder/ + projector/ (backbones transformers does not ship)
FORMATS = ("xtuner", "peft-folded", "hf-llava", "merged-xtuner")
# Formats whose weights are merged: they need no base model, so `llm` / `visual_encoder` are null.
MERGED_FORMATS = ("hf-llava", "merged-xtuner")
DTYPES = ("bfloat16", "float16", "float32")
ADAPTED_TOWERS = ("llm", "visual_encoder")  # LLaVAModel attributes that can carry an adapter


@dataclass(frozen=True)
class ExportManifest:
    """The contents of `llava_moslora_export.json` (see the module docstring).

    `adapter_kind` is the adapter that was trained (a name of `moslora.kinds.ADAPTER_KINDS`:
    "lora", "dora", "moslora", "ts_mixing", "init_only"; None for a tower without adapter; exports
    written before TS-Mixing and init-only had names of their own say "moslora"), one string when both towers agree, else a {"llm": ..., "visual_encoder": ...}
    dict; `format` says how it is stored (a peft-folded export of a "moslora" run holds plain LoRA
    tensors). `mixer` holds each tower's MixerOptions as a dict, None for non-MoSLoRA towers.
    """

    format: str
    llm: str | None
    visual_encoder: str | None
    prompt_template: str | None
    system: str
    visual_select_layer: int
    pad_image_to_square: bool
    adapter_kind: str | dict[str, str | None] | None
    mixer: dict[str, dict[str, Any] | None]
    quantized_base: bool
    dtype: str
    config: str
    checkpoint: str
    seed: int | None
    trust_remote_code: bool
    # Every file the export wrote, relative to OUT, the manifest itself excepted: what `--overwrite`
    # may replace and what an evaluator must find. None in manifests older than this field.
    files: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(
                f"`format` should be one of {', '.join(FORMATS)} but the value passed is "
                f"{self.format!r}."
            )
        if self.dtype not in DTYPES:
            raise ValueError(
                f"`dtype` should be one of {', '.join(DTYPES)} but the value passed is "
                f"{self.dtype!r}."
            )

    @property
    def merged(self) -> bool:
        """Whether the weights are merged (no base model and no adapter to load)."""
        return self.format in MERGED_FORMATS

    def adapter_kind_of(self, tower: str) -> str | None:
        """The adapter kind trained on `tower` ("llm" or "visual_encoder")."""
        if tower not in ADAPTED_TOWERS:
            raise ValueError(
                f"`tower` should be one of {', '.join(ADAPTED_TOWERS)} but the value passed is "
                f"{tower!r}."
            )
        if isinstance(self.adapter_kind, dict):
            return self.adapter_kind.get(tower)
        return self.adapter_kind

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_manifest(out_dir: str | Path, manifest: ExportManifest) -> Path:
    """Write `manifest` as OUT/llava_moslora_export.json; return the path."""
    path = Path(out_dir, MANIFEST_NAME)
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(export_dir: str | Path) -> ExportManifest:
    """Read the manifest of an exported folder.

    Fields unknown to this version are ignored (a newer exporter may add some); a missing field
    or an unknown `format` raises ValueError naming it.
    """
    path = Path(export_dir, MANIFEST_NAME)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: is {export_dir} a folder written by `llava-moslora export`?"
        )
    data = read_json_object(
        path, fix="export the checkpoint again (or copy the whole export folder again)."
    )
    names = [f.name for f in fields(ExportManifest)]
    optional = {f.name for f in fields(ExportManifest) if f.default is not MISSING}
    missing = [name for name in names if name not in data and name not in optional]
    if missing:
        raise ValueError(
            f"{path} lacks the field(s) {', '.join(f'`{m}`' for m in missing)}; re-export the "
            "checkpoint with this version of `llava-moslora export`."
        )
    values = {name: data[name] for name in names if name in data}
    if values.get("files") is not None:
        values["files"] = tuple(values["files"])
    return ExportManifest(**values)
