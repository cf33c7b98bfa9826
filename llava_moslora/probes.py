"""What a parameter or module is under DeepSpeed ZeRO-3 or bitsandbytes, without importing either.

Each probe is written once here: the adapter layers, the merge, the start-of-run summary and the
mixer diagnostics all ask the same questions, and must not each import a heavy (or, for
bitsandbytes on some machines, failing) library to ask them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions `param` (it tags the parameters it partitions with a
    `ds_id`); outside its module's forward such a parameter is an empty placeholder."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter: under ZeRO-3 `numel()` is the local shard, `ds_numel`
    the whole."""
    return int(getattr(param, "ds_numel", param.numel()))


def is_4bit(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes `Linear4bit` (the base layer, not PEFT's wrapper).

    Reads `sys.modules` instead of importing bitsandbytes: a module can only be a `Linear4bit` once
    bitsandbytes has been imported, and an import here would cost seconds on every call path that
    has no 4-bit layer (and, with a bitsandbytes that does not load, fail with more than an
    ImportError).
    """
    bnb_nn = getattr(sys.modules.get("bitsandbytes"), "nn", None)
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


@contextmanager
def gathered(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Full values of ZeRO-3-partitioned `tensors` inside the block (read-only); else a no-op.

    Every rank must enter it (the gather is a collective), which is why the hook runs its
    computation on all ranks and only writes files on rank 0.
    """
    partitioned = [t for t in tensors if zero3_partitioned(t)]
    if not partitioned:
        yield
        return
    import deepspeed  # `deepspeed.zero` is an attribute, not an importable module path

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
