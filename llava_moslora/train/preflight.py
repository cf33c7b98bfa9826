"""What `llava-moslora train` checks before XTuner starts, so a bad input is one line, not a trace.

XTuner reads the config, merges `--cfg-options` and builds the model inside its child process;
a bad value there ends in a traceback (the good message, if any, at its bottom) after the towers
are loaded. The launcher reads the same config with mmengine's `Config` first (seconds) and refuses
with one `error:` line naming the field, the value and the fix:

    environment   NNODES, NPROC_PER_NODE, NODE_RANK, PORT: integers in range
    arguments     `--cfg-options` items are KEY=VALUE and merge into the config
    config        it parses (a syntax error names the file and line)
    adapters      model.llm_lora / model.visual_encoder_lora build (r, lora_alpha, lora_dropout,
                  mixer_init, ...: `moslora.config.check_lora_options`), and their
                  `target_modules` match only layers the adapter can wrap, checked on the tower's
                  skeleton built on the meta device from its local config.json
    model paths   a hub id is local, cached or reachable (llava_moslora/hub.py), else one line at
                  once instead of a connection traceback after minutes of retries
    --deepspeed   not a ZeRO-2 preset with accumulation on a DeepSpeed that drops the group's
                  gradients (deepspeed_defects.py)

and re-derives what a `--cfg-options` override leaves stale (the ViT layers feeding a changed
`visual_select_layer`: builders/vision_layers.py). The work dir is claimed in work_dir.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTERS = ("llm_lora", "visual_encoder_lora")
# Which tower each adapter wraps, and the key of its model path.
TOWERS = {"llm_lora": "llm", "visual_encoder_lora": "visual_encoder"}
MODEL_PATHS = (
    "model.llm.pretrained_model_name_or_path",
    "model.visual_encoder.pretrained_model_name_or_path",
    "tokenizer.pretrained_model_name_or_path",
    "image_processor.pretrained_model_name_or_path",
)
SHOWN_NAMES = 6  # layer names listed when a target matches nothing


class TrainInputError(ValueError):
    """An input of `llava-moslora train` the user can fix, said in one line."""


def env_int(
    env: Mapping[str, str], name: str, default: int | None, low: int, high: int | None = None
) -> int | None:
    """The integer environment variable `name` (a launcher setting), checked to be in range;
    `default` when it is unset or empty."""
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        unset = "picked at random" if default is None else default
        raise TrainInputError(
            f"environment variable `{name}` should be an integer {span} but is {text!r}. Set it "
            f"to e.g. {name}={low}, or unset it (default {unset})."
        )
    return value


@dataclass(frozen=True)
class Launcher:
    """XTuner's launcher settings from the environment, checked."""

    nnodes: int
    nproc_per_node: int
    node_rank: int
    port: int | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Launcher:
        nnodes = env_int(env, "NNODES", 1, 1)
        port = env_int(env, "PORT", None, 1, 65535)
        return cls(
            nnodes=nnodes,
            nproc_per_node=env_int(env, "NPROC_PER_NODE", 1, 1),
            node_rank=env_int(env, "NODE_RANK", 0, 0, nnodes - 1),
            port=port,
        )


def parse_args(args: Sequence[str]) -> argparse.Namespace:
    """The arguments of `xtuner train` this launcher reads (the rest pass to XTuner as given)."""
    parser = argparse.ArgumentParser(prog="llava-moslora train", add_help=False)
    parser.add_argument("config")
    parser.add_argument("--work-dir")
    parser.add_argument("--resume")
    parser.add_argument("--cfg-options", nargs="+", action="extend", default=[])
    parser.add_argument("--deepspeed")
    parser.add_argument("--launcher", default="none")
    known, _ = parser.parse_known_args(list(args))
    return known


def read_config(config: str):
    """The config as `xtuner train` reads it; one line for any failure."""
    from mmengine.config import Config

    path = config
    if not Path(config).is_file():
        from xtuner.configs import cfgs_name_path  # XTuner's own configs, by name

        if config not in cfgs_name_path:
            raise TrainInputError(
                f"`config` {config!r}: no such file, nor a config name XTuner knows. Pass the "
                "path of an XTuner config, e.g. configs/tiny_moslora.py."
            )
        path = cfgs_name_path[config]
    try:
        return Config.fromfile(path)
    except SyntaxError as error:
        raise TrainInputError(
            f"`config` {config} has a syntax error at line {error.lineno}: {error.msg}. Fix the "
            "file."
        ) from None
    except Exception as error:  # noqa: BLE001 - NameError, ImportError, KeyError ... of the file
        raise TrainInputError(
            f"`config` {config} cannot be read as an XTuner config ({type(error).__name__}: "
            f"{error}). Fix the file (`xtuner train` would fail the same way)."
        ) from None


def merge_options(cfg, options: Mapping[str, Any]) -> list[str]:
    """Merge `--cfg-options` into `cfg`, with what they leave stale derived again; return those
    derived items as `--cfg-options` arguments for XTuner (which merges the user's itself)."""
    from llava_moslora.builders.vision_layers import rederived_layers

    try:
        derived = rederived_layers(cfg, dict(options))
    except ValueError as error:
        raise TrainInputError(f"`--cfg-options`: {error}") from None
    try:
        cfg.merge_from_dict({**options, **derived})
    except Exception as error:  # noqa: BLE001 - a key path through a value that is not a dict
        raise TrainInputError(
            f"`--cfg-options` {dict(options)} do not merge into the config "
            f"({type(error).__name__}: {error}). Check each KEY's path in the config."
        ) from None
    return [f"{key}={_option_text(value)}" for key, value in derived.items()]


