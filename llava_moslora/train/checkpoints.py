"""Read the trained tensors out of an `xtuner train` checkpoint, whichever way it was saved.

    iter_N.pth   a file (plain mmengine runner): {"state_dict": ..., "optimizer": ..., ...}
    iter_N.pth/  a folder (`--deepspeed ...`): DeepSpeed's [zero_pp_rank_0_]mp_rank_00_model_states.pt
                 plus one *_optim_states.pt per rank; under ZeRO-3 the model states hold only
                 placeholders, the real values are the optimizer's fp32 partitions.

XTuner's own `guess_load_checkpoint` reads the folder through `zero_to_any_dtype`, whose default
dtype is float16: fine for export to a half-precision model, lossy for comparing runs. Here the
folder is read with DeepSpeed's `zero_to_fp32` (the exact float32 master weights); either way the
keys are LLaVAModel's: `llm.*lora_*`, `visual_encoder.*lora_*` and `projector.*`.

Every file is read as data (`llava_moslora.moslora.safety.safe_torch_load`) with exactly the
globals these checkpoints pickle allowed (`checkpoint_globals`): classes and constants, and one
function, `builtins.getattr`, stood in for by `history_buffer_statistic`, which answers only the
lookups mmengine's HistoryBuffer pickles. DeepSpeed's `zero_to_fp32` calls `torch.load(...,
weights_only=False)` itself; it is not copied here: a private instance of that module
(`_safe_zero_to_fp32`) has its `torch` bound to one whose `load` is the safe one. The shared
module is never touched, so threads loading at once cannot see each other's half-done swap.

`llava_moslora.train.compat` routes XTuner's and mmengine's own checkpoint reads (resume, the
resumed seed, `pretrained_pth`) here.
"""

from __future__ import annotations

import builtins
import functools
import os
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava_moslora.moslora.safety import private_module_copy, safe_torch_load

# The numpy dtypes mmengine's logs hold (float losses, int counters, bool flags).
_NUMPY_SCALARS = (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)
# mmengine's default HistoryBuffer statistics (`HistoryBuffer._set_default_statistics`): a saved
# message hub pickles each as getattr(HistoryBuffer, name), protocol 2's way to name a method.
HISTORY_BUFFER_STATISTICS = ("min", "max", "current", "mean")


def _numpy_core():
    # numpy 2 renamed numpy.core to numpy._core; checkpoints name whichever wrote them.
    return getattr(np, "_core", None) or np.core


def history_buffer_statistic(owner: Any, name: Any) -> Any:
    """`getattr(owner, name)` for exactly mmengine's HistoryBuffer statistics methods.

    The one stand-in for `builtins.getattr` in a checkpoint. The real getattr reaches any object
    from any other (a function's globals, the builtins module, ...): with it allowed, a pickle can
    rebind `len` to `exec` and have an allowed class's constructor run its code.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    if owner is HistoryBuffer and name in HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"GLOBAL builtins.getattr(<{type(owner).__name__}>, {str(name)[:40]!r}) is not allowed: "
        f"a checkpoint may only look up HistoryBuffer.{'/'.join(HISTORY_BUFFER_STATISTICS)}"
    )


def mmengine_checkpoint_globals() -> list:
    """The non-tensor globals an mmengine / XTuner training checkpoint pickles.

    Found with `torch.serialization.get_unsafe_globals_in_checkpoint` on a tiny run's checkpoint:
    the message hub's HistoryBuffer (its statistics methods pickled as getattr(HistoryBuffer,
    "mean")) and the numpy arrays and scalars of the logs. Classes and numpy's own array/scalar
    constructors, plus `history_buffer_statistic` under getattr's name.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    core = _numpy_core()
    return [
        HistoryBuffer,
        (history_buffer_statistic, f"{builtins.__name__}.getattr"),
        np.ndarray,
        np.dtype,
        core.multiarray._reconstruct,
        core.multiarray.scalar,
        *(type(np.dtype(scalar)) for scalar in _NUMPY_SCALARS),
    ]


