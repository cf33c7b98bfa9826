"""Saving and loading MoSLoRA adapters so that the mixer can never be dropped silently.

Stock PEFT warns about missing adapter keys but says nothing about unexpected ones, so a MoSLoRA
adapter loaded with plain `PeftModel.from_pretrained` becomes plain LoRA with no mixer and no
warning (the official repo's users hit this, MoSLoRA issue #3). Two safe ways out:

- `save_adapter` / `load_adapter`: keep the mixer; loading registers the MoSLoRA layers and checks
  that every saved tensor landed in the model and every adapter tensor was loaded.
- `save_folded`: fold the mixer into B (B' = B · M) and write a plain LoRA adapter, which any LoRA
  reader (stock PEFT, vLLM, XTuner's merge, VLMEvalKit) loads with identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import OPTIONS_ATTR, mixer_options_of
from .options import OPTIONS_FILE, MixerOptions, read_options, write_options
from .registry import register
from .safety import require_finite, safe_torch_load, unreadable_safetensors

MIXER_KEY = "lora_mixer.weight"
# The official MoSLoRA repository stores the mixer as an nn.Linear called lora_AB.
OFFICIAL_MIXER_KEY = "lora_AB.weight"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # PEFT's older format: read as data, never as code
CONFIG_NAME = "adapter_config.json"


def _adapter_dir(out_dir: str | Path, adapter_name: str) -> Path:
    # PEFT's layout: the "default" adapter at the root, any other in a sub-folder of its name.
    path = Path(out_dir) if adapter_name == "default" else Path(out_dir, adapter_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_adapter(peft_model: PeftModel, out_dir: str | Path) -> None:
    """`peft_model.save_pretrained(out_dir)` plus each MoSLoRA adapter's `moslora_config.json`."""
    peft_model.save_pretrained(str(out_dir))
    for name, config in peft_model.peft_config.items():
        options = mixer_options_of(config)
        if options is not None:
            write_options(_adapter_dir(out_dir, name), options)


