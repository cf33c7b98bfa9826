"""Reading an export folder's `llava_moslora_export.json` (written by `llava-moslora export`).

The exporter owns the schema and its checks (`llava_moslora.export.manifest.read_manifest`: every
field present, a known `format`); this module adds what evaluation needs on top, so the evaluator
never guesses how to load a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..export.manifest import MANIFEST_NAME, read_manifest

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
    manifest = read_manifest(model_dir).to_dict()
    fmt = manifest["format"]
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


def require_export_files(model_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Raise FileNotFoundError "export incomplete: <file> missing" for a file the export wrote.

    The manifest lists every file of the export (`files`); one that is gone must be an error
    naming it, never a fall back to a hub download of the same name. Manifests older than the
    `files` list are not checked.
    """
    for name in manifest.get("files") or ():
        path = Path(model_dir, name)
        if not path.is_file():
            raise FileNotFoundError(
                f"export incomplete: {path} missing. Copy the whole export folder, or export the "
                "checkpoint again."
            )


def recorded_fields(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest fields copied into a results summary (missing ones as None)."""
    manifest = manifest or {}
    return {field: manifest.get(field) for field in RECORDED_FIELDS}


def export_identity(model_dir: str | Path, manifest: dict[str, Any]) -> str:
    """The export's identity: sha256 over its manifest and the bytes of every file it lists.

    What a run folder records so that predictions are never scored as another model's: the
    manifest alone does not change when a retrained checkpoint is re-exported under the same
    path, the weights do. Manifests older than the `files` list hash every file of the folder.
    """
    import hashlib

    model_dir = Path(model_dir)
    names = manifest.get("files")
    if names is None:
        names = [
            str(p.relative_to(model_dir))
            for p in model_dir.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME
        ]
    digest = hashlib.sha256((model_dir / MANIFEST_NAME).read_bytes())
    for name in sorted(names):
        file_digest = hashlib.sha256()
        with Path(model_dir, name).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(f"\0{name}\0{file_digest.hexdigest()}".encode())
    return f"sha256:{digest.hexdigest()}"
