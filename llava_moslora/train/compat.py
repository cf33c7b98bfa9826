"""Let `xtuner train --resume` read mmengine checkpoints on torch >= 2.6 (CPU and GPU alike).

torch 2.6 made `torch.load(..., weights_only=True)` the default. XTuner 0.2.0's
`get_seed_from_checkpoint` and mmengine 0.10's `load_from_local` (the runner's resume) call a bare
`torch.load`, and an mmengine checkpoint holds more than tensors: the message hub's
`HistoryBuffer`s with their numpy arrays and the bound statistics methods they pickle by name.
So a resume fails with "Weights only load failed ... Unsupported global: HistoryBuffer".

Rather than switching the safety check off for the whole process
(`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`, which also lets any pickle run code), we allow exactly
the globals an mmengine checkpoint contains, found with
`torch.serialization.get_unsafe_globals_in_checkpoint` on a tiny run's checkpoint:

    mmengine.logging.history_buffer.HistoryBuffer, builtins.getattr (its `statistics_methods`
    are pickled as getattr(HistoryBuffer, "mean")), numpy.ndarray, numpy.dtype (+ the dtype
    classes), numpy._core.multiarray._reconstruct and .scalar

`getattr` is the least tight of these; torch's own error message suggests allowing it, and the
files loaded this way are the run's own checkpoints. `configs/_base_/default_runtime.py` calls
`apply()` while the config is parsed, before XTuner reads the checkpoint's seed.
"""

from __future__ import annotations

import builtins

import numpy as np
import torch

# The numpy dtypes mmengine's logs hold (float losses, int counters, bool flags).
_NUMPY_SCALARS = (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)


def _numpy_core():
    # numpy 2 renamed numpy.core to numpy._core; checkpoints name whichever wrote them.
    return getattr(np, "_core", None) or np.core


def mmengine_checkpoint_globals() -> list:
    """The non-tensor globals an mmengine / XTuner training checkpoint pickles."""
    from mmengine.logging.history_buffer import HistoryBuffer

    core = _numpy_core()
    return [
        HistoryBuffer,
        builtins.getattr,
        np.ndarray,
        np.dtype,
        core.multiarray._reconstruct,
        core.multiarray.scalar,
        *(type(np.dtype(scalar)) for scalar in _NUMPY_SCALARS),
    ]


def allow_mmengine_checkpoint_globals() -> None:
    """Add `mmengine_checkpoint_globals()` to torch's weights-only allowlist (idempotent)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4: weights_only is not the default, nothing to allow
        return
    add(mmengine_checkpoint_globals())


def apply() -> None:
    """Install the compatibility fixes; safe to call more than once."""
    allow_mmengine_checkpoint_globals()