def fold_mixer(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a plain-LoRA copy of an adapter state dict: B' = B · M, mixer keys removed.

    ΔW = s · B · M · A = s · (B M) · A, so the outputs are unchanged up to rounding of B M (done in
    float32, stored in B's dtype).
    """
    folded = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(MIXER_KEY)]:
        b_key = key[: -len(MIXER_KEY)] + "lora_B.weight"
        if b_key not in state_dict:
            raise KeyError(
                f"The mixer `{key}` has no matching `{b_key}` in the adapter state dict."
            )
        weight_b = state_dict[b_key]
        mixer = folded.pop(key).to(device=weight_b.device, dtype=torch.float32)
        folded[b_key] = (weight_b.float() @ mixer).to(weight_b.dtype)  # (out, r) @ (r, r)
    return folded


def save_folded(peft_model: PeftModel, out_dir: str | Path) -> None:
    """Write every adapter of `peft_model` as a plain LoRA adapter (mixer folded into B).

    Stock PEFT loads the result with no import of this package and reproduces the MoSLoRA outputs.
    """
    for name, config in peft_model.peft_config.items():
        state_dict = fold_mixer(get_peft_model_state_dict(peft_model, adapter_name=name))
        target = _adapter_dir(out_dir, name)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
            str(target / SAFETENSORS_NAME),
            metadata={"format": "pt"},
        )
        # The plain LoraConfig fields only: the custom-module mapping and mixer options are not
        # dataclass fields, so PEFT never serialises them.
        config.save_pretrained(str(target))


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local adapter folder: safetensors, else PEFT's .bin read as data.

    Unlike PEFT's `load_peft_weights`, a folder without weights is an error naming the file, never
    a download from the hub; NaN/inf tensors are refused, naming the key and the file.
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / SAFETENSORS_NAME
    if path.is_file():
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise unreadable_safetensors(path, error) from None
    elif (adapter_dir / PICKLE_NAME).is_file():
        path = adapter_dir / PICKLE_NAME
        tensors = safe_torch_load(path)
    else:
        raise FileNotFoundError(
            f"adapter incomplete: {path} missing (nor is there a {PICKLE_NAME}); the adapter is "
            "read from local files only. Copy the whole adapter folder, or re-export it."
        )
    require_finite(tensors, path)
    return tensors


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Load an adapter folder onto `model` (a base model or a PeftModel), mixer included.

    Registers the MoSLoRA layers when the saved tensors contain a mixer (ours, `lora_mixer`, or the
    official repo's `lora_AB`), then raises if any saved tensor was not consumed or any adapter
    tensor of the model was left unloaded. Plain LoRA adapters (e.g. from `save_folded`) load too.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_NAME).is_file():  # PeftConfig would look on the hub instead
        raise FileNotFoundError(
            f"adapter incomplete: {adapter_dir / CONFIG_NAME} missing; the adapter is read from "
            "local files only. Copy the whole adapter folder, or re-export it."
        )
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"`adapter_dir` should hold a LoRA/MoSLoRA adapter but {adapter_dir} holds a "
            f"{type(config).__name__}."
        )
    saved = read_adapter_weights(adapter_dir)
    official = any(k.endswith(OFFICIAL_MIXER_KEY) for k in saved)  # always a learned mixer
    saved = {k.replace(OFFICIAL_MIXER_KEY, MIXER_KEY): v for k, v in saved.items()}
    has_mixer = any(k.endswith(MIXER_KEY) for k in saved)
    options = read_options(adapter_dir)
    if has_mixer and options is None and is_trainable and not official:
        # Whether the mixer was learned or frozen (identity, butterfly, init-only) is only written
        # in moslora_config.json: guessing "learned" would make a frozen mixer trainable.
        raise ValueError(
            f"{adapter_dir} holds a MoSLoRA mixer but no {OPTIONS_FILE}, so whether the mixer is "
            "learned or frozen is unknown; `is_trainable=True` would train it either way. Copy "
            f"{OPTIONS_FILE} from the export, or load with `is_trainable=False` for inference."
        )
    if options is not None and not has_mixer:
        raise ValueError(
            f"{adapter_dir} declares a MoSLoRA adapter (moslora_config.json) but its weights hold no "
            f"`{MIXER_KEY}` tensor: the mixer was lost when it was saved. Re-export it from the "
            "training checkpoint."
        )
    if has_mixer:
        setattr(config, OPTIONS_ATTR, options or MixerOptions())
        register(config)
    config.inference_mode = not is_trainable

    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    set_peft_model_state_dict(peft_model, saved, adapter_name=adapter_name)
    _check_every_tensor_loaded(peft_model, saved, adapter_name, adapter_dir)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def _check_every_tensor_loaded(
    peft_model: PeftModel, saved: dict[str, torch.Tensor], adapter_name: str, adapter_dir: Path
) -> None:
    loaded = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    unconsumed = sorted(k for k in saved if k not in loaded)
    if unconsumed:
        raise ValueError(
            f"{len(unconsumed)} tensor(s) saved in {adapter_dir} have no place in the model, e.g. "
            f"{unconsumed[:3]}; loading would silently drop them. Check that the adapter was trained "
            "on this base model, with these target modules."
        )
    unloaded = sorted(k for k in loaded if k not in saved)
    if unloaded:
        raise ValueError(
            f"{len(unloaded)} adapter tensor(s) of the model are missing from {adapter_dir}, e.g. "
            f"{unloaded[:3]}; they would keep their random initial values."
        )
    changed = [k for k in saved if not torch.equal(loaded[k].cpu(), saved[k].to(loaded[k].dtype))]
    if changed:
        raise ValueError(
            f"{len(changed)} tensor(s) from {adapter_dir} did not arrive in the model unchanged, "
            f"e.g. {changed[:3]}."
        )
