"""The hf engine: a config's LLaVA run on transformers' `LlavaForConditionalGeneration`, no XTuner.

XTuner 0.2.0 does not import on transformers 5, so this engine trains the same model from the same
recipe (hf_recipe.py) with only torch, transformers and PEFT, on 4.57 and on 5.x alike:

    LLM (AutoModelForCausalLM)      ->  model.language_model, lm_head          MoSLoRA/LoRA (PEFT)
    CLIP (CLIPVisionModel)          ->  model.vision_tower                    MoSLoRA/LoRA (PEFT)
    pretrained projector (.pth)     ->  model.multi_modal_projector           trained in full
    hidden_states[visual_select_layer][:, 1:]  ->  vision_feature_layer, strategy "default"

The loop is a plain torch loop, not HF's Trainer: mmengine's semantics (the loss divided by the
accumulation count, clipping, a warm-up and cosine stepped per micro-batch, checkpoints every
`save_steps` iterations) are a few lines each here, while the Trainer would need a custom
scheduler, loss scaling and checkpoint layout to give the same numbers (docs/training.md).

Checkpoints are XTuner's: `iter_N.pth` holds `state_dict` keyed as LLaVAModel.state_dict() keys
its trained tensors (`xtuner_keys`), so `llava-moslora export` and every evaluator read a run of
either engine the same way; the optimizer, schedule and RNG states ride along for `--resume`.

Images: XTuner splices the patch features in place of one IMAGE_PLACEHOLDER id; here each
placeholder becomes `patches` copies of `image_token_id`, whose embeddings LlavaModel overwrites
with the same features, so the embedding sequence and the loss are the same position for position.
The image token is an id the tokenizer already has (its pad token), so the LLM's vocabulary and
logits stay as the XTuner engine's; padding is written with the eos id (masked, no loss).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_moslora.data.check import DataFileError, check_records, load_records
from llava_moslora.data.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    encode_conversation,
    pad_to_square,
)
from llava_moslora.moslora.safety import (
    CorruptCheckpointError,
    NonFiniteTensorError,
    UnsafeCheckpointError,
    require_finite,
    safe_torch_load,
)

from .hf_recipe import Adapter, Recipe, RecipeError

logger = logging.getLogger("llava_moslora.train.hf_engine")

USAGE_ERROR = 2  # as `llava-moslora train`'s XTuner path: an input the user can fix

# HF LLaVA's module prefixes -> XTuner LLaVAModel's, for the trained tensors (adapters, projector).
# PEFT wraps XTuner's towers (llm.base_model.model.*); here the adapters are injected in place.
_PROJECTOR_KEYS = {
    "model.multi_modal_projector.linear_1.": "projector.model.0.",
    "model.multi_modal_projector.linear_2.": "projector.model.2.",
}


def _tower_prefixes(model: nn.Module, llm_adapter: bool, vision_adapter: bool) -> dict[str, str]:
    llm = "llm.base_model.model." if llm_adapter else "llm."
    vision = "visual_encoder.base_model.model." if vision_adapter else "visual_encoder."
    if not hasattr(model.model.vision_tower, "vision_model"):
        # transformers 5's CLIPVisionModel holds the embeddings and encoder itself; XTuner's
        # (4.57) keys, and so the checkpoints, name them under `vision_model.`.
        vision += "vision_model."
    return {
        "model.language_model.": llm + "model.",
        "lm_head.": llm + "lm_head.",
        "model.vision_tower.": vision,
        **_PROJECTOR_KEYS,
    }


def xtuner_key(key: str, prefixes: dict[str, str]) -> str:
    """The LLaVAModel.state_dict() key of a LlavaForConditionalGeneration state key."""
    for ours, theirs in prefixes.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(f"no XTuner counterpart for {key!r}")


def is_trained_key(key: str) -> bool:
    """What XTuner's LLaVAModel.state_dict() keeps: every adapter tensor and the projector."""
    return "lora_" in key or key.startswith("model.multi_modal_projector.")


