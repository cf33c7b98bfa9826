"""Read the trained tensors out of an `xtuner train` checkpoint, whichever way it was saved.

    iter_N.pth   a file (plain mmengine runner): {"state_dict": ..., "optimizer": ..., ...}
    iter_N.pth/  a folder (`--deepspeed ...`): DeepSpeed's [zero_pp_rank_0_]mp_rank_00_model_states.pt
                 plus one *_optim_states.pt per rank; under ZeRO-3 the model states hold only
                 placeholders, the real values are the optimizer's fp32 partitions.

XTuner's own `guess_load_checkpoint` reads the folder through `zero_to_any_dtype`, whose default
dtype is float16: fine for export to a half-precision model, lossy for comparing runs. Here the
folder is read with DeepSpeed's `zero_to_fp32` (the exact float32 master weights); either way the
keys are LLaVAModel's: `llm.*lora_*`, `visual_encoder.*lora_*` and `projector.*`.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_trained_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors (adapters and projector) of an mmengine or DeepSpeed checkpoint."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint.parent), tag=checkpoint.name
        )
    elif checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
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
