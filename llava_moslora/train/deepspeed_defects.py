"""DeepSpeed releases that train wrongly in a setting both engines use, refused before training.

ZeRO-2 with gradient accumulation, DeepSpeed 0.17.6 to 0.18.2: only the last micro-batch's
gradients of each accumulation group reach the optimizer step. The Muon change (DeepSpeed PR
#7509, first in 0.17.6) made `DeepSpeedZeroOptimizer.independent_gradient_partition_epilogue`
(runtime/zero/stage_1_and_2.py), which runs after every backward, accumulate into
`all_grad_tensors[i]` only while `averaged_gradients[i]` is set; that is set at a boundary and
cleared by the step, so each micro-batch replaces the sum instead of adding to it. PR #7665
(0.18.3) tests `all_grad_tensors[i]` instead. The path is the default one (no optimizer offload),
the same on GPU and CPU and for any number of processes; ZeRO-1 (reduces only at the boundary),
ZeRO-2 with `offload_optimizer` (its own accumulation buffer) and ZeRO-3 are not affected.
Measured on a two-layer toy, one CPU process, accumulation 2, gradient norms of two groups:
torch 0.8450 / 1.0383, the last micro-batch alone 0.6577 / 0.9418; DeepSpeed 0.17.6 ZeRO-2
0.6577 / 0.9418 (with DeepSpeed's own counting, as `xtuner train` drives it, and with
`set_gradient_accumulation_boundary`, as accelerate does), 0.17.5 and 0.18.3 0.8450 / 1.0383.
"""

from __future__ import annotations

import sys
from typing import Any

# [first release with the defect, first release without it again)
ZERO2_ACCUMULATION_LOST = ("0.17.6", "0.18.3")


def installed_deepspeed() -> str | None:
    """The version of the DeepSpeed this process runs (imported already) or would import (its
    installed metadata: importing DeepSpeed picks an accelerator and logs); None: not installed."""
    from importlib.metadata import PackageNotFoundError, version

    imported = sys.modules.get("deepspeed")
    if imported is not None:
        return getattr(imported, "__version__", None)
    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


def zero2_accumulation_defect(
    config: dict[str, Any], accumulation: int, version: str | None
) -> str | None:
    """Why DeepSpeed `version` would train `config` (a DeepSpeed JSON) with `accumulation`
    micro-batches per step wrongly, with the fixes; None where it trains it right."""
    from packaging.version import Version

    zero = config.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    first, fixed = ZERO2_ACCUMULATION_LOST
    if (
        version is None
        or zero.get("stage") != 2
        or offload not in ("none", None)
        or accumulation <= 1
        or not Version(first) <= Version(version) < Version(fixed)
    ):
        return None
    return (
        f"ZeRO-2 with `accumulative_counts` {accumulation} on DeepSpeed {version}: DeepSpeed "
        f"{first} to 0.18.2 keep only the last micro-batch's gradients of each accumulation "
        "group (on GPU too; docs/training.md); use `--deepspeed deepspeed_zero3`, or "
        f"`accumulative_counts=1` with a batch {accumulation} times larger, or DeepSpeed "
        f"<= 0.17.5 or >= {fixed}"
    )
