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


def kill_after_a_checkpoint(command: list[str], work_dir: Path, env: dict[str, str]) -> Path:
    """Start `command` and SIGKILL it (its launcher and training process, one process group) as
    soon as its first checkpoint is on disk (`last_checkpoint` is written after the checkpoint
    itself); return the checkpoint it points to."""
    run = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (work_dir / "last_checkpoint").exists():
            assert run.poll() is None, "the run ended before saving a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    return last_checkpoint(work_dir)


@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)  # the default load path
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_train("tiny_moslora", tiny_dir, reference, *RUN)
    assert last_checkpoint(reference).name == FINAL

    # The same run, SIGKILLed (xtuner's launcher and its training process) once its first
    # checkpoint is on disk: mmengine writes `last_checkpoint` after the checkpoint file itself.
    killed_at = kill_after_a_checkpoint(
        train_command("tiny_moslora", resumed, *RUN), resumed, train_env(tiny_dir)
    )
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


@pytest.mark.slow
def test_a_killed_hf_engine_run_resumes_bit_identically(tiny_dir, tmp_path):
    """The hf engine (`llava-moslora train --engine hf`), SIGKILLed once a checkpoint is on disk
    and restarted with `--resume`, ends where the uninterrupted run ends, bit for bit, dropout
    on (it restores the RNG). A checkpoint every 3 iterations at accumulation 2: the first lies
    inside an accumulation group, whose start the resume goes back to (hf_engine.Run.resume)."""
    import shutil
    import sys

    command = shutil.which("llava-moslora", path=str(Path(sys.executable).parent))
    config = str(REPO / "configs" / "tiny_moslora.py")
    stop = 12

    def train(work_dir: Path, *extra: str) -> list[str]:
        return [command, "train", "--engine", "hf", config, "--work-dir", str(work_dir)] + [
            "--max-iters", str(stop), "--cfg-options", "default_hooks.checkpoint.interval=3", *extra
        ]  # fmt: skip

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    env = train_env(tiny_dir)
    done = subprocess.run(train(reference), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    killed_at = kill_after_a_checkpoint(train(resumed), resumed, env)
    final = f"iter_{stop}.pth"
    assert killed_at.name != final and not (resumed / final).exists()  # killed mid-way
    done = subprocess.run(
        train(resumed, "--resume"), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    if int(killed_at.stem.removeprefix("iter_")) % 2:  # iter_3, iter_9: inside a group
        assert "saved inside an accumulation group" in done.stderr, done.stderr[-4000:]
    expected = torch.load(reference / final, weights_only=True)["state_dict"]
    actual = torch.load(resumed / final, weights_only=True)["state_dict"]
    assert actual.keys() == expected.keys() and any("lora_mixer" in k for k in expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
