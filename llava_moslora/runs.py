"""A trained run, loaded: its config, the model training built from it, its checkpoint's tensors,
and the image path that model reads images through. Export and every evaluator load runs here, so
they accept and refuse the same checkpoints.

An `xtuner train` checkpoint holds only what LLaVAModel.state_dict() keeps: every adapter tensor
(`llm.*lora_*`, `visual_encoder.*lora_*`, mixers included) and the projector. The towers come
from the config's base models. So the model is built from the config exactly as training built it
(XTuner's BUILDER, both towers, the same adapter configs) and the checkpoint must then fill every
one of those tensors with one of the same shape: a LoRA checkpoint given a MoSLoRA config would
leave the mixers at their random init, a rank-8 checkpoint does not fit rank-16 layers.

The image path is LLaVA-1.5's, as XTuner's LLaVAModel.forward and its dataset run it:

    image ──pad to square (image-processor mean)──► preprocess ──► (B, 3, H, W)   square_pixels
          ──► CLIP ──hidden_states[visual_select_layer][:, 1:]──► (B, patches, d_vit)  (CLS dropped)
          ──► projector ──► (B, patches, d_llm) image embeddings                   image_features

Config overrides come in as a dict: the commands parse `--cfg-options` strings before calling
(`llava_moslora.train.launch.parse_cfg_options`; `export`'s parser uses mmengine's DictAction).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_moslora.moslora.safety import require_finite
from llava_moslora.train.checkpoints import checkpoint_meta, load_trained_state

logger = logging.getLogger("llava_moslora.runs")

SHOWN_KEYS = 8  # keys listed per kind of mismatch in the error message


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model the config builds."""


def load_config(config: Any, cfg_options: dict[str, Any] | None = None):
    """An mmengine Config from a path (or a Config, copied), with `--cfg-options` merged in."""
    from mmengine.config import Config

    if isinstance(config, Config):
        cfg = config.copy()
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"`config` {config}: no such file")
        cfg = Config.fromfile(str(path))
    if cfg_options:
        from llava_moslora.builders.vision_layers import rederived_layers

        # the ViT layers `train` adapted for an overridden visual_select_layer, derived the same way
        cfg.merge_from_dict({**cfg_options, **rederived_layers(cfg, dict(cfg_options))})
    return cfg


def build_model(cfg, *, start_projector: bool = False) -> nn.Module:
    """XTuner's LLaVAModel built from `cfg.model` as `xtuner train` builds it, in eval mode.

    `pretrained_pth` (the projector the run started from) is left out unless `start_projector`:
    a checkpoint holds the trained projector, so the start point need not exist where the run is
    loaded. Only a run scored before training (no checkpoint) needs it.
    """
    from xtuner.registry import BUILDER

    from llava_moslora.train import compat

    compat.apply()  # XTuner reads `pretrained_pth` through the safe loader, whatever the config
    model_cfg = cfg.model.copy()
    if not start_projector:
        model_cfg.pretrained_pth = None
    model = BUILDER.build(model_cfg)
    return model.eval()  # no LoRA dropout


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointMismatchError unless `state` has exactly the model's trained tensors.

    "Trained tensors" are LLaVAModel.state_dict()'s keys: what `xtuner train` saves.
    """
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected.keys() & state.keys()
        if state[key].shape != expected[key].shape
    )
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, keys in (
        ("missing from the checkpoint", missing),
        ("unexpected (not in the model)", unexpected),
        ("shape-mismatched", mismatched),
    ):
        if keys:
            shown = "\n    ".join(keys[:SHOWN_KEYS])
            more = f"\n    ... and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            parts.append(f"  {len(keys)} key(s) {label}:\n    {shown}{more}")
    raise CheckpointMismatchError(
        f"The checkpoint {source} does not match the model built from the config:\n"
        + "\n".join(parts)
        + "\nPass the config the checkpoint was trained with (same adapter type, e.g. "
        "moslora_config vs LoraConfig, same `r` and target modules), or fix it with "
        "`--cfg-options`."
    )


def _frozen_pattern_mixers(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """{state key: (init, matrix)} of every mixer the config fixes to a known matrix.

    A frozen identity (vanilla LoRA, init-only) or butterfly (TS-Mixing) mixer is built as that
    exact matrix, so a checkpoint of this run holds it unchanged.
    """
    built = model.state_dict()
    fixed = {}
    for name, module in model.named_modules():
        for adapter, options in getattr(module, "mixer_options", {}).items():
            if not options.fixed_matrix:
                continue
            key = f"{name}.lora_mixer.{adapter}.weight"
            if key in built:  # (LLaVAModel.state_dict keeps every lora_ key: always true)
                init = "identity (init-only)" if options.init_only else options.init
                fixed[key] = (init, built[key].clone())
    return fixed


def check_frozen_mixers(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a checkpoint whose mixer is not the fixed matrix the config says it is.

    Otherwise a learned (e.g. Kaiming) mixer loaded under an identity/butterfly config would be
    exported, and labelled in the manifest, as vanilla LoRA / TS-Mixing.
    """
    for key, (init, matrix) in _frozen_pattern_mixers(model).items():
        if key in state and not torch.equal(state[key].to(matrix.dtype), matrix):
            raise CheckpointMismatchError(
                f"The config builds a frozen `mixer_init={init!r}` mixer, but `{key}` in "
                f"{source} is not that matrix: the checkpoint was trained with another mixer "
                "(e.g. a learned one). Pass the config it was trained with."
            )