def _option_text(value: Any) -> str:
    """`value` as mmengine's DictAction reads it back (lists without spaces)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_option_text(v) for v in value) + "]"
    return str(value)


def _skeleton(tower: Mapping[str, Any]):
    """The tower `tower` (a config's `model.llm` / `model.visual_encoder`) built on the meta device
    from its local config.json, or None when it cannot be (a hub id, another builder)."""
    import torch
    from transformers import AutoConfig

    owner = getattr(tower.get("type"), "__self__", None)  # AutoModelForCausalLM.from_pretrained
    path = tower.get("pretrained_model_name_or_path")
    if not isinstance(owner, type) or not path or not (Path(path) / "config.json").is_file():
        return None
    remote = bool(tower.get("trust_remote_code", False))
    try:
        with torch.device("meta"):
            if hasattr(owner, "from_config"):  # an Auto class
                config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
                return owner.from_config(config, trust_remote_code=remote)
            return owner._from_config(owner.config_class.from_pretrained(path))
    except Exception:  # noqa: BLE001 - a tower this check cannot build: XTuner's load reports it
        return None


def _check_targets(key: str, lora, tower: Mapping[str, Any]) -> None:
    """Refuse targets that match no layer of the tower, or that MoSLoRA cannot wrap."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from torch import nn

    from llava_moslora.moslora.layers import OPTIONS_ATTR
    from llava_moslora.moslora.registry import refuse_unsupported_target

    if lora.target_modules is None:
        return  # XTuner picks every linear layer itself
    model = _skeleton(tower)
    if model is None:
        return
    matched = [
        (name, module)
        for name, module in model.named_modules()
        if name and check_target_module_exists(lora, name)
    ]
    if not matched:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear}
        )
        shown = ", ".join(linear[:SHOWN_NAMES]) + (", ..." if len(linear) > SHOWN_NAMES else "")
        raise TrainInputError(
            f"`model.{key}.target_modules` {lora.target_modules!r} matches no layer of "
            f"{tower['pretrained_model_name_or_path']}: name its linear layers (e.g. {shown})."
        )
    if getattr(lora, OPTIONS_ATTR, None) is not None:  # MoSLoRA: nn.Linear layers only
        for name, module in matched:
            if not isinstance(module, nn.Linear):
                try:
                    refuse_unsupported_target(module, "default", target_name=name)
                except ValueError as error:
                    raise TrainInputError(f"`model.{key}`: {error}") from None


def check_adapters(cfg) -> None:
    """Build each adapter config of `cfg.model` and check its options and targets (module doc)."""
    from llava_moslora.moslora.config import check_lora_options

    for key in ADAPTERS:
        spec = cfg.model.get(key)
        if not spec:
            continue
        spec = dict(spec)
        factory = spec.pop("type", None)
        if not callable(factory):
            continue  # not a config this check knows how to build: XTuner's build reports it
        try:
            lora = factory(**spec)
            check_lora_options(lora)
        except (TypeError, ValueError) as error:
            raise TrainInputError(f"`model.{key}`: {error}") from None
        _check_targets(key, lora, cfg.model.get(TOWERS[key]) or {})


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "get"):
            return None
        node = node.get(part)
    return node


def check_model_paths(cfg) -> None:
    """Each model path of `cfg` is local, cached or downloadable now (llava_moslora/hub.py)."""
    from llava_moslora.hub import available_offline, hub_reachable, unreachable

    names = [(key, _get(cfg, key)) for key in MODEL_PATHS]
    missing = [(key, name) for key, name in names if isinstance(name, str) and name]
    missing = [(key, name) for key, name in missing if not available_offline(name)]
    for key, name in missing:
        if name.startswith(("/", "./", "../", "~")):  # a path, never a hub id
            raise TrainInputError(
                f"`{key}` {name!r}: no such file or folder. Check the config's paths."
            )
    if missing and not hub_reachable():  # one connect, however many names
        key, name = missing[0]
        raise TrainInputError(str(unreachable(name, key)))


def check_deepspeed(cfg, choice: str | None) -> None:
    """`--deepspeed CHOICE` (a preset name or a JSON file, as `xtuner train` takes it) trains
    `cfg` right on the installed DeepSpeed: xtuner/tools/train.py sets the preset's accumulation
    to the config's `optim_wrapper.accumulative_counts`, whatever the file says."""
    import json

    from . import deepspeed_defects

    if choice is None:
        return
    path = Path(choice)
    if not path.is_file():
        from xtuner.configs import cfgs_name_path

        if choice not in cfgs_name_path:
            return  # XTuner refuses it itself ("Cannot find ...")
        path = Path(cfgs_name_path[choice])
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # XTuner reads it next and says what is wrong
    accumulation = cfg.optim_wrapper.get("accumulative_counts", 1)
    version = deepspeed_defects.installed_deepspeed()
    defect = deepspeed_defects.zero2_accumulation_defect(config, accumulation, version)
    if defect:
        raise TrainInputError(f"`--deepspeed {choice}`: {defect}")
