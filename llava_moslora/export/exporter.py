"""`export`: an `xtuner train` checkpoint to the formats the ecosystem reads.

    xtuner         OUT/llm_adapter/, OUT/visual_encoder_adapter/ (MoSLoRA adapters + mixer,
                   moslora_config.json), OUT/projector/: XTuner's LLaVA layout; load the adapters
                   with llava_moslora.moslora.load_adapter (stock PEFT would drop the mixer).
    peft-folded    the same layout, mixer folded into B (B' = B·M): plain LoRA adapters that
                   stock PEFT, `xtuner chat --llava` and VLMEvalKit's LLaVA_XTuner load as they are.
    hf-llava       OUT/ = one merged transformers LlavaForConditionalGeneration + LlavaProcessor.
    merged-xtuner  OUT/llm/ (+ tokenizer), OUT/visual_encoder/ (+ image processor), OUT/projector/,
                   merged: for backbones transformers does not ship (InternLM2). LLaVA_XTuner and
                   `xtuner chat --llava` read it too (they look for llm/ and visual_encoder/).

Each also writes OUT/llava_moslora_export.json (manifest.py). The export is written to a hidden
sibling folder and moved into place at the end, so OUT never holds half an export; `--overwrite`
replaces only an earlier export's own files (out_dir.py).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_moslora.moslora import (
    merge_and_unload_dequantized,
    mixer_options_of,
    save_adapter,
    save_folded,
)
from llava_moslora.moslora.kinds import kind_of
from llava_moslora.moslora.safety import non_finite_error, non_finite_keys_in_file
from llava_moslora.runs import checkpoint_seed, load_run, started_from_llava_hf

from .manifest import (
    DTYPES,
    FORMATS,
    MERGED_FORMATS,
    ExportManifest,
    write_manifest,
)
from .out_dir import (
    MARKER_NAME,
    check_out_dir,
    clean_stale,
    list_files,
    make_staging,
    move_into_place,
)

logger = logging.getLogger("llava_moslora.export")

ADAPTER_DIRS = {"llm": "llm_adapter", "visual_encoder": "visual_encoder_adapter"}
MERGED_DIRS = {"llm": "llm", "visual_encoder": "visual_encoder"}


class UnsupportedFormatError(ValueError):
    """A format that cannot hold this run (the CLI exits 2 naming the one to use)."""


def _refuse_adapter_formats_on_llava_hf(checkpoint: str | Path, fmt: str) -> str | None:
    """The llava-hf folder the run started from (None: the config's three parts); refuses the
    adapter formats for such a run.

    `xtuner` and `peft-folded` write only adapters and the projector: their readers (`xtuner chat
    --llava`, VLMEvalKit's LLaVA_XTuner, llava_moslora.eval) rebuild the base from an LLM folder
    and a CLIP folder, the manifest's `llm` and `visual_encoder`, which a llava-hf base has not.
    The merged formats carry the base with them."""
    started_from = started_from_llava_hf(checkpoint)
    if started_from and fmt not in MERGED_FORMATS:
        raise UnsupportedFormatError(
            f"`--to {fmt}`: the run of {checkpoint} started from the llava-hf checkpoint "
            f"{started_from}, and a {fmt} export holds only adapters for a base read from separate "
            "LLM and CLIP folders, which that base has not; export it `--to hf-llava` (or "
            "`--to merged-xtuner`)"
        )
    return started_from


class _Stages:
    """Logs each long step as it starts, with the time since the export began."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        logger.info("[%6.1f s] %s", time.monotonic() - self.start, message)


# --- what the config and the model say --------------------------------------------------------


def _plain(obj: Any) -> Any:
    """ConfigDicts and lists of them as plain dicts and lists, for comparison."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _dataset_cfg(cfg) -> dict:
    loader = cfg.get("train_dataloader") or {}
    return loader.get("dataset") or cfg.get("llava_dataset") or {}


def prompt_template_of(cfg) -> tuple[str | None, dict | None]:
    """(name, dict) of the config's prompt template; the name is XTuner's PROMPT_TEMPLATE key.

    Lazy configs hold the template as a copied dict, not a name: it is found by value.
    """
    from xtuner.utils import PROMPT_TEMPLATE

    template = cfg.get("prompt_template")
    if template is None:
        template = (_dataset_cfg(cfg).get("template_map_fn") or {}).get("template")
    if template is None:
        return None, None
    if isinstance(template, str):  # a name or "xtuner.utils.PROMPT_TEMPLATE.llama3_chat"
        name = template.rsplit(".", 1)[-1]
        return (name, _plain(PROMPT_TEMPLATE[name])) if name in PROMPT_TEMPLATE else (None, None)
    template = _plain(template)
    for name, entry in PROMPT_TEMPLATE.items():
        if _plain(entry) == template:
            return name, template
    logger.warning("the config's prompt template matches no XTuner PROMPT_TEMPLATE entry")
    return None, template


def adapter_of(tower: nn.Module) -> tuple[str | None, dict | None]:
    """(adapter kind, mixer options as a dict) of one tower of the built LLaVAModel."""
    from peft import PeftModel

    if not isinstance(tower, PeftModel):
        return None, None
    config = tower.peft_config["default"]
    options = mixer_options_of(config)
    return kind_of(config).name, (None if options is None else options.to_dict())


def _is_quantized(tower: nn.Module) -> bool:
    from peft import PeftModel

    base = tower.get_base_model() if isinstance(tower, PeftModel) else tower
    return bool(getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None))


def _model_path(tower_cfg) -> str | None:
    path = tower_cfg.get("pretrained_model_name_or_path")
    return None if path is None else str(path)


def make_manifest(
    cfg, model: nn.Module, fmt: str, dtype: str, checkpoint: str | Path, config_path: str
) -> ExportManifest:
    kinds, mixers = {}, {}
    for tower in ("llm", "visual_encoder"):
        kinds[tower], mixers[tower] = adapter_of(getattr(model, tower))
    kind = kinds["llm"] if kinds["llm"] == kinds["visual_encoder"] else kinds
    seed = (cfg.get("randomness") or {}).get("seed")
    if seed is None:
        seed = checkpoint_seed(checkpoint)
    merged = fmt in MERGED_FORMATS
    return ExportManifest(
        format=fmt,
        llm=None if merged else _model_path(cfg.model.llm),
        visual_encoder=None if merged else _model_path(cfg.model.visual_encoder),
        prompt_template=prompt_template_of(cfg)[0],
        system=cfg.get("SYSTEM") or "",
        visual_select_layer=int(cfg.model.get("visual_select_layer", -2)),
        pad_image_to_square=bool(_dataset_cfg(cfg).get("pad_image_to_square", False)),
        adapter_kind=kind,
        mixer=mixers,
        quantized_base=_is_quantized(model.llm) or _is_quantized(model.visual_encoder),
        dtype=dtype,
        config=config_path,
        checkpoint=str(checkpoint),
        seed=None if seed is None else int(seed),
        trust_remote_code=bool(cfg.model.llm.get("trust_remote_code", False)),
    )


# --- writers ----------------------------------------------------------------------------------


def _cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    """Rewrite an adapter file in `dtype` (saved in the training dtype, so folding B·M is fp32)."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _require_adapter_or_frozen(model: nn.Module, fmt: str) -> None:
    from peft import PeftModel

    for tower in ("llm", "visual_encoder"):
        module = getattr(model, tower)
        if not isinstance(module, PeftModel) and any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                f"The {tower} was trained in full (no adapter), so `--to {fmt}` has no adapter to "
                "write for it. Use `--to hf-llava` or `--to merged-xtuner`."
            )


def _write_adapters(
    model: nn.Module, out: Path, dtype: torch.dtype, *, folded: bool, stage
) -> None:
    from peft import PeftModel

    _require_adapter_or_frozen(model, "peft-folded" if folded else "xtuner")
    for tower, dirname in ADAPTER_DIRS.items():
        module = getattr(model, tower)
        if not isinstance(module, PeftModel):  # frozen, no adapter: the base is used as is
            continue
        stage(f"saving the {tower} adapter{' (mixer folded into B)' if folded else ''}")
        (save_folded if folded else save_adapter)(module, out / dirname)
        for file in (out / dirname).glob("*.safetensors"):
            _cast_safetensors(file, dtype)


def _save_projector(model: nn.Module, out: Path, dtype: torch.dtype, stage) -> None:
    stage("saving the projector")
    model.projector.to(dtype).save_pretrained(str(out / "projector"))


def _merge_tower(tower: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The tower with its adapter merged in, as a plain `dtype` model (4-bit bases dequantized)."""
    from peft import PeftModel

    if not isinstance(tower, PeftModel):
        if _is_quantized(tower):
            raise ValueError(
                "A quantized tower without adapter cannot be exported merged: nothing to merge."
            )
        return tower.to(dtype)
    if any(getattr(c, "use_dora", False) for c in tower.peft_config.values()):
        # DoRA's merge rescales by the column norms: PEFT's own merge does it, ours does not.
        if _is_quantized(tower):
            raise ValueError(
                "`--to hf-llava/merged-xtuner` of a DoRA adapter on a 4-bit base is not supported:"
                " PEFT's DoRA merge requantizes. Export `--to xtuner` or `--to peft-folded`."
            )
        return tower.merge_and_unload().to(dtype)
    # W0 + s·B·M·A summed in float32 and rounded once to `dtype`; 4-bit W0 dequantized first.
    return merge_and_unload_dequantized(tower, dtype=dtype)


def _write_merged_towers(model, cfg, dtype, stage) -> tuple[nn.Module, nn.Module]:
    stage("merging the LLM adapter into the base weights")
    llm = _merge_tower(model.llm, dtype)
    llm.config.use_cache = True  # LLaVAModel switches it off for training
    stage("merging the visual encoder adapter into the base weights")
    visual_encoder = _merge_tower(model.visual_encoder, dtype)
    return llm, visual_encoder


def write_xtuner(model, cfg, out: Path, dtype: torch.dtype, stage) -> None:
    _write_adapters(model, out, dtype, folded=False, stage=stage)
    _save_projector(model, out, dtype, stage)


def write_peft_folded(model, cfg, out: Path, dtype: torch.dtype, stage) -> None:
    _write_adapters(model, out, dtype, folded=True, stage=stage)
    _save_projector(model, out, dtype, stage)


def write_merged_xtuner(model, cfg, out: Path, dtype: torch.dtype, stage) -> None:
    from xtuner.registry import BUILDER

    llm, visual_encoder = _write_merged_towers(model, cfg, dtype, stage)
    stage("saving llm/ and its tokenizer")
    llm.save_pretrained(str(out / MERGED_DIRS["llm"]))
    BUILDER.build(cfg.tokenizer).save_pretrained(str(out / MERGED_DIRS["llm"]))
    stage("saving visual_encoder/ and its image processor")
    visual_encoder.save_pretrained(str(out / MERGED_DIRS["visual_encoder"]))
    BUILDER.build(cfg.image_processor).save_pretrained(str(out / MERGED_DIRS["visual_encoder"]))
    _save_projector(model, out, dtype, stage)


def write_hf_llava(model, cfg, out: Path, dtype: torch.dtype, stage) -> None:
    from xtuner.registry import BUILDER

    from .hf_llava import build_hf_llava

    llm, visual_encoder = _write_merged_towers(model, cfg, dtype, stage)
    stage("assembling LlavaForConditionalGeneration + LlavaProcessor")
    hf_model, processor = build_hf_llava(
        llm,
        visual_encoder,
        model.projector.to(dtype),
        BUILDER.build(cfg.tokenizer),
        BUILDER.build(cfg.image_processor),
        visual_select_layer=int(cfg.model.get("visual_select_layer", -2)),
        prompt_template=prompt_template_of(cfg)[1],
        pad_image_to_square=bool(_dataset_cfg(cfg).get("pad_image_to_square", False)),
    )
    stage("saving the model and processor")
    hf_model.save_pretrained(str(out))
    processor.save_pretrained(str(out))


WRITERS: dict[str, Callable[..., None]] = {
    "xtuner": write_xtuner,
    "peft-folded": write_peft_folded,
    "hf-llava": write_hf_llava,
    "merged-xtuner": write_merged_xtuner,
}


def check_written(staging: Path, out: Path, dtype: str) -> None:
    """Refuse an export whose tensors are not all finite as written: every format, every file.

    `load_checkpoint` refused a non-finite checkpoint already, in float32. What is written can
    still overflow: float16 holds at most 65504, so a finite but large mixer, projector or merged
    weight becomes inf in the cast (or in the merge). So the files are read back as written. The
    error names OUT's file, since the staging folder is removed and nothing is written.
    """
    for name in list_files(staging):
        if not name.endswith(".safetensors"):
            continue
        bad = non_finite_keys_in_file(staging / name)
        if bad:
            fix = (
                " (float16 holds at most 65504): export with `--dtype bfloat16` or `--dtype float32`"
                if dtype == "float16"
                else ""
            )
            raise non_finite_error(
                bad,
                out / name,
                why=f"the checkpoint is finite, so they overflowed when cast to or merged in "
                f"{dtype}{fix}. Nothing was written.",
            )


# --- the command ------------------------------------------------------------------------------


def export(
    checkpoint: str | Path,
    config: Any,
    fmt: str,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    cfg_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ExportManifest:
    """Export `checkpoint` (iter_N.pth file or DeepSpeed folder) trained with `config` as `fmt`.

    `config` is a config path or an mmengine Config. Returns the manifest written to OUT.
    """
    if fmt not in FORMATS:
        raise ValueError(
            f"`--to` should be one of {', '.join(FORMATS)} but the value passed is {fmt!r}."
        )
    if dtype not in DTYPES:
        raise ValueError(
            f"`--dtype` should be one of {', '.join(DTYPES)} but the value passed is {dtype!r}."
        )
    out = Path(out_dir)
    from mmengine.config import Config

    # What replacing OUT must never delete (a Config object may have been read from a file).
    inputs = [checkpoint, config.filename if isinstance(config, Config) else config]
    clean_stale(out)
    check_out_dir(out, overwrite, inputs)
    if not Path(checkpoint).exists():
        raise FileNotFoundError(
            f"`CKPT` {checkpoint}: no iter_N.pth file or DeepSpeed checkpoint folder there."
        )
    inputs.append(_refuse_adapter_formats_on_llava_hf(checkpoint, fmt))  # the base, if any
    inputs.append((cfg_options or {}).get("llava_hf_path"))
    check_out_dir(out, overwrite, inputs)

    stage = _Stages()
    stage(
        f"loading the base models and adapters from the config {getattr(config, 'filename', config)}"
        f", then the checkpoint {checkpoint}"
    )
    cfg, model = load_run(config, checkpoint, cfg_options)
    manifest = make_manifest(
        cfg, model, fmt, dtype, checkpoint, str(getattr(cfg, "filename", None) or config)
    )

    staging = make_staging(out)
    try:
        with torch.no_grad():
            WRITERS[fmt](model, cfg, staging, getattr(torch, dtype), stage)
        stage(f"checking that every tensor written is finite in {dtype}")
        check_written(staging, out, dtype)
        files = [name for name in list_files(staging) if name != MARKER_NAME]
        manifest = dataclasses.replace(manifest, files=tuple(files))
        write_manifest(staging, manifest)
        check_out_dir(out, overwrite, inputs)  # again: OUT may have changed during the export
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stage(f"done: {fmt} export in {out}")
    return manifest
