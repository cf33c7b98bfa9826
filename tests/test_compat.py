"""torch >= 2.6 loads with weights_only=True: mmengine checkpoints still load for `--resume`, through
the safe loader, and torch's process-wide allow-list stays as it was."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub

from llava_moslora.train import compat


def test_mmengine_and_xtuner_read_an_mmengine_checkpoint_after_apply(tmp_path):
    from mmengine.runner.checkpoint import _load_checkpoint
    from xtuner.tools import utils as xtuner_tools

    # What mmengine's CheckpointHook saves besides tensors: the message hub's HistoryBuffers
    # (numpy values, statistics methods pickled by name) and numpy scalars in the meta.
    hub = MessageHub.get_instance("test_compat")
    for step, loss in enumerate([2.5, 1.75, 1.5]):
        hub.update_scalar("train/loss", np.float32(loss), count=1)
        hub.update_scalar("train/iter", np.int64(step))
    checkpoint = {
        "meta": {"seed": 1234, "epoch": np.int64(1), "lr": np.float64(2e-5), "ok": np.bool_(True)},
        "state_dict": {"llm.lora_mixer.weight": torch.eye(4)},
        "message_hub": hub.state_dict(),
    }
    path = tmp_path / "iter_3.pth"
    torch.save(checkpoint, path)
    before = set(torch.serialization.get_safe_globals())

    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer|numpy|getattr"):
        torch.load(path)  # the torch >= 2.6 default, as XTuner and mmengine call it
    compat.apply()
    compat.apply()  # idempotent

    # The runner's resume reads through mmengine's CheckpointLoader, the seed through XTuner.
    loaded = _load_checkpoint(str(path), map_location="cpu")
    assert xtuner_tools.get_seed_from_checkpoint(str(path)) == 1234
    assert loaded["meta"]["seed"] == 1234 and loaded["meta"]["lr"] == np.float64(2e-5)
    assert torch.equal(loaded["state_dict"]["llm.lora_mixer.weight"], torch.eye(4))
    restored = MessageHub.get_instance("test_compat_restored")
    restored.load_state_dict(loaded["message_hub"])
    assert restored.get_scalar("train/loss").mean() == pytest.approx((2.5 + 1.75 + 1.5) / 3)
    assert restored.get_scalar("train/iter").current() == 2

    # Nothing was registered with torch: a bare torch.load refuses the file as before.
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer|numpy|getattr"):
        torch.load(path)


def test_apply_routes_xtuners_pretrained_pth_reader_to_the_safe_one():
    import xtuner.model.llava
    import xtuner.model.utils

    from llava_moslora.train.checkpoints import pretrained_state

    compat.apply()
    assert xtuner.model.utils.guess_load_checkpoint is pretrained_state
    assert xtuner.model.llava.guess_load_checkpoint is pretrained_state  # what LLaVAModel calls