def xtuner_keys(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    """{our key: XTuner's key} for every trained tensor of `model`."""
    prefixes = _tower_prefixes(
        model, recipe.llm_adapter is not None, recipe.vision_adapter is not None
    )
    return {k: xtuner_key(k, prefixes) for k in model.state_dict() if is_trained_key(k)}


def trained_state(model: nn.Module, recipe: Recipe) -> dict[str, torch.Tensor]:
    """The trained tensors keyed as an `xtuner train` checkpoint keys them (under ZeRO-3 gathered
    from their partitions first: outside a forward they are empty placeholders)."""
    from ..probes import gathered

    with gathered([p for p in model.parameters() if p.requires_grad]):
        state = model.state_dict()
        return {
            theirs: state[ours].detach().cpu().clone()
            for ours, theirs in xtuner_keys(model, recipe).items()
        }


def load_trained(model: nn.Module, recipe: Recipe, state: dict[str, torch.Tensor], source) -> None:
    """Fill `model`'s trained tensors from an XTuner-keyed `state`, all of them, strictly."""
    result = model.load_state_dict(ours_from_xtuner(model, recipe, state, source), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # keys came from the model itself


def ours_from_xtuner(
    model: nn.Module, recipe: Recipe, state: dict[str, torch.Tensor], source
) -> dict[str, torch.Tensor]:
    """`state` (XTuner's keys) keyed as `model` keys it, once it holds every trained tensor of
    `model` and nothing else, all finite."""
    keys = xtuner_keys(model, recipe)
    missing = sorted(set(keys.values()) - state.keys())
    unexpected = sorted(state.keys() - set(keys.values()))
    if missing or unexpected:
        raise RecipeError(
            f"{source} does not fit the recipe's model: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}; resume with the config the run was started with"
        )
    require_finite(state, source)
    return {ours: state[theirs] for ours, theirs in keys.items()}


# --- the model ---------------------------------------------------------------------------------


# The towers load in float32 (the adapters train in it; autocast runs the fp16 maths on CUDA).
# transformers renamed `torch_dtype` to `dtype` in 4.56, and 5.x loads "auto" when given neither.
def _float32() -> dict[str, torch.dtype]:
    return _dtype(torch.float32)


def _dtype(dtype: torch.dtype | str) -> dict[str, torch.dtype | str]:
    from transformers import __version__

    major, minor = (int(part) for part in __version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _require_bitsandbytes() -> None:
    """A 4-bit base needs bitsandbytes: stop in one line where it is absent (the GPU machines ship
    transformers without it) or does not load, before transformers fails deep in from_pretrained."""
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, RuntimeError, OSError) as error:
        raise RecipeError(
            "`quantization` (the config's `model.llm.quantization_config`: a 4-bit base) needs "
            f"bitsandbytes, which does not import here ({error}); install it (`pip install "
            "'bitsandbytes>=0.49'`) or train a config without 4-bit quantization"
        ) from error


def load_llm(recipe: Recipe) -> nn.Module:
    """The recipe's causal LM: in float32, or with its 4-bit base as XTuner's LLaVAModel builds it.

    QLoRA / QMoSLoRA: transformers quantizes the linears on load (`BitsAndBytesConfig`, the
    config's `torch_dtype` for the rest), then, when the LLM gets an adapter, PEFT's
    `prepare_model_for_kbit_training` freezes it, casts its unquantized half-precision weights to
    float32 and, with activation checkpointing, turns it on with input gradients: the calls
    `LLaVAModel._prepare_llm_for_lora` makes."""
    from transformers import AutoModelForCausalLM

    quant = recipe.quantization
    if quant is None:
        return AutoModelForCausalLM.from_pretrained(recipe.llm, **_float32())
    _require_bitsandbytes()
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    llm = AutoModelForCausalLM.from_pretrained(
        recipe.llm,
        quantization_config=BitsAndBytesConfig(**quant.options),
        **_dtype(quant.llm_dtype),
    )
    if recipe.llm_adapter is not None:
        llm = prepare_model_for_kbit_training(llm, recipe.activation_checkpointing)
    return llm


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer of both towers in backward (XTuner's `use_activation_checkpointing`):
    transformers' own switch on the LLM and on CLIP, as LLaVAModel flips it on its `llm` and
    `visual_encoder`. Their inputs are made to require grad, as LLaVAModel does: reentrant
    checkpoints (transformers 4.x's default) pass no gradient to adapters inside a block whose
    inputs do not (frozen embeddings, CLIP's patch convolution). transformers 5 renamed the switch
    `activation_checkpointing_enable`; the old name warns there."""
    for tower in (model.model.language_model, model.model.vision_tower):
        enable = getattr(tower, "activation_checkpointing_enable", None)
        (enable or tower.gradient_checkpointing_enable)()
        tower.enable_input_require_grads()


def _all_linear_names(module: nn.Module) -> list[str]:
    """XTuner's targets when `target_modules` is None: every Linear's name, lm_head excepted."""
    names = {
        name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)
    }
    names.discard("lm_head")
    return sorted(names)


def lora_config(adapter: Adapter, tower: nn.Module):
    """The PEFT config of `adapter` (stock LoraConfig, or the MoSLoRA plugin's)."""
    from peft import LoraConfig

    from llava_moslora.moslora import moslora_config

    options = dict(adapter.options)
    options.pop("task_type", None)  # the adapters are injected into a bare tower
    if options.get("target_modules") is None:
        options["target_modules"] = _all_linear_names(tower)
    if adapter.kind == "moslora":
        return moslora_config(**options)
    if adapter.kind == "lora":
        return LoraConfig(**options)
    raise RecipeError(f"adapter `kind` should be one of lora, moslora, got {adapter.kind!r}")


def load_projector(path: str | Path) -> dict[str, torch.Tensor]:
    """The `projector.*` tensors of a pretrained-projector checkpoint (XTuner's `pretrained_pth`),
    read as data."""
    try:
        from llava_moslora.train.checkpoints import mmengine_checkpoint_globals

        allowed = mmengine_checkpoint_globals()
    except ImportError:  # no mmengine here: a file that needs its classes is refused by name
        allowed = []
    saved = safe_torch_load(path, allowed_globals=allowed)
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    projector = {k: v for k, v in (state or {}).items() if k.startswith("projector.")}
    if not projector:
        raise RecipeError(f"`projector` {path}: holds no `projector.*` tensors (XTuner's layout)")
    return projector


def build_llava(recipe: Recipe, image_token_id: int) -> nn.Module:
    """LlavaForConditionalGeneration from the recipe's LLM, CLIP and projector, adapters on."""
    from transformers import (
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    llm = load_llm(recipe)
    vision = CLIPVisionModel.from_pretrained(recipe.vision, **_float32())
    projector = load_projector(recipe.projector) if recipe.projector else None
    vconfig = vision.config
    bias = projector is None or "projector.model.0.bias" in projector
    config = LlavaConfig(
        vision_config=vconfig.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",  # XTuner's ProjectorConfig default
        vision_feature_select_strategy="default",  # drop CLS, as LLaVAModel's [:, 1:]
        vision_feature_layer=recipe.visual_select_layer,
        image_seq_length=(vconfig.image_size // vconfig.patch_size) ** 2,
        multimodal_projector_bias=bias,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    if recipe.quantization is None:
        model.model.language_model.load_state_dict(llm.model.state_dict())
        model.lm_head.load_state_dict(llm.lm_head.state_dict())
    else:  # 4-bit weights do not copy into float ones: the loaded modules take their places
        model.model.language_model, model.lm_head = llm.model, llm.lm_head
        # PEFT picks its bnb LoRA layers by `is_loaded_in_4bit` of the model it adapts, which
        # transformers set on the causal LM only (MoSLoRA's registry matches Linear4bit itself).
        model.model.language_model.is_loaded_in_4bit = True
    model.model.vision_tower.load_state_dict(vision.state_dict())
    if projector is not None:
        ours = {}
        for key, tensor in projector.items():
            for prefix, theirs in _PROJECTOR_KEYS.items():
                if key.startswith(theirs):
                    ours[prefix + key[len(theirs) :]] = tensor
        if ours.keys() != {k for k in model.state_dict() if k.startswith("model.multi_")}:
            raise RecipeError(
                f"`projector` {recipe.projector}: expected XTuner's 2-layer projector "
                f"(projector.model.0 / .2), found {sorted(projector)}"
            )
        model.load_state_dict(ours, strict=False)
    add_adapters(model, recipe)
    return model


def add_adapters(model: nn.Module, recipe: Recipe) -> None:
    """Freeze `model`, inject the recipe's adapters into both towers, train them and the projector.

    The adapters draw their initial A (and mixer) from torch's generator re-seeded with the seed
    it was last given (`seed_everything(seed)` at the run's start): what building the towers drew
    before differs between transformers versions (`LlavaForConditionalGeneration(config)`
    initialises every weight it then overwrites), and the same seed must give the same adapters
    on 4.57 and on 5.x."""
    from peft import inject_adapter_in_model

    torch.manual_seed(torch.initial_seed())
    model.requires_grad_(False)
    for adapter, tower in (
        (recipe.llm_adapter, model.model.language_model),
        (recipe.vision_adapter, model.model.vision_tower),
    ):
        if adapter is not None:
            inject_adapter_in_model(lora_config(adapter, tower), tower)
    model.model.multi_modal_projector.requires_grad_(True)


LLAVA_HF_FIX = (
    "point it at a LlavaForConditionalGeneration folder in safetensors with its tokenizer and "
    "image processor (`llava-moslora export CKPT --to hf-llava` writes one), or leave it unset to "
    "build from `llm`, `vision` and `projector`"
)


def _refuse_llava_hf(path: Path, problem: str, fix: str = LLAVA_HF_FIX) -> RecipeError:
    return RecipeError(f"`llava_hf_path` {path}: {problem}; {fix}")


# What a run reads from a llava-hf folder: config, weights (and their index), tokenizer, processor.
_LLAVA_HF_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")


def llava_hf_digest(path: str | Path) -> str:
    """sha256 over the names and bytes of what a run reads from the llava-hf folder `path`.

    A checkpoint's meta records it: its adapters fit that base only, so export and evaluation
    refuse a folder that was replaced or retrained since (a config hash alone would miss new
    weights of the same shapes). Reads every weight once; raises OSError without config.json."""
    import hashlib

    path = Path(path)
    (path / "config.json").read_bytes()  # a missing or unreadable folder raises here
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.suffix in _LLAVA_HF_SUFFIXES and p.is_file()):
        digest.update(f"{file.name}\0".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def load_llava_hf(recipe: Recipe):
    """(LlavaForConditionalGeneration, tokenizer, image processor) of `recipe.llava_hf_path`,
    the recipe's adapters on (`read_llava_hf`)."""
    if recipe.quantization is not None:
        raise _refuse_llava_hf(
            Path(recipe.llava_hf_path), "a 4-bit LLM (`quantization`) is not supported from it yet"
        )
    model, tokenizer, image_processor = read_llava_hf(
        recipe.llava_hf_path, recipe.visual_select_layer
    )
    add_adapters(model, recipe)
    return model, tokenizer, image_processor


def read_llava_hf(path: str | Path, visual_select_layer: int, fix: str = LLAVA_HF_FIX):
    """(LlavaForConditionalGeneration, tokenizer, image processor) of the llava-hf folder `path`,
    in float32, no adapters: what training starts from, and what export and evaluation rebuild
    (llava_moslora.runs) for a checkpoint of such a run.

    Read as data: the weights only from safetensors (a folder with only pytorch_model.bin is
    refused, never unpickled), local files only, no remote code. The image features must be
    taken as the recipe takes them (`visual_select_layer`, CLS dropped), or the run would train
    another model than the one its config and checkpoints describe. Refusals end with `fix`."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise _refuse_llava_hf(path, f"no readable config.json ({error})", fix) from error
    if not isinstance(config, dict) or config.get("model_type") != "llava":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise _refuse_llava_hf(path, f"config.json has model_type {found!r}, not 'llava'", fix)
    if not any(path.glob("*.safetensors")):
        raise _refuse_llava_hf(
            path, "holds no *.safetensors weights (pickled weights are refused)", fix
        )
    layer = config.get("vision_feature_layer")
    strategy = config.get("vision_feature_select_strategy")
    if layer != visual_select_layer or strategy != "default":
        raise _refuse_llava_hf(
            path,
            f"takes image features from layer {layer!r} with strategy {strategy!r}, the config "
            f"from `visual_select_layer` {visual_select_layer} with the CLS token dropped "
            "('default'); make them agree",
            fix,
        )
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            path, use_safetensors=True, local_files_only=True, **_float32()
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as error:
        raise _refuse_llava_hf(path, f"does not load ({error})", fix) from error
    return model, tokenizer, image_processor


# --- the data ----------------------------------------------------------------------------------


class Samples(torch.utils.data.Dataset):
    """The recipe's LLaVA samples as (input_ids with IMAGE_PLACEHOLDER, labels, pixel values)."""

    def __init__(
        self, records: list[dict], recipe: Recipe, tokenizer, image_processor, image_token_id: int
    ) -> None:
        self.records = records
        self.recipe = recipe
        self.image_processor = image_processor
        self.encoded = [
            encode_conversation(r["conversations"], tokenizer, recipe.template, recipe.max_length)
            for r in records
        ]
        for record, (input_ids, _) in zip(records, self.encoded, strict=True):
            if image_token_id in input_ids:  # it would be taken for an image patch
                token = tokenizer.convert_ids_to_tokens(image_token_id)
                raise RecipeError(
                    f"`data_path` {recipe.data_path}: sample {record.get('id')!r} contains "
                    f"{token!r}, the token the hf engine stands image patches with (the "
                    "tokenizer's pad token): remove it from the text"
                )

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, image_file: str) -> torch.Tensor:
        from PIL import Image

        processor = self.image_processor
        image = Image.open(Path(self.recipe.image_folder) / image_file).convert("RGB")
        if self.recipe.pad_image_to_square:
            image = pad_to_square(image, tuple(int(x * 255) for x in processor.image_mean))
        return processor.preprocess(image, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        input_ids, labels = self.encoded[index]
        image = self.records[index].get("image")
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.pixels(image) if image else None,
        }


def collate(
    samples: Sequence[dict], image_token_id: int, patches: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """A batch for LlavaForConditionalGeneration: each placeholder expanded to `patches` image
    tokens (no loss), right-padded with `pad_id` (masked, no loss)."""
    rows, row_labels = [], []
    for sample in samples:
        ids, labels = [], []
        for token, label in zip(sample["input_ids"], sample["labels"], strict=True):
            if token == IMAGE_PLACEHOLDER:
                ids += [image_token_id] * patches
                labels += [IGNORE_INDEX] * patches
            else:
                ids.append(token)
                labels.append(label)
        rows.append(ids)
        row_labels.append(labels)
    width = max(map(len, rows))
    batch = {
        "input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in row_labels]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch


def check_samples(records: list[dict], samples: Samples, recipe: Recipe):
    """The data check (llava_moslora.data.check) plus its length check on this engine's tokens."""
    report = check_records(records, recipe.image_folder, decode_images=recipe.decode_images)
    for index, (_, labels) in enumerate(samples.encoded):
        if index not in report.bad_indices and not any(label >= 0 for label in labels):
            sample_id = str(records[index].get("id", index))
            report.add("too_long", index, sample_id, f"0 answer tokens within {recipe.max_length}")
    report.lengths_checked = True
    return report


# --- the loop ----------------------------------------------------------------------------------


def lr_factor(iteration: int, recipe: Recipe, iters_per_epoch: int) -> float:
    """mmengine's LinearLR warm-up then CosineAnnealingLR, converted to iterations as mmengine
    converts them (`int(epochs * iters_per_epoch)`), as a factor of the base lr. mmengine's
    LinearLR reaches the full rate on the warm-up's last iteration (`total_iters = end - begin - 1`)
    and the cosine spans `end - begin` iterations."""
    warmup = int(recipe.warmup_epochs * iters_per_epoch)
    if recipe.warmup_epochs > 0:  # schedule.warmup_iterations (mmengine-free here): at least one
        warmup = max(1, warmup)
    end = recipe.epochs * iters_per_epoch
    if iteration < warmup:
        start = recipe.warmup_start_factor
        return start + (1 - start) * iteration / max(1, warmup - 1)
    floor = recipe.eta_min / recipe.lr
    progress = (iteration - warmup) / max(1, end - warmup)
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


def batch_order(size: int, epoch: int, seed: int) -> list[int]:
    """The sample order of `epoch`: a seeded permutation, the same after a resume."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def rank_share(order: list[int], rank: int, world: int) -> list[int]:
    """Process `rank`'s samples of an epoch's `order`, dealt as mmengine's DefaultSampler deals
    them to `world` processes: padded from its start to a multiple of `world`, then every
    `world`-th. One process takes `order` itself."""
    total = math.ceil(len(order) / world) * world
    padded = (order * math.ceil(total / len(order)))[:total]
    return padded[rank::world]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """A training run of the hf engine: model, data, optimizer, schedule, checkpoints."""

    def __init__(
        self,
        recipe: Recipe,
        work_dir: str | Path,
        seed: int = 0,
        deepspeed: str | None = None,
        fsdp: bool = False,
    ) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor

        self.recipe = recipe
        self.work_dir = Path(work_dir)
        self.seed = seed
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        seed_everything(seed)
        self.llava_hf_digest = None
        if recipe.llava_hf_path:  # its own `<image>` token stands the patches, as it was saved
            model, self.tokenizer, self.image_processor = load_llava_hf(recipe)
            self.image_token_id = model.config.image_token_index
            self.llava_hf_digest = llava_hf_digest(recipe.llava_hf_path)  # into every meta
        else:
            self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(recipe.llm)
            if tokenizer.pad_token_id is None or tokenizer.pad_token_id in (
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
            ):
                raise RecipeError(
                    f"the tokenizer of {recipe.llm} has pad token {tokenizer.pad_token!r}; the hf "
                    "engine stands image patches with the pad token, so it must exist and differ "
                    "from bos and eos: set `pad_token` in its tokenizer_config.json to a special "
                    "token the data never contains (LLaMA-3: <|finetune_right_pad_id|> or a "
                    "reserved one)"
                )
            self.image_token_id = self.tokenizer.pad_token_id
            self.image_processor = CLIPImageProcessor.from_pretrained(recipe.vision)
            model = build_llava(recipe, self.image_token_id)
        if recipe.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = model.to(self.device)
        vconfig = self.model.config.vision_config
        self.patches = (vconfig.image_size // vconfig.patch_size) ** 2
        self.fsdp = fsdp
        self.world, self.rank = 1, 0  # the processes that deal each epoch's samples among them
        if fsdp:  # before the optimizer, which is built on the sharded parameters (hf_fsdp.py)
            from .hf_fsdp import shard

            self.world, self.rank = shard(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
        )
        # float16 autocast needs a dynamic loss scale, as AmpOptimWrapper's `loss_scale="dynamic"`;
        # disabled (a pass-through) in float32 and bfloat16.
        fp16 = recipe.amp_dtype == "float16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16 and deepspeed is None)
        self.iteration = 0
        # The first micro-batch of the open accumulation group and the RNG state there: a
        # checkpoint saved inside a group resumes from them (`save`, `resume`), since the group's
        # gradients so far are in no checkpoint (DeepSpeed's partitions included).
        self.group_start: int | None = None
        self.group_rng: torch.Tensor | None = None
        # Under `--deepspeed` (hf_deepspeed.py) the DeepSpeedEngine runs forward, backward,
        # clipping and the optimizer step; the optimizer's param_groups still take the schedule.
        self.deepspeed = deepspeed
        self.engine = self.accelerator = None
        if deepspeed is not None:
            from .hf_deepspeed import deepspeed_config, prepare

            config = deepspeed_config(deepspeed, recipe, cuda=self.device.type == "cuda")
            self.engine, self.accelerator = prepare(self.model, self.optimizer, config)

    def samples(self, records: list[dict] | None = None) -> Samples:
        recipe = self.recipe
        records = load_records(recipe.data_path) if records is None else records
        return Samples(records, recipe, self.tokenizer, self.image_processor, self.image_token_id)

    def batch(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = collate(samples, self.image_token_id, self.patches, self.tokenizer.eos_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.recipe.amp_dtype
        with torch.autocast(
            self.device.type,
            dtype=getattr(torch, dtype or "float32"),
            enabled=dtype is not None and self.device.type == "cuda" and self.engine is None,
        ):
            return (self.engine or self.model)(**batch).loss

    def boundary(self, iteration: int, max_iters: int) -> bool:
        """Whether micro-batch `iteration` ends an accumulation group (an optimizer step)."""
        counts = self.recipe.accumulative_counts
        return (iteration + 1) % counts == 0 or iteration + 1 == max_iters

    def step(self, batch, iteration: int, max_iters: int, iters_per_epoch: int) -> float:
        """One micro-batch: backward, and every `accumulative_counts` (and at the end) an
        optimizer step, as mmengine's OptimWrapper does (the tail divides by what is left)."""
        recipe = self.recipe
        counts = recipe.accumulative_counts
        tail_start = max_iters - max_iters % counts
        divisor = counts if iteration < tail_start else max_iters - tail_start
        for group in self.optimizer.param_groups:
            group["lr"] = recipe.lr * lr_factor(iteration, recipe, iters_per_epoch)
        loss = self.loss(batch)
        boundary = self.boundary(iteration, max_iters)
        if self.engine is not None:  # the same division; DeepSpeed clips and steps at the boundary
            self.accelerator.deepspeed_engine_wrapped.backward(
                loss / divisor, sync_gradients=boundary, scale_wrt_gas=False
            )
            return loss.item()
        self.scaler.scale(loss / divisor).backward()
        if boundary:
            self.scaler.unscale_(self.optimizer)
            if recipe.max_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.trainable, recipe.max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()
        return loss.item()

    def log(self, loss: float, total: int, seconds: float) -> None:
        """One progress line on stderr and in WORK_DIR/hf_engine_log.jsonl (as mmengine's
        scalars.json: one JSON object per logged iteration)."""
        if self.rank != 0:  # rank 0 logs its own loss, as mmengine does
            return
        lr = self.optimizer.param_groups[0]["lr"]
        print(
            f"hf engine: iter {self.iteration}/{total} loss {loss:.4f} lr {lr:.3g} "
            f"{seconds:.3f} s/iter",
            file=sys.stderr,
        )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        line = {"iter": self.iteration, "loss": loss, "lr": lr, "seconds_per_iter": seconds}
        with open(self.work_dir / "hf_engine_log.jsonl", "a") as file:
            file.write(json.dumps(line) + "\n")

    def meta(self, iteration: int) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "iter": iteration,
            # where `--resume` goes on: the first micro-batch of the accumulation group open at
            # `iteration` (`iteration` itself after an optimizer step); `rng` is the RNG state there
            "resume_iter": iteration if self.group_start is None else self.group_start,
            "engine": "hf",
            # the base is not the config's three parts: `runs.load_run` rebuilds it from this
            # folder, once its digest shows it is the one the run started from
            "llava_hf_path": self.recipe.llava_hf_path,
            "llava_hf_digest": self.llava_hf_digest,
            "deepspeed": self.deepspeed,
            "fsdp": self.fsdp,
        }

    def save(self, iteration: int) -> Path:
        """`iter_N.pth` (XTuner's layout plus the resume state) and mmengine's `last_checkpoint`.

        Under `--deepspeed`, `iter_N.pth/` is DeepSpeed's own checkpoint folder, as `xtuner train
        --deepspeed` writes it (trained tensors only): its fp32 master weights and optimizer
        partitions resume the run exactly, and its client state holds the meta, the RNG state and
        `xtuner_keys` ({our key: XTuner's key}), with which `load_trained_state` gives export and
        evaluation XTuner's keys. `last_checkpoint` is written once the folder is complete."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / f"iter_{iteration}.pth"
        if self.engine is not None:
            meta = {**self.meta(iteration), "xtuner_keys": xtuner_keys(self.model, self.recipe)}
            self.engine.save_checkpoint(
                str(self.work_dir),
                tag=path.name,
                client_state={"meta": meta, "rng": self.resume_rng()},
                save_latest=False,
                exclude_frozen_parameters=True,
            )
            (self.work_dir / "last_checkpoint").write_text(str(path))
            return path
        if self.fsdp:  # every rank gathers, rank 0 writes
            from .hf_fsdp import full_state

            ours, optimizer = full_state(self.model, self.optimizer)
            if self.rank != 0:
                return path
            state = {theirs: ours[k] for k, theirs in xtuner_keys(self.model, self.recipe).items()}
        else:
            state = trained_state(self.model, self.recipe)
            optimizer = self.optimizer.state_dict()
        partial = path.with_name(path.name + ".partial")
        torch.save(
            {
                "state_dict": state,
                "meta": self.meta(iteration),
                "optimizer": optimizer,
                "scaler": self.scaler.state_dict(),
                "rng": self.resume_rng(),
            },
            partial,
        )
        partial.replace(path)
        (self.work_dir / "last_checkpoint").write_text(str(path))
        return path

    def resume_rng(self) -> torch.Tensor:
        return torch.get_rng_state() if self.group_rng is None else self.group_rng

    def resume(self, path: str | Path) -> None:
        path = Path(path)
        written_with = "--deepspeed" if path.is_dir() else "no --deepspeed"
        if (self.engine is not None) != path.is_dir():
            raise RecipeError(
                f"`--resume` {path}: the run was written with {written_with}; resume it the same way"
            )
        if self.engine is not None:
            # DeepSpeed reads its files itself, through the safe loader (compat.route_deepspeed).
            _, saved = self.engine.load_checkpoint(
                str(path.parent), tag=path.name, load_module_strict=False
            )
        else:
            saved = safe_torch_load(path)
        if not isinstance(saved, dict) or saved.get("meta", {}).get("engine") != "hf":
            raise RecipeError(f"`--resume` {path}: not a checkpoint of the hf engine")
        if saved["meta"].get("deepspeed") != self.deepspeed:
            raise RecipeError(
                f"`--resume` {path}: the run was written with `--deepspeed "
                f"{saved['meta'].get('deepspeed')}`; resume it with the same choice"
            )
        if saved["meta"].get("fsdp", False) != self.fsdp:
            written_with = "with" if saved["meta"].get("fsdp") else "without"
            raise RecipeError(
                f"`--resume` {path}: the run was written {written_with} `--fsdp`; resume it the "
                "same way"
            )
        started_from = saved["meta"].get("llava_hf_path")
        if started_from != self.recipe.llava_hf_path:
            raise RecipeError(
                f"`--resume` {path}: the run started from `llava_hf_path` {started_from}, the "
                f"recipe has {self.recipe.llava_hf_path}: resume with the run's own setting"
            )
        if self.fsdp:
            from .hf_fsdp import load_full_state

            trained = ours_from_xtuner(self.model, self.recipe, saved["state_dict"], path)
            load_full_state(self.model, self.optimizer, trained, saved["optimizer"])
        elif self.engine is None:
            load_trained(self.model, self.recipe, saved["state_dict"], path)
            self.optimizer.load_state_dict(saved["optimizer"])
        if self.engine is None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        meta = saved["meta"]
        self.iteration = int(meta.get("resume_iter", meta["iter"]))  # older checkpoints: "iter"
        if self.iteration != int(meta["iter"]):
            print(
                f"hf engine: --resume: {path.name} was saved inside an accumulation group "
                f"(`accumulative_counts` {self.recipe.accumulative_counts}), whose gradients a "
                f"checkpoint does not hold; going on from the group's first micro-batch, "
                f"iteration {self.iteration}, as the uninterrupted run did",
                file=sys.stderr,
            )

    def train(self, samples: Samples, max_iters: int | None = None) -> list[float]:
        """Train from `self.iteration`; return each iteration's loss."""
        recipe = self.recipe
        share = math.ceil(len(samples) / self.world)  # each process's samples an epoch
        iters_per_epoch = math.ceil(share / recipe.batch_size)
        total = recipe.epochs * iters_per_epoch
        stop = total if max_iters is None else min(total, max_iters)
        self.model.train()
        losses = []
        window_start, window_iteration = time.perf_counter(), self.iteration
        self.group_start, self.group_rng = self.iteration, torch.get_rng_state()
        order_epoch = None  # this process's sample order, drawn once an epoch (LLaVA's 665K: 36 ms)
        for iteration in range(self.iteration, stop):
            epoch, position = divmod(iteration, iters_per_epoch)
            if epoch != order_epoch:
                order = rank_share(
                    batch_order(len(samples), epoch, self.seed), self.rank, self.world
                )
                order_epoch = epoch
            chosen = order[position * recipe.batch_size : (position + 1) * recipe.batch_size]
            batch = self.batch([samples[i] for i in chosen])
            losses.append(self.step(batch, iteration, total, iters_per_epoch))
            self.iteration = iteration + 1
            if self.boundary(iteration, total):
                self.group_start, self.group_rng = self.iteration, torch.get_rng_state()
            if self.iteration % recipe.log_interval == 0 or self.iteration == stop:
                now = time.perf_counter()  # mean over the window since the last line, as mmengine
                self.log(
                    losses[-1], total, (now - window_start) / (self.iteration - window_iteration)
                )
                window_start, window_iteration = now, self.iteration
            if self.iteration % recipe.save_steps == 0 or self.iteration == stop:
                self.save(self.iteration)
        return losses


def train(
    recipe: Recipe,
    work_dir: str | Path,
    *,
    seed: int = 0,
    resume: bool = False,
    max_iters: int | None = None,
    deepspeed: str | None = None,
    fsdp: bool = False,
) -> int:
    """Run `recipe` into `work_dir`; the exit code (0, or USAGE_ERROR with one `error:` line).
    `deepspeed`: XTuner's preset name (hf_deepspeed.PRESETS), as `xtuner train --deepspeed`;
    `fsdp`: fully shard the model instead (hf_fsdp.py)."""
    try:
        if deepspeed is not None and recipe.quantization is not None:
            raise RecipeError(
                f"`--deepspeed {deepspeed}` with a 4-bit LLM (`model.llm.quantization_config`) is "
                "not supported by the hf engine yet: drop `--deepspeed`, or train with "
                "`--engine xtuner`"
            )
        if fsdp:
            from .hf_fsdp import require_fsdp

            require_fsdp(recipe, deepspeed)
        if deepspeed is not None:  # refused in one line before the model is built
            from .hf_deepspeed import deepspeed_config

            deepspeed_config(deepspeed, recipe, cuda=torch.cuda.is_available())
        run = Run(recipe, work_dir, seed, deepspeed, fsdp)
        records = load_records(recipe.data_path)
        samples = run.samples(records)
        report = check_samples(records, samples, recipe)
        if not report.ok:
            if recipe.on_bad_samples == "error":
                raise RecipeError(
                    f"`data_path` {recipe.data_path!r} with `image_folder` "
                    f"{recipe.image_folder!r}: {report.summary()}\nFix the data (`llava-moslora "
                    'check-data` re-checks it), or set `on_bad_samples="drop"` in llava_dataset.'
                )
            bad = report.bad_indices
            print(
                f"hf engine: dropping {len(bad)} bad samples: {report.summary()}", file=sys.stderr
            )
            samples = run.samples([r for i, r in enumerate(records) if i not in bad])
        if resume:
            pointer = Path(work_dir) / "last_checkpoint"
            if pointer.is_file():
                run.resume(pointer.read_text().strip())
            else:  # as mmengine's resume: nothing saved yet, so start from the beginning
                print(
                    f"hf engine: --resume: no {pointer} yet, starting at iteration 0",
                    file=sys.stderr,
                )
        run.train(samples, max_iters)
    except (
        RecipeError,
        DataFileError,
        CorruptCheckpointError,
        UnsafeCheckpointError,
        NonFiniteTensorError,
        OSError,
    ) as error:
        print(f"error: training refused: {error}", file=sys.stderr)
        return USAGE_ERROR
    return 0
