"""What a parameter or module is under DeepSpeed ZeRO-3 or bitsandbytes, without importing either.

Each probe is written once here: the adapter layers, the merge, the start-of-run summary and the
mixer diagnostics all ask the same questions, and must not each import a heavy (or, for
bitsandbytes on some machines, failing) library to ask them.
"""

from __future__ import annotations

import sys

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
