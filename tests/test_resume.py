"""A tiny `xtuner train` killed with SIGKILL after a checkpoint and resumed with `--resume` ends
exactly where an uninterrupted run with the same seed ends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from llava_moslora.train.checkpoints import last_checkpoint, load_trained_state
from tests.factories import REPO
from tests.launchers import assert_both_towers_have_mixers, run_train, train_command, train_env

# 160 samples at batch 4: 40 iterations an epoch, the config's 2 epochs = 80 iterations (40
# optimizer steps at 2 accumulation steps; ~0.05 s each here, so the kill lands well before the
# end), a checkpoint every 20 iterations (an optimizer-step boundary). Dropout off: mmengine
# restores the model, optimizer, LR schedule and data position on resume, not the torch RNG
# stream, so dropout masks after a resume would differ from the uninterrupted run's.
RUN = [
    "--cfg-options",
    "default_hooks.checkpoint.interval=20",
    "model.llm_lora.lora_dropout=0",
    "model.visual_encoder_lora.lora_dropout=0",
]
FINAL = "iter_80.pth"


def trained_adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = load_trained_state(checkpoint)
    assert_both_towers_have_mixers(state)
    return state


@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)  # the default load path
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_train("tiny_moslora", tiny_dir, reference, *RUN)
    assert last_checkpoint(reference).name == FINAL

    # Start the same run and SIGKILL it (xtuner's launcher and its training process, one process
    # group) as soon as its first checkpoint is on disk: mmengine writes `last_checkpoint` after
    # the checkpoint file itself.
    run = subprocess.Popen(
        train_command("tiny_moslora", resumed, *RUN),
        cwd=REPO,
        env=train_env(tiny_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (resumed / "last_checkpoint").exists():
            assert run.poll() is None, "the run ended before saving a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    killed_at = last_checkpoint(resumed)
    assert killed_at.name != FINAL and not (resumed / FINAL).exists()  # killed mid-way
    at_kill = load_trained_state(killed_at)  # now: the resumed run deletes old checkpoints

    # torch >= 2.6 loads with weights_only=True, and `xtuner train --resume` reads the seed and
    # mmengine the state with a bare torch.load: the configs allow exactly the globals mmengine
    # checkpoints hold (llava_moslora/train/compat.py), so no TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
    run = run_train("tiny_moslora", tiny_dir, resumed, *RUN, "--resume", str(killed_at))
    output = run.stdout + run.stderr
    iteration = int(killed_at.stem.removeprefix("iter_"))
    assert re.search(rf"resumed epoch: \d+, iter: {iteration}\b", output), output[-4000:]
    assert last_checkpoint(resumed).name == FINAL

    expected, actual = trained_adapter(reference / FINAL), trained_adapter(resumed / FINAL)
    assert any(not torch.equal(at_kill[k], expected[k]) for k in expected)  # training went on
    assert actual.keys() == expected.keys()
    for key in expected:  # same kernels, same thread count, same order: bit for bit
        assert torch.equal(actual[key], expected[key]), key
