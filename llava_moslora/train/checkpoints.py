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
globals these checkpoints pickle allowed (`checkpoint_globals`). DeepSpeed's `zero_to_fp32` calls
`torch.load(..., weights_only=False)` itself; it is not copied here, its module is handed a `torch`
whose `load` is the safe one for the duration of the call (`_zero_to_fp32_loads_safely`).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llava_moslora.moslora.safety import safe_torch_load
from llava_moslora.train.compat import mmengine_checkpoint_globals


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


def load_checkpoint_file(path: str | Path, *, mmap: bool | None = None) -> Any:
    """One training checkpoint file, read as data: only `checkpoint_globals()` may be unpickled."""
    return safe_torch_load(path, allowed_globals=checkpoint_globals(), mmap=mmap)


@contextlib.contextmanager
def _zero_to_fp32_loads_safely() -> Iterator[Any]:
    """DeepSpeed's zero_to_fp32 module, its `torch.load` replaced by `load_checkpoint_file`.

    Only that module's name `torch` is swapped (for a namespace that forwards everything else to
    torch), so no other code in the process sees a changed `torch.load`.
    """
    from deepspeed.utils import zero_to_fp32

    def load(file, map_location=None, mmap=None, weights_only=None, **kwargs):  # noqa: ARG001
        # zero_to_fp32 passes weights_only=False; it is ignored: the safe loader always applies.
        return safe_torch_load(
            file, allowed_globals=checkpoint_globals(), map_location=map_location, mmap=mmap
        )

    class _TorchWithSafeLoad(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    safe_torch = _TorchWithSafeLoad("torch")
    safe_torch.load = load
    original = zero_to_fp32.torch
    zero_to_fp32.torch = safe_torch
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = original


def load_trained_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors (adapters and projector) of an mmengine or DeepSpeed checkpoint."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        with _zero_to_fp32_loads_safely() as zero_to_fp32:
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                str(checkpoint.parent), tag=checkpoint.name
            )
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