def load_checkpoint(model: nn.Module, checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Load an iter_N.pth file or DeepSpeed iter_N.pth/ folder into `model`; return the state.

    Strict on the trained tensors (see `check_state_fits`); the frozen base weights stay as built
    (by `load_run`: from the config's parts, or the llava-hf folder the run started from).
    Non-finite tensors and mixers that contradict a frozen-mixer config are refused.
    """
    state = load_trained_state(checkpoint)
    require_finite(state, checkpoint)
    check_state_fits(model, state, str(checkpoint))
    check_frozen_mixers(model, state, str(checkpoint))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # check_state_fits makes this impossible; keep it loud anyway
        raise CheckpointMismatchError(f"Unexpected keys while loading: {result.unexpected_keys}")
    return state


def started_from_llava_hf(checkpoint: str | Path) -> str | None:
    """The llava-hf folder the checkpoint's run started from (its meta's `llava_hf_path`), or
    None for a run built from the config's three parts."""
    return checkpoint_meta(checkpoint).get("llava_hf_path") or None


def llava_hf_base(cfg, checkpoint: str | Path) -> Path | None:
    """The llava-hf folder to rebuild the checkpoint's base from, checked to be the one its run
    started from; None for a run built from the config's three parts.

    The meta names the folder and its `llava_hf_digest` (hf_engine.llava_hf_digest) at the start
    of training; a config's `llava_hf_path` (`--cfg-options`) points at a copy moved elsewhere. A
    folder gone, replaced or retrained since is refused: the adapters fit that base only.
    """
    meta = checkpoint_meta(checkpoint)
    started_from, asked = meta.get("llava_hf_path"), cfg.get("llava_hf_path")
    if not started_from:
        if asked:
            raise CheckpointMismatchError(
                f"`llava_hf_path` {asked}: the run of {checkpoint} started from the config's "
                "`model.llm`, `model.visual_encoder` and `pretrained_pth`, not from a llava-hf "
                "checkpoint; leave `llava_hf_path` unset"
            )
        return None
    folder = Path(asked or started_from)
    fix = (
        f"restore the folder the run started from ({started_from}), or pass an unchanged copy "
        "of it with `--cfg-options llava_hf_path=DIR`"
    )
    recorded = meta.get("llava_hf_digest")
    if not recorded:
        raise CheckpointMismatchError(
            f"`llava_hf_path` {folder}: {checkpoint} records no digest of the llava-hf folder its "
            "run started from (written before llava-moslora recorded one), so its base cannot be "
            "checked; train the run again to export or evaluate it"
        )
    from llava_moslora.train.hf_engine import llava_hf_digest

    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        raise CheckpointMismatchError(
            f"`llava_hf_path` {folder}: holds no *.safetensors weights (pickled weights are never "
            f"read), so it is not the folder the run of {checkpoint} started from; {fix}"
        )
    try:
        found = llava_hf_digest(folder)
    except OSError as error:
        raise CheckpointMismatchError(
            f"`llava_hf_path` {folder}: the llava-hf folder the run of {checkpoint} started from "
            f"is not readable ({error}); {fix}"
        ) from error
    if found != recorded:
        raise CheckpointMismatchError(
            f"`llava_hf_path` {folder}: its config, weights or tokenizer are not those the run "
            f"of {checkpoint} started from ({found[:19]}..., the run recorded {recorded[:19]}...), "
            f"so its adapters would be paired with another base; {fix}"
        )
    return folder


def build_model_on_llava_hf(cfg, folder: str | Path) -> nn.Module:
    """XTuner's LLaVAModel of `cfg.model` on the towers of a llava-hf folder, in eval mode.

    The folder is read by the hf engine's own loader (`hf_engine.read_llava_hf`: safetensors
    only, local, no remote code); its language model and lm_head become the causal LM, its vision
    tower the CLIP, and the config's adapters go on them as `xtuner train` puts them, so the
    checkpoint's XTuner keys fill them strictly. `cfg`'s tokenizer and image processor are
    re-pointed at the folder (what training read), for export and the evaluators.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.registry import BUILDER

    from llava_moslora.train.hf_engine import read_llava_hf
    from llava_moslora.train.hf_recipe import RecipeError

    fix = "restore the folder the run started from, or pass an unchanged copy with --cfg-options"
    try:
        llava, _, _ = read_llava_hf(folder, int(cfg.model.visual_select_layer), fix)
    except RecipeError as error:
        raise CheckpointMismatchError(str(error)) from error
    vision = llava.model.vision_tower
    with init_empty_weights():  # its two parts are replaced by llava's own modules just below
        llm = AutoModelForCausalLM.from_config(llava.config.text_config)
    llm.model, llm.lm_head = llava.model.language_model, llava.lm_head
    llm.generation_config = llava.generation_config
    if not isinstance(vision, CLIPVisionModel) or any(
        t.is_meta for t in (*llm.parameters(), *llm.buffers())
    ):
        raise CheckpointMismatchError(
            f"`llava_hf_path` {folder}: its towers are a {type(llm.model).__name__} and a "
            f"{type(vision).__name__}; XTuner's LLaVA takes a causal LM of `.model` and "
            "`.lm_head` and a CLIPVisionModel"
        )
    for part in ("tokenizer", "image_processor"):
        cfg[part].update(pretrained_model_name_or_path=str(folder), trust_remote_code=False)
    model_cfg = cfg.model.copy()
    model_cfg.pretrained_pth = None  # the projector is the folder's (a checkpoint then its own)
    model_cfg.llm, model_cfg.visual_encoder = llm, vision
    model = BUILDER.build(model_cfg)
    projector = llava.model.multi_modal_projector
    if len(model.projector.model) != 3:  # XTuner's depth-2 projector: Linear, GELU, Linear
        raise CheckpointMismatchError(
            f"`model.projector_depth` should be 2 for a run started from a llava-hf checkpoint "
            f"(linear_1, act, linear_2), but the model's projector is {model.projector.model}"
        )
    model.projector.model[0].load_state_dict(projector.linear_1.state_dict())
    model.projector.model[2].load_state_dict(projector.linear_2.state_dict())
    return model.eval()


def checkpoint_seed(checkpoint: str | Path) -> int | None:
    """The seed mmengine recorded in the checkpoint's meta (`xtuner train --seed`), if any."""
    try:  # read as data: an unsafe file was refused by load_trained_state already
        seed = checkpoint_meta(checkpoint).get("seed")
    except Exception as error:  # noqa: BLE001 - the seed is informative only
        logger.warning("could not read the seed from %s: %s", checkpoint, error)
        return None
    return int(seed) if isinstance(seed, int) else None


def load_run(
    config: Any, checkpoint: str | Path | None = None, cfg_options: dict[str, Any] | None = None
) -> tuple[Any, nn.Module]:
    """(config, model) of a run: the config's model with the checkpoint's tensors, strictly.

    Without `checkpoint` the model is the run before training: adapters at init (B = 0, so the
    base towers) and the config's `pretrained_pth` projector, the one training starts from (with
    `llava_hf_path`: that folder's towers and projector).
    """
    cfg = load_config(config, cfg_options)
    if checkpoint is None:  # the run before training: from the folder it will start from
        base = cfg.get("llava_hf_path") or None
    else:
        base = llava_hf_base(cfg, checkpoint)
    if base is None:
        model = build_model(cfg, start_projector=checkpoint is None)
    else:  # a run of `--engine hf` started from a llava-hf folder (`llava_hf_path`)
        model = build_model_on_llava_hf(cfg, base)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return cfg, model


def square_pixels(image, image_processor) -> torch.Tensor:
    """(1, 3, H, W) pixel values of `image` padded to a square with the processor's mean colour.

    What LLaVADataset does with `pad_image_to_square=True`: CLIP's processor would otherwise
    crop the centre and cut off whatever lies outside it.
    """
    from xtuner.dataset.utils import expand2square

    background = tuple(int(x * 255) for x in image_processor.image_mean)
    square = expand2square(image.convert("RGB"), background)
    return image_processor.preprocess(square, return_tensors="pt")["pixel_values"]


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The image embeddings LLaVA splices into the prompt: (B, 3, H, W) -> (B, patches, d_llm).

    `model` is anything with LLaVAModel's `visual_encoder`, `projector` and `visual_select_layer`
    (the trained LLaVAModel, or the evaluator's parts read from an export). The pixels go in at the
    tower's dtype, as LLaVAModel.forward passes them, and the hidden state at the projector's, which
    an export may keep in another one; moving them to the model's device is the caller's.
    No `torch.no_grad` here: the memory planner traces this path for backward.
    """
    tower = model.visual_encoder
    hidden = tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states
    features = hidden[model.visual_select_layer][:, 1:]  # (B, patches, d_vit): CLS dropped
    projector_dtype = next(model.projector.parameters()).dtype
    return model.projector(features.to(projector_dtype))  # (B, patches, d_llm)
