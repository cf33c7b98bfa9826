"""DeepSpeed ZeRO-2 / ZeRO-3 for the hf engine, through accelerate, from XTuner's own presets.

`llava-moslora train --engine hf CONFIG --deepspeed deepspeed_zero2` takes the name users give
`xtuner train` today, and reads the same file: XTuner's preset (`xtuner.configs.cfgs_name_path`,
xtuner/configs/deepspeed/deepspeed_zero2.json). Its "auto" values are filled from the recipe, as
xtuner/tools/train.py fills them from the config, so no DeepSpeed number is written here:

    preset key                        value (the recipe, i.e. the config)
    gradient_accumulation_steps       accumulative_counts   (optim_wrapper.accumulative_counts)
    train_micro_batch_size_per_gpu    batch_size            (train_dataloader.batch_size)
    gradient_clipping                 max_norm              (optim_wrapper.clip_grad; 0: none)
    fp16.enabled / bf16.enabled       amp_dtype, on CUDA    (AmpOptimWrapper's dtype)

Two choices differ from XTuner on purpose: without `clip_grad` XTuner clips at 1.0 under
DeepSpeed and not without it; here a run clips the same with and without DeepSpeed. And "auto"
precision follows the config's AmpOptimWrapper dtype on CUDA and is float32 on a CPU, where
XTuner's "auto" asks for fp16 (llava_moslora.train.cpu_shims turns that off for XTuner).

accelerate builds the DeepSpeedEngine (`Accelerator(deepspeed_plugin=DeepSpeedPlugin(
hf_ds_config=...))`, `prepare(model, optimizer)`); the hf engine's loop keeps its own schedule
and its mmengine-like accumulation (hf_engine.Run.step). A single process started without a
launcher gets a one-process group (RANK=0, WORLD_SIZE=1 and a free local port), as torchrun
would give it: accelerate only uses DeepSpeed in a distributed state (with `cpu=True` it silently
falls back to DDP).
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path
from typing import Any

from packaging.version import Version

from . import deepspeed_defects
from .hf_recipe import Recipe, RecipeError

PRESETS = ("deepspeed_zero2", "deepspeed_zero3")  # XTuner's names, tested with the hf engine


def preset_file(choice: str) -> Path:
    """XTuner's JSON for `--deepspeed CHOICE`, the file `xtuner train --deepspeed CHOICE` reads."""
    if choice not in PRESETS:
        raise RecipeError(
            f"`--deepspeed` should be one of {', '.join(PRESETS)} for the hf engine but the value "
            f"passed is {choice!r}"
        )
    try:
        import deepspeed  # noqa: F401 - only to refuse early, in one line
    except ImportError as error:
        raise RecipeError(
            f"`--deepspeed {choice}` needs DeepSpeed, which does not import here ({error}): "
            "run it in the default environment (`uv sync`), or leave `--deepspeed` out"
        ) from error
    try:
        from xtuner.configs import cfgs_name_path
    except ImportError as error:
        raise RecipeError(
            f"`--deepspeed {choice}` reads XTuner's preset of that name, and XTuner does not "
            f"import here ({error}): run it in the default environment (`uv sync`)"
        ) from error
    return Path(cfgs_name_path[choice])


def deepspeed_config(choice: str, recipe: Recipe, cuda: bool) -> dict[str, Any]:
    """XTuner's preset `choice` with its "auto" values filled from `recipe` (module docstring)."""
    config = copy.deepcopy(json.loads(preset_file(choice).read_text()))
    counts, version = recipe.accumulative_counts, deepspeed_defects.installed_deepspeed()
    defect = deepspeed_defects.zero2_accumulation_defect(config, counts, version)
    fixed = deepspeed_defects.ZERO2_ACCUMULATION_LOST[1]
    if (
        defect is None
        and config["zero_optimization"]["stage"] == 2
        and counts > 1
        and (version is None or Version(version) >= Version(fixed))
    ):
        # The lock's 0.17.5 gives the plain loop's numbers (tests/test_hf_deepspeed.py). Measured
        # with DeepSpeed 0.18.3's sources (no defect; `xtuner train` with ZeRO-2 gives ZeRO-3's
        # numbers there): driven through accelerate, its ZeRO-2 skipped the clipping and ended
        # 6.9e-4 off the plain loop (losses 5.4e-3). Until that is understood: refused there.
        defect = (
            f"ZeRO-2 with `accumulative_counts` {counts} is not matched to the plain loop yet "
            f"(DeepSpeed {version}; docs/training.md); use `--deepspeed deepspeed_zero3`, or "
            f"`accumulative_counts=1` with a batch {counts} times larger"
        )
    if defect:
        raise RecipeError(f"`--deepspeed {choice}`: {defect}")
    config["gradient_accumulation_steps"] = recipe.accumulative_counts
    config["train_micro_batch_size_per_gpu"] = recipe.batch_size
    config["gradient_clipping"] = recipe.max_norm or 0.0
    for section, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        if config.get(section, {}).get("enabled") == "auto":
            config[section]["enabled"] = cuda and recipe.amp_dtype == dtype
    return config


def _single_process_env() -> None:
    """RANK/WORLD_SIZE/... for a process no launcher started (what torchrun sets for one)."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as probe:  # a free port, for this process's own gloo/nccl group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def prepare(model, optimizer, config: dict[str, Any]):
    """(DeepSpeedEngine, accelerator) for `model` trained by `optimizer` under `config`."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from .compat import route_deepspeed

    route_deepspeed()  # DeepSpeed's own checkpoint reads (`load_checkpoint`) go through safe_torch_load
    _single_process_env()
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state()  # a second run in this process brings its own plugin
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    engine, _ = accelerator.prepare(model, optimizer)
    # The plugin registers its config with transformers, which would then build every later
    # model of this process under ZeRO-3's zero.Init (a resume, a test's reference run).
    unset_hf_deepspeed_config()
    return engine, accelerator