def deepspeed_checkpoint_globals() -> list:
    """The non-tensor globals DeepSpeed adds to its *_model_states.pt / *_optim_states.pt files.

    Found with `torch.serialization.get_unsafe_globals_in_checkpoint` on a ZeRO-2 `xtuner train`
    folder (DeepSpeed 0.17): mmengine's ConfigDict (the client state), the ZeRO stage enum, the
    loss scaler object and the fp32 fragment addresses. The static LossScaler is the fp16 twin.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from mmengine.config.config import ConfigDict

    return [ConfigDict, ZeroStageEnum, DynamicLossScaler, LossScaler, fragment_address]


def checkpoint_globals() -> list:
    """Every global an `xtuner train` checkpoint (mmengine file or DeepSpeed folder) may pickle."""
    return mmengine_checkpoint_globals() + deepspeed_checkpoint_globals()


def load_checkpoint_file(
    path: str | Path, *, map_location: Any = "cpu", mmap: bool | None = None
) -> Any:
    """One training checkpoint file, read as data: only `checkpoint_globals()` may be unpickled."""
    return safe_torch_load(
        path, allowed_globals=checkpoint_globals(), map_location=map_location, mmap=mmap
    )


@functools.cache
def _safe_zero_to_fp32() -> types.ModuleType:
    """A private instance of DeepSpeed's zero_to_fp32 whose `torch.load` is `load_checkpoint_file`.

    Its `torch` is a namespace that forwards everything else to torch. Built once and never
    changed afterwards; `deepspeed.utils.zero_to_fp32` itself stays as DeepSpeed made it.
    """
    from deepspeed.utils import zero_to_fp32

    def load(file, map_location=None, mmap=None, weights_only=None, **kwargs):  # noqa: ARG001
        # zero_to_fp32 passes weights_only=False; it is ignored: the safe loader always applies.
        return load_checkpoint_file(file, map_location=map_location, mmap=mmap)

    class _TorchWithSafeLoad(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    safe_torch = _TorchWithSafeLoad("torch")
    safe_torch.load = load
    module = private_module_copy(zero_to_fp32, "llava_moslora._zero_to_fp32")
    module.torch = safe_torch
    return module


def model_states_file(checkpoint: str | Path) -> Path:
    """The file holding a checkpoint's meta: the iter_N.pth file itself, or in a DeepSpeed folder
    its rank-0 `*mp_rank_00_model_states.pt` (where XTuner reads the resumed seed)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        files = sorted(checkpoint.glob("*mp_rank_00_model_states.pt"))
        if not files:
            raise FileNotFoundError(
                f"{checkpoint} holds no *mp_rank_00_model_states.pt: it is not a DeepSpeed "
                "checkpoint folder written by `xtuner train --deepspeed`."
            )
        return files[0]
    return checkpoint


def checkpoint_meta(checkpoint: str | Path) -> dict:
    """The `meta` mmengine saved with a checkpoint (seed, iteration, ...), read as data."""
    saved = load_checkpoint_file(model_states_file(checkpoint), mmap=True)
    meta = saved.get("meta") if isinstance(saved, dict) else None
    return meta if isinstance(meta, dict) else {}


def resumed_seed(checkpoint: str | Path) -> Any:
    """XTuner's `get_seed_from_checkpoint` (the seed `xtuner train --resume` restores), safely."""
    return checkpoint_meta(checkpoint)["seed"]


def pretrained_state(path: str | Path) -> dict[str, torch.Tensor]:
    """XTuner's `guess_load_checkpoint` (how LLaVAModel reads `pretrained_pth`), safely.

    A file's `state_dict` (or the file's dict itself, as XTuner accepts), or a DeepSpeed folder's
    float32 weights. Its keys are LLaVAModel's; XTuner loads them with strict=False.
    """
    path = Path(os.path.expanduser(path))
    if path.is_dir():
        return load_trained_state(path)
    if not path.is_file():
        raise FileNotFoundError(f"`pretrained_pth` {path}: no such file or DeepSpeed folder")
    saved = load_checkpoint_file(path)
    if isinstance(saved, dict) and "state_dict" in saved:
        saved = saved["state_dict"]
    if not isinstance(saved, dict):
        raise ValueError(
            f"`pretrained_pth` {path} holds a {type(saved).__name__}, not a state dict: pass the "
            "projector checkpoint (iter_N.pth) of a pretraining run."
        )
    return saved


def load_trained_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors (adapters and projector) of an mmengine or DeepSpeed checkpoint."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        state = _safe_zero_to_fp32().get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint.parent), tag=checkpoint.name
        )
        # The hf engine's folders hold LlavaForConditionalGeneration's keys and, in their meta,
        # the mapping to XTuner's (`xtuner_keys`), so every reader sees XTuner's keys.
        renamed = checkpoint_meta(checkpoint).get("xtuner_keys")
        if isinstance(renamed, dict):
            state = {renamed.get(key, key): tensor for key, tensor in state.items()}
    elif checkpoint.is_file():
        saved = load_checkpoint_file(checkpoint)
        if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
            raise ValueError(
                f"{checkpoint} holds no `state_dict`: it is not a checkpoint saved by `xtuner "
                "train` (an mmengine iter_N.pth). Pass an iter_N.pth file or DeepSpeed folder."
            )
        state = saved["state_dict"]
    else:
        raise FileNotFoundError(
            f"No checkpoint file or DeepSpeed checkpoint folder at {checkpoint}"
        )
    return {key: tensor.detach().cpu() for key, tensor in state.items()}


def last_checkpoint(work_dir: str | Path) -> Path:
    """The checkpoint that mmengine's `last_checkpoint` file in `work_dir` points at."""
    pointer = Path(work_dir) / "last_checkpoint"
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} does not exist: did the run save a checkpoint?")
    return Path(pointer.read_text().strip())
