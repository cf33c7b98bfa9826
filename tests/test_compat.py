"""torch >= 2.6 loads with weights_only=True: mmengine checkpoints still load for `--resume`."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub

from llava_moslora.train import compat


@pytest.fixture
def clean_allowlist():
    saved = list(torch.serialization.get_safe_globals())
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


def test_mmengine_checkpoint_loads_weights_only_after_apply(tmp_path, clean_allowlist):
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

    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer|numpy|getattr"):
        torch.load(path)  # the torch >= 2.6 default, as XTuner and mmengine call it
    compat.apply()
    compat.apply()  # idempotent
    loaded = torch.load(path)

    assert loaded["meta"]["seed"] == 1234 and loaded["meta"]["lr"] == np.float64(2e-5)
    assert torch.equal(loaded["state_dict"]["llm.lora_mixer.weight"], torch.eye(4))
    restored = MessageHub.get_instance("test_compat_restored")
    restored.load_state_dict(loaded["message_hub"])
    assert restored.get_scalar("train/loss").mean() == pytest.approx((2.5 + 1.75 + 1.5) / 3)
    assert restored.get_scalar("train/iter").current() == 2


class Opaque:
    pass


def test_apply_allows_only_the_listed_globals(tmp_path, clean_allowlist):
    compat.apply()

    torch.save({"x": Opaque()}, tmp_path / "bad.pth")
    with pytest.raises(pickle.UnpicklingError, match="Opaque"):  # anything else is still refused
        torch.load(tmp_path / "bad.pth")
