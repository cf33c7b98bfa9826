"""Small patches that let XTuner 0.2.0 + mmengine 0.10 train on a machine without a GPU.

GPU users need none of them, and each is a no-op where CUDA is available. `apply()` installs them
all (idempotently); `configs/tiny_*.py` call it while they are parsed, which happens in every
process `xtuner train` starts, before the runner or any model exists.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable

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
    then forks 32 copies of the training process: on a machine with few cores, most of a tiny
    run's start-up. The result does not depend on the number
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


def deepspeed_single_process_group() -> None:
    """Give DeepSpeed a world of one process when no launcher (and no MPI) started this one.

    `xtuner train --deepspeed ...` without torchrun leaves RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT unset, and DeepSpeed's `init_distributed` (called by `deepspeed.initialize` and,
    under ZeRO-3, by `deepspeed.zero.Init` while transformers builds the model) then asks MPI:

        File ".../deepspeed/comm/comm.py", line 861, in mpi_discovery
            from mpi4py import MPI
        ModuleNotFoundError: No module named 'mpi4py'

    Without mpi4py the wrapped `mpi_discovery` creates a one-process gloo group over an
    in-memory store instead (no port to pick, nothing that can clash with a concurrent run);
    DeepSpeed then uses that group. Under torchrun `mpi_discovery` is never called; with mpi4py
    installed the original runs.

    Only patches an already-imported DeepSpeed: `xtuner train` imports it (mmengine.runner ->
    mmengine._strategy) before it parses the config, and importing it just to patch it costs
    half a minute in processes that never use it (pytest parsing the configs).
    """
    if torch.cuda.is_available() or "deepspeed" not in sys.modules:
        return
    from deepspeed.comm import comm

    if getattr(comm.mpi_discovery, "_cpu_shim", False):
        return
    original = comm.mpi_discovery

    @functools.wraps(original)
    def mpi_discovery(*args, **kwargs) -> None:
        if importlib.util.find_spec("mpi4py") is not None:
            return original(*args, **kwargs)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
            )

    mpi_discovery._cpu_shim = True
    comm.mpi_discovery = mpi_discovery


def deepspeed_supports_fp16() -> bool:
    """Whether DeepSpeed's accelerator (its CPU one here) runs fp16: on a CPU, only with oneDNN
    fp16, i.e. AVX512-FP16/AMX. The one place the shim asks, so a test can force either answer."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def deepspeed_fp32_on_cpu() -> None:
    """Train in float32 where XTuner's DeepSpeed presets would ask a CPU for fp16.

    XTuner's presets (`--deepspeed deepspeed_zero2`, ...) say `"fp16": {"enabled": "auto"}`, and
    `xtuner train` resolves "auto" to `get_torch_device().is_available()`, i.e.
    `torch.cpu.is_available()`, which is always True. DeepSpeed's CPU accelerator supports fp16
    only with oneDNN fp16 (AVX512-FP16/AMX CPUs), so elsewhere the engine refuses to start:

        File ".../deepspeed/runtime/engine.py", line 1229, in _do_sanity_check
            raise ValueError("Type fp16 is not supported on your device.")

    The choice is made in `xtuner/tools/train.py` after the config is parsed, so no config
    setting can undo it; the wrapped XTuner `DeepSpeedStrategy` turns fp16 off (with a warning)
    when DeepSpeed's accelerator cannot run it, and leaves every other setting alone. bf16 needs
    no such fix: with `cpu_is_bf16_supported`, "auto" resolves to False.

    Like `deepspeed_single_process_group`, only patches an already-imported DeepSpeed.
    """
    if torch.cuda.is_available() or "deepspeed" not in sys.modules:
        return
    from xtuner.engine._strategy import deepspeed as xtuner_deepspeed

    strategy = xtuner_deepspeed.DeepSpeedStrategy
    if getattr(strategy.__init__, "_cpu_shim", False):
        return
    strategy.__init__ = fp32_where_fp16_unsupported(strategy.__init__)


def fp32_where_fp16_unsupported(original: Callable) -> Callable:
    """`original` (a DeepSpeedStrategy.__init__) with `fp16.enabled` turned off in its `config`
    when `deepspeed_supports_fp16()` says no; the caller's dict is never changed."""
    from mmengine.logging import print_log

    @functools.wraps(original)
    def __init__(self, *args, config=None, **kwargs):
        if isinstance(config, str):
            with open(config) as f:
                config = json.load(f)
        fp16 = (config or {}).get("fp16") or {}
        if fp16.get("enabled") is True and not deepspeed_supports_fp16():
            print_log(
                "DeepSpeed's accelerator does not support fp16 on this machine: training in "
                'float32 (`fp16.enabled` was True, which is how XTuner reads "auto" on a CPU).',
                logger="current",
                level=logging.WARNING,
            )
            config = {**config, "fp16": {**fp16, "enabled": False}}
        original(self, *args, config=config, **kwargs)

    __init__._cpu_shim = True
    return __init__


def bnb_standard_4bit_layout_on_cpu() -> None:
    """Keep every bitsandbytes 4-bit weight on a CPU in the standard layout: no AVX512-BF16 repack.

    bitsandbytes 0.50 sets `Linear4bit.support_avx512bf16_for_cpu = has_avx512bf16()` and, on such
    a CPU, repacks the weight in place at the layer's first eval forward without grad, which
    XTuner's EvaluateChatHook runs before training. Saving a checkpoint must then pack it back,
    and under ZeRO-3 (where XTuner stores 4-bit weights in a half dtype so DeepSpeed can partition
    them) that fails for every layer the repack reached:

        File ".../bitsandbytes/functional.py", in _convert_weight_packed_for_cpu_inverse
            assert packed_weight.dtype == torch.uint8

    MoSLoRA's 4-bit layers switch the repack off themselves (`layers_bnb.keep_standard_4bit_layout`,
    which also serves eval processes that install no shims); this covers the rest, i.e. the stock
    QLoRA baseline's layers and any 4-bit layer left unadapted: layers built afterwards read the
    capability as absent. The cost is CPU speed only; GPUs never take that path.
    """
    if torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        return
    from bitsandbytes.nn import modules

    if getattr(modules.has_avx512bf16, "_cpu_shim", False):
        return

    def has_avx512bf16() -> bool:
        return False

    has_avx512bf16._cpu_shim = True
    modules.has_avx512bf16 = has_avx512bf16


SHIMS = (
    cpu_is_bf16_supported,
    cuda_set_device_without_cuda,
    llava_dataset_map_processes,
    deepspeed_single_process_group,
    deepspeed_fp32_on_cpu,
    bnb_standard_4bit_layout_on_cpu,
)


def apply() -> None:
    """Install every shim in `SHIMS`; safe to call more than once."""
    for shim in SHIMS:
        shim()
