"""`llava_moslora.probes`: the ZeRO-3 and bitsandbytes probes every layer shares."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from llava_moslora.probes import full_numel, is_4bit, zero3_partitioned


def test_zero3_probes_read_deepspeeds_tags():
    param = nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside the module's forward
    assert not zero3_partitioned(param) and full_numel(param) == 0
    param.ds_id, param.ds_numel = 3, 12
    assert zero3_partitioned(param) and full_numel(param) == 12


def test_is_4bit_never_imports_bitsandbytes():
    # The start-of-run summary and the merge ask it of every module: without a 4-bit layer
    # bitsandbytes (seconds to import; on some machines it fails to load) stays unimported.
    code = (
        "import sys; from torch import nn; from llava_moslora.probes import is_4bit; "
        "assert not is_4bit(nn.Linear(2, 2)); print('bitsandbytes' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_is_4bit_is_true_only_for_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    assert is_4bit(bnb.nn.Linear4bit(64, 64, quant_type="nf4"))
    assert not is_4bit(nn.Linear(64, 64))
    assert not is_4bit(bnb.nn.Linear8bitLt(64, 64))
