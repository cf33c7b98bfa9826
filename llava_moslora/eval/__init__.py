"""Evaluation with VLMEvalKit: a model class for our exports, the paper's 9-benchmark suite and an
offline tiny suite, the Table 5 report and the Figure 5 MMBench radar; and `heldout`, a run's
held-out accuracy with each option scored by its log-likelihood (no VLMEvalKit, no generation).

Modules import VLMEvalKit lazily (importing it takes tens of seconds): `benchmarks`, `heldout`,
`manifest`, `protocol`, `report` and `tiny_bench` never import it at module level, `model`, `runner`
and `offline` do when used.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def import_vlmeval(name: str) -> ModuleType:
    """Import a `vlmeval` module without letting it switch autograd off for the whole process.

    `vlmeval/vlm/__init__.py` runs `torch.set_grad_enabled(False)` at import time (VLMEvalKit
    only ever infers), which would silently stop every later backward pass in the same process
    (`element 0 of tensors does not require grad`): training after an evaluation, or tests.
    """
    import torch

    enabled = torch.is_grad_enabled()
    try:
        return importlib.import_module(name)
    finally:
        torch.set_grad_enabled(enabled)
