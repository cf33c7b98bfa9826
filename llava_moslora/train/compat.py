"""Route XTuner's and mmengine's own checkpoint reads through the safe loader (torch >= 2.6 too).

Four reads during training are not ours, and each calls `torch.load` on a file from outside:

    mmengine   `load_from_local` (the runner's `--resume` and `load_from`)  bare torch.load
    DeepSpeed  `TorchCheckpointEngine.load` (`--resume` under --deepspeed)   weights_only=False
    XTuner     `get_seed_from_checkpoint` (the seed `--resume` restores)    bare torch.load
    XTuner     `guess_load_checkpoint` (LLaVAModel's `pretrained_pth`)      weights_only=False

On torch >= 2.6 a bare `torch.load` is weights-only and refuses an mmengine checkpoint's message
hub ("Unsupported global: HistoryBuffer"), so `--resume` fails; `weights_only=False` runs whatever
the pickle says. Allowing mmengine's globals in torch's process-wide list
(`torch.serialization.add_safe_globals`) would fix the bare ones and widen every other load in the
process, adapters included -- and the list mmengine needs held `builtins.getattr`, with which a
pickle rebinds `len` to `exec`. So nothing is registered with torch. Instead `apply()` hands each
of the four its safe counterpart in `llava_moslora.train.checkpoints`:

    mmengine's CheckpointLoader scheme for local paths  ->  load_checkpoint_file
    DeepSpeed's TorchCheckpointEngine.load              ->  load_checkpoint_file
    get_seed_from_checkpoint (where XTuner bound it)     ->  resumed_seed
    guess_load_checkpoint (where XTuner bound it)        ->  pretrained_state

through mmengine's documented hook (`CheckpointLoader.register_scheme(..., force=True)`), the
method of DeepSpeed's default checkpoint engine, and, for XTuner, by rebinding the names in the modules that imported them (`xtuner train` runs
xtuner/tools/train.py as `__main__`, so that is one of them). Every replacement refuses more than
the original, never less; the rebinding is done once and never undone, so no thread sees it
half-done. `configs/_base_/default_runtime.py` calls `apply()` while the config is parsed (before
XTuner reads the seed or builds the model), and `llava_moslora.runs.build_model` calls it too.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

# name: the modules where XTuner 0.2.0 defines (first) and imports the two functions it reads checkpoints with.
XTUNER_READERS = {
    "get_seed_from_checkpoint": ("xtuner.tools.utils", "xtuner.tools.train", "__main__"),
    "guess_load_checkpoint": (
        "xtuner.model.utils",
        "xtuner.model.llava",
        "xtuner.model.internvl",
        "xtuner.tools.test",
        "xtuner.tools.model_converters.pth_to_hf",
    ),
}


def _load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's `load_from_local`, read as data."""
    from llava_moslora.train.checkpoints import load_checkpoint_file

    return load_checkpoint_file(os.path.expanduser(filename), map_location=map_location)


def _route_mmengine() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=_load_from_local, force=True)


def _deepspeed_engine_load(self: Any, path: str, map_location: Any = None) -> Any:  # noqa: ARG001
    """DeepSpeed's `TorchCheckpointEngine.load`, read as data."""
    from llava_moslora.train.checkpoints import load_checkpoint_file

    return load_checkpoint_file(path, map_location=map_location)


def route_deepspeed() -> None:
    """DeepSpeed's checkpoint engine reads through the safe loader (also the hf engine's)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    TorchCheckpointEngine.load = _deepspeed_engine_load


def _route_xtuner() -> None:
    from llava_moslora.train.checkpoints import pretrained_state, resumed_seed

    safe = {"get_seed_from_checkpoint": resumed_seed, "guess_load_checkpoint": pretrained_state}
    for name, modules in XTUNER_READERS.items():
        defining = importlib.import_module(modules[0])
        original = getattr(defining, name)
        if original is safe[name]:  # applied before
            continue
        # The defining module first: modules imported from now on bind the safe function. Those
        # imported before hold XTuner's (`__main__` may be anything: only if it holds that).
        for module_name in modules:
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, name, None) is original:
                setattr(module, name, safe[name])


def apply() -> None:
    """Install the routes; safe to call more than once."""
    _route_mmengine()
    route_deepspeed()
    _route_xtuner()
