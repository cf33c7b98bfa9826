"""One recipe, two engines: the values the hf engine reads, derived from an XTuner config.

The configs in configs/ are mmengine lazy-import configs: parsing one resolves XTuner names
(`PROMPT_TEMPLATE.llama3_chat`, `LLaVAModel`), so it needs XTuner, which does not import on
transformers 5. `recipe_from_config` reads a parsed config's dicts (where XTuner is installed:
the default environment) into a `Recipe` of plain values; `write_recipe` stores it as JSON, which
the hf engine reads anywhere, and `llava-moslora train --engine hf CONFIG.py` derives it on the
fly. Nothing is copied by hand: every field comes from the config, e.g.

    recipe field            config
    llm / vision / projector  model.llm / model.visual_encoder .pretrained_model_name_or_path,
                              model.pretrained_pth
    llm_adapter, vision_...   model.llm_lora / model.visual_encoder_lora (type + arguments)
    template                  llava_dataset.template_map_fn.template (XTuner's PROMPT_TEMPLATE)
    lr, betas, ...            optim_wrapper.optimizer, .clip_grad, .accumulative_counts
    warmup_epochs, epochs     param_scheduler (LinearLR end, CosineAnnealingLR eta_min), train_cfg
    llava_hf_path             llava_hf_path (optional, no config sets it: `--cfg-options
                              llava_hf_path=DIR`)
    quantization              model.llm.quantization_config (BitsAndBytesConfig's arguments)
                              and model.llm.torch_dtype: the 4-bit base of QLoRA / QMoSLoRA
    activation_checkpointing  model.use_activation_checkpointing (XTuner's default: True)

`llava_hf_path` starts the run from an existing llava-hf checkpoint instead of the three parts: a
folder holding a `LlavaForConditionalGeneration` in safetensors with its tokenizer and image
processor, as `llava-moslora export CKPT --to hf-llava` writes it (or llava-hf/llava-1.5-7b-hf
downloaded). The model, its tokenizer and its image processor then come from that folder; `llm`,
`vision` and `projector` are not read. XTuner has no such key, so `xtuner train` ignores it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

ADAPTER_TYPES = ("lora", "moslora")  # peft.LoraConfig, llava_moslora.moslora.moslora_config


class RecipeError(ValueError):
    """A config (or recipe file) the hf engine cannot run, with what to change."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One tower's adapter: `kind` in ADAPTER_TYPES and the config class's arguments."""

    kind: str
    options: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Quantization:
    """The LLM's 4-bit base (QLoRA / QMoSLoRA), as XTuner's LLaVAModel loads it: transformers'
    `BitsAndBytesConfig(**options)` and `llm_dtype`, the config's `model.llm.torch_dtype` (the
    dtype of the weights left unquantized before PEFT's `prepare_model_for_kbit_training` casts
    them to float32). Torch dtypes are stored by name ("float16"), which both take as they are,
    so the recipe stays JSON."""

    options: dict[str, Any]
    llm_dtype: str


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training run as plain values (JSON): towers, adapters, data, schedule."""

    llm: str
    vision: str
    projector: str | None  # the pretrained projector (mmengine checkpoint), as `pretrained_pth`
    visual_select_layer: int
    llm_adapter: Adapter | None
    vision_adapter: Adapter | None
    data_path: str
    image_folder: str
    template: dict[str, Any]
    max_length: int
    pad_image_to_square: bool
    on_bad_samples: str
    decode_images: bool
    batch_size: int
    accumulative_counts: int
    epochs: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    max_norm: float | None
    warmup_epochs: float
    warmup_start_factor: float
    eta_min: float
    save_steps: int
    log_interval: int
    amp_dtype: str | None  # "float16"/"bfloat16" under CUDA (AmpOptimWrapper), None: float32
    # A llava-hf checkpoint folder to start from instead of llm + vision + projector (the module
    # docstring); optional in a recipe file, so recipes written before it still read.
    llava_hf_path: str | None = None
    # The LLM in 4 bits (None: float32); optional, as above.
    quantization: Quantization | None = None
    # Recompute each layer's activations in backward instead of keeping them (XTuner's
    # `use_activation_checkpointing`, on unless a config turns it off); optional, as above.
    activation_checkpointing: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        fields = dataclasses.fields(cls)
        names = {field.name for field in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        unknown = sorted(data.keys() - names)
        missing = sorted(required - data.keys())
        if unknown or missing:
            raise RecipeError(
                f"recipe fields do not match: unknown {unknown}, missing {missing}; write it again "
                "with `llava-moslora train --engine hf CONFIG.py --write-recipe FILE`"
            )
        values = dict(data)
        for name in ("llm_adapter", "vision_adapter"):
            if values[name] is not None:
                values[name] = Adapter(**values[name])
        if values.get("quantization") is not None:
            values["quantization"] = Quantization(**values["quantization"])
        values["betas"] = tuple(values["betas"])
        return cls(**values)


def write_recipe(recipe: Recipe, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(dataclasses.asdict(recipe), indent=2) + "\n")
    return path


def read_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RecipeError(f"recipe {path}: cannot read it as JSON ({error})") from error
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: should hold a JSON object, not {type(data).__name__}")
    return Recipe.from_dict(data)


def _adapter(lora: Any, where: str) -> Adapter | None:
    """The adapter dict of an XTuner config (`type=moslora_config|LoraConfig, **options`)."""
    if lora is None:
        return None
    from peft import LoraConfig

    from llava_moslora.moslora import moslora_config

    options = dict(lora)
    kind = {LoraConfig: "lora", moslora_config: "moslora"}.get(options.pop("type"))
    if kind is None:
        raise RecipeError(
            f"`{where}.type` should be peft.LoraConfig or moslora_config for the hf engine but "
            f"the value passed is {lora['type']!r}"
        )
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    return Adapter(kind=kind, options=options)


def _dtype_name(value: Any) -> Any:
    """A torch dtype by its name ("float16"), for JSON; anything else as it is."""
    import torch

    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


def _quantization(llm: Any) -> Quantization | None:
    """`model.llm.quantization_config` (XTuner's `type=BitsAndBytesConfig` dict, or the object
    XTuner's builder leaves in its place) as plain values."""
    quant = llm.get("quantization_config")
    if quant is None:
        return None
    from transformers import BitsAndBytesConfig

    if isinstance(quant, BitsAndBytesConfig):  # a config XTuner has built from already
        options = {k: v for k, v in quant.to_dict().items() if k != "quant_method"}
        options["type"] = BitsAndBytesConfig
    else:
        options = dict(quant) if isinstance(quant, dict) else {}
    kind = options.pop("type", None)
    if kind is not BitsAndBytesConfig or not options.get("load_in_4bit"):
        raise RecipeError(
            "`model.llm.quantization_config` should be a 4-bit BitsAndBytesConfig dict "
            "(`type=BitsAndBytesConfig, load_in_4bit=True`: QLoRA / QMoSLoRA) for the hf engine "
            f"but the value passed is {quant!r}; train it with `--engine xtuner`"
        )
    options = {
        k: [_dtype_name(x) for x in v] if isinstance(v, (list, tuple)) else _dtype_name(v)
        for k, v in options.items()
    }
    # What from_pretrained loads without `torch_dtype` on transformers 4.57 (XTuner's stack).
    return Quantization(options=options, llm_dtype=_dtype_name(llm.get("torch_dtype", "float32")))


def _scheduler(cfg: Any) -> tuple[float, float, float]:
    """(warm-up end in epochs, LinearLR start_factor, cosine eta_min) of `param_scheduler`."""
    names = [getattr(s["type"], "__name__", str(s["type"])) for s in cfg.param_scheduler]
    # The base's pair (llava_moslora/train/schedule.py), or mmengine's own, which differ only in
    # rounding a short warm-up up to one iteration.
    if names not in (["LinearWarmupLR", "CosineAfterWarmupLR"], ["LinearLR", "CosineAnnealingLR"]):
        raise RecipeError(
            f"`param_scheduler` should be [LinearWarmupLR, CosineAfterWarmupLR] (the paper's "
            f"warm-up and cosine) for the hf engine but the config has {names}"
        )
    warmup, cosine = cfg.param_scheduler
    return float(warmup["end"]), float(warmup["start_factor"]), float(cosine["eta_min"])


def recipe_from_config(cfg: Any) -> Recipe:
    """The `Recipe` of a parsed mmengine Config (`llava_moslora.runs.load_config`)."""
    model = cfg.model
    dataset = cfg.llava_dataset
    optim = cfg.optim_wrapper
    optimizer = optim["optimizer"]
    optimizer_name = getattr(optimizer["type"], "__name__", str(optimizer["type"]))
    if optimizer_name != "AdamW":
        raise RecipeError(
            f"`optim_wrapper.optimizer.type` should be AdamW for the hf engine but the value "
            f"passed is {optimizer_name}"
        )
    clip = optim.get("clip_grad")
    warmup_end, start_factor, eta_min = _scheduler(cfg)
    wrapper = getattr(optim["type"], "__name__", str(optim["type"]))
    return Recipe(
        llm=str(model.llm.pretrained_model_name_or_path),
        vision=str(model.visual_encoder.pretrained_model_name_or_path),
        projector=model.get("pretrained_pth"),
        visual_select_layer=int(model.visual_select_layer),
        llm_adapter=_adapter(model.get("llm_lora"), "model.llm_lora"),
        vision_adapter=_adapter(model.get("visual_encoder_lora"), "model.visual_encoder_lora"),
        data_path=str(dataset.data_path),
        image_folder=str(dataset.image_folder),
        template=dict(dataset.template_map_fn.template),
        max_length=int(dataset.max_length),
        pad_image_to_square=bool(dataset.pad_image_to_square),
        on_bad_samples=str(dataset.get("on_bad_samples", "error")),
        decode_images=bool(dataset.get("decode_images", True)),
        batch_size=int(cfg.train_dataloader.batch_size),
        accumulative_counts=int(optim.get("accumulative_counts", 1)),
        epochs=int(cfg.train_cfg.max_epochs),
        lr=float(optimizer["lr"]),
        betas=tuple(float(b) for b in optimizer.get("betas", (0.9, 0.999))),
        weight_decay=float(optimizer.get("weight_decay", 0.0)),
        max_norm=float(clip["max_norm"]) if clip else None,
        warmup_epochs=warmup_end,
        warmup_start_factor=start_factor,
        eta_min=eta_min,
        save_steps=int(cfg.default_hooks.checkpoint.interval),
        log_interval=int(cfg.default_hooks.logger.interval),
        amp_dtype=str(optim["dtype"]) if wrapper == "AmpOptimWrapper" else None,
        llava_hf_path=str(cfg.llava_hf_path) if cfg.get("llava_hf_path") else None,
        quantization=_quantization(model.llm),
        activation_checkpointing=bool(model.get("use_activation_checkpointing", True)),
    )


def recipe_from_file(path: str | Path, cfg_options: dict[str, Any] | None = None) -> Recipe:
    """The recipe of an XTuner config (needs mmengine and XTuner) or of a recipe JSON file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"`config` {path}: no such file")
    if path.suffix == ".json":
        if cfg_options:
            raise RecipeError("`--cfg-options` applies to a config .py, not to a recipe .json")
        return read_recipe(path)
    try:
        from mmengine.config import Config

        cfg = Config.fromfile(str(path))
        cfg.merge_from_dict(cfg_options or {})
        return recipe_from_config(cfg)
    except ImportError as error:
        raise RecipeError(
            f"reading {path} needs XTuner and mmengine ({error}); derive its recipe where they are "
            f"installed (`uv sync`): `llava-moslora train --engine hf {path} --write-recipe "
            "RECIPE.json`, then pass RECIPE.json here"
        ) from error
