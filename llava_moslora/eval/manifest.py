"""Reading an export folder's `llava_moslora_export.json` (written by `llava-moslora export`).

The exporter owns the schema (`llava_moslora.export.manifest.read_manifest`); this module uses it
when it is importable and otherwise reads the same JSON itself, checking the fields evaluation
needs, so the evaluator never guesses how to load a folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "llava_moslora_export.json"
FORMATS: tuple[str, ...] = ("xtuner", "peft-folded", "hf-llava", "merged-xtuner")
# Fields the summary and report copy from the manifest (what identifies a row of Table 5).
RECORDED_FIELDS: tuple[str, ...] = (
    "format",
    "config",
    "checkpoint",
    "seed",
    "adapter_kind",
    "mixer",
    "quantized_base",
    "dtype",
    "prompt_template",
)


def read_export_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest of `model_dir` as a dict, validated for what the evaluator needs."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"`MODEL_DIR` {str(model_dir)!r} is not a folder; pass the folder that "
            "`llava-moslora export` wrote."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"`MODEL_DIR` {str(model_dir)!r} has no {MANIFEST_NAME}; pass a folder written by "
            "`llava-moslora export`, which records how to load it."
        )
    try:
        from llava_moslora.export.manifest import read_manifest
    except ImportError:  # the exporter is not installed alongside: read the JSON ourselves
        manifest = json.loads(path.read_text())
    else:
        manifest = read_manifest(model_dir).to_dict()
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise ValueError(
            f"`format` in {path} should be one of {list(FORMATS)}, got {fmt!r}; re-export the "
            "checkpoint with `llava-moslora export --to FORMAT`."
        )
    if fmt in ("xtuner", "peft-folded"):
        for field in ("llm", "visual_encoder"):
            if not manifest.get(field):
                raise ValueError(
                    f"`{field}` in {path} is {manifest.get(field)!r}, but a {fmt!r} export holds "
                    "only adapters: it needs the base model's path or hub id."
                )
    manifest.setdefault("prompt_template", None)
    manifest.setdefault("system", "")
    manifest.setdefault("visual_select_layer", -2)
    manifest.setdefault("pad_image_to_square", True)
    manifest.setdefault("trust_remote_code", False)
    return manifest


def recorded_fields(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest fields copied into a results summary (missing ones as None)."""
    manifest = manifest or {}
    return {field: manifest.get(field) for field in RECORDED_FIELDS}
