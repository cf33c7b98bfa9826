"""Small patches that let XTuner 0.2.0 + mmengine 0.10 train on a machine without a GPU.

GPU users need none of them, and each is a no-op where CUDA is available. `apply()` installs them
all (idempotently); `configs/tiny_*.py` call it while they are parsed, which happens in every
process `xtuner train` starts, before the runner or any model exists.
"""

from __future__ import annotations

import functools
import os

import torch


def cpu_is_bf16_supported() -> None:
    """Give `torch.cpu` the `is_bf16_supported()` that XTuner expects of every device module.

    XTuner picks its device module with `xtuner.utils.device.get_torch_device()`, which returns
    `torch.cpu` when there is neither CUDA nor NPU, and then LLaVAModel (building its LLM config),
    SupervisedFinetune and the DeepSpeed "auto" dtype logic call `.is_bf16_supported()` on it:

        AttributeError: module 'torch.cpu' has no attribute 'is_bf16_supported'

    The answer is False: CPU runs here train in float32, so XTuner's automatic choices (the flash
    attention dtype, DeepSpeed's `bf16: auto`) should not switch to bfloat16.
    """
    if torch.cuda.is_available() or hasattr(torch.cpu, "is_bf16_supported"):
        return
    torch.cpu.is_bf16_supported = lambda including_emulation=True: False


def cuda_set_device_without_cuda() -> None:
    """Make `torch.cuda.set_device` a no-op when CUDA is unavailable.

    mmengine's `init_dist` (used by `xtuner train --launcher pytorch`, i.e. under torchrun) calls
    `torch.cuda.set_device(local_rank)` before it creates the process group, whatever the backend:

        RuntimeError: Found no NVIDIA driver on your system. ...

    With no CUDA device there is nothing to select, so the call is skipped; the process group
    itself is then created with the configured backend (gloo on CPU).
    """
    if torch.cuda.is_available() or getattr(torch.cuda.set_device, "_cpu_shim", False):
        return
    original = torch.cuda.set_device

    @functools.wraps(original)
    def set_device(device) -> None:
        if torch.cuda.is_available():
            original(device)

    set_device._cpu_shim = True
    torch.cuda.set_device = set_device


def llava_dataset_map_processes() -> None:
    """Let XTuner's LLaVADataset fork no more tokenizing processes than there are CPUs.

    `LLaVADataset` tokenizes its JSON with `process_hf_dataset`, whose `map_num_proc` defaults to
    32 and which LLaVADataset gives no way to change; each of its `datasets` map/filter passes
    then forks 32 copies of the training process. On a 2-core machine that took ~24 s for the
    320-sample tiny set, most of the tiny run's start-up. The result does not depend on the number
    of processes, so the default becomes min(32, CPU count); an explicit `map_num_proc` is kept.
    """
    if torch.cuda.is_available():
        return
    import xtuner.dataset.llava as llava  # LLaVADataset looks the function up here

    if getattr(llava.process_hf_dataset, "_cpu_shim", False):
        return
    original = llava.process_hf_dataset

    @functools.wraps(original)
    def process_hf_dataset(*args, **kwargs):
        kwargs.setdefault("map_num_proc", min(32, os.cpu_count() or 1))
        return original(*args, **kwargs)

    process_hf_dataset._cpu_shim = True
    llava.process_hf_dataset = process_hf_dataset


SHIMS = (cpu_is_bf16_supported, cuda_set_device_without_cuda, llava_dataset_map_processes)


def apply() -> None:
    """Install every shim in `SHIMS`; safe to call more than once."""
    for shim in SHIMS:
        shim()
