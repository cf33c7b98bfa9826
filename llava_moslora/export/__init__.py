"""Checkpoint → XTuner adapters, folded PEFT adapters, merged HF LLaVA or merged XTuner folders.

    llava-moslora export work_dirs/llama3_moslora/iter_N.pth --config configs/llama3_moslora.py \
        --to hf-llava exports/llama3_moslora

Evaluation code reads what an export holds with `read_manifest(dir)`; it imports nothing heavy.
"""

from .manifest import DTYPES, FORMATS, MANIFEST_NAME, ExportManifest, read_manifest

__all__ = ["DTYPES", "FORMATS", "MANIFEST_NAME", "ExportManifest", "export", "read_manifest"]


def export(*args, **kwargs):
    """`exporter.export`, imported on first use (it pulls in torch, PEFT and XTuner)."""
    from .exporter import export as _export

    return _export(*args, **kwargs)
