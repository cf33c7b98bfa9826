"""Launching things the way a user does: a training run in a subprocess (`run_train`), and the
shell scripts with a recorder standing in for `llava-moslora` (`run_script`).

Loaded as a pytest plugin by tests/conftest.py; tests import its helpers from here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.factories import CONFIGS, REPO

# A stand-in for the `llava-moslora` command, for the scripts' control flow: it records each call
# in $CALLS; `train` writes the checkpoint pointer a script reads and fails for the configs named
# in $FAIL_TRAIN; `make-tiny` fails if $FAIL_MAKE_TINY is set; `ablate` fails for the work dirs
# named in $FAIL_ABLATE; `report` prints a table line; every other subcommand succeeds.
RECORDER = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
echo "${ATEN_CPU_CAPABILITY:-unset} ${ONEDNN_MAX_CPU_ISA:-unset} ${MKL_CBWR:-unset}" >> "$CALLS.isa"
if [ "$1" = make-tiny ] && [ -n "${FAIL_MAKE_TINY:-}" ]; then echo "Traceback: boom in make-tiny"; exit 1; fi
if [ "$1" = train ]; then
    for name in $FAIL_TRAIN; do
        case "$2" in *"$name"*) echo "Traceback: boom in $2"; exit 1;; esac
    done
    shift 2
    while [ $# -gt 0 ]; do
        if [ "$1" = --work-dir ]; then mkdir -p "$2"; echo "$2/iter_1200.pth" > "$2/last_checkpoint"; fi
        shift
    done
fi
if [ "$1" = ablate ]; then
    for name in $FAIL_ABLATE; do
        case "$*" in *"--work-dir "*"/$name"*) echo "Traceback: boom in $name"; exit 1;; esac
    done
fi
[ "$1" = report ] && echo "| the table |"
exit 0
"""


def run_script(script: Path, tmp_path: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    """`bash script out` from the repository root, with RECORDER as `llava-moslora`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "llava-moslora"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    env = dict(os.environ, PATH=path, CALLS=str(tmp_path / "calls"), **env)
    return subprocess.run(
        ["bash", str(script), str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )


def recorded_calls(tmp_path: Path) -> list[list[str]]:
    """The recorder's calls under `run_script`, each split into words."""
    path = tmp_path / "calls"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def no_training(monkeypatch) -> list[list[str]]:
    """`llava-moslora train` never starts its child here: the child's command is recorded and
    "exits 0", as `xtuner train` did whatever happened. A refused input must never get there."""
    import subprocess

    from llava_moslora.train import launch

    started: list[list[str]] = []

    def record(command, *args, **kwargs):
        started.append(list(command))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch.subprocess, "run", record)
    return started


# --- launching a training run ------------------------------------------------------------------


def train_command(
    config: str, work_dir: Path, *args: str, launcher: str = "xtuner", seed: int = 0
) -> list[str]:
    """`LAUNCHER train configs/CONFIG.py --work-dir WORK_DIR --seed SEED ARGS`.

    `launcher`: "xtuner" (XTuner's own command, which exits 0 even when training fails),
    "llava-moslora" (ours, with the run's exit code), or "tools" (XTuner's tools/train.py run
    by this interpreter: what `xtuner train` starts, without paying a second Python start-up).
    """
    if launcher == "tools":
        from importlib.util import find_spec

        command = [sys.executable, find_spec("xtuner.tools.train").origin]
    else:
        found = shutil.which(launcher, path=str(Path(sys.executable).parent))
        found = found or shutil.which(launcher)
        assert found, f"the `{launcher}` command is not installed"
        command = [found, "train"]
    config_path = str(CONFIGS / f"{config}.py")
    return [*command, config_path, "--work-dir", str(work_dir), "--seed", str(seed), *args]


def train_env(tiny_dir: Path, **extra: str) -> dict[str, str]:
    """This environment, offline, reading the tiny LLaVA at `tiny_dir`, plus `extra`."""
    bin_dir = Path(sys.executable).parent
    return dict(
        os.environ,
        LLAVA_MOSLORA_TINY_DIR=str(tiny_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        # `xtuner train` re-launches `python` (or torchrun) from PATH: make it this environment's.
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    )


def run_train(
    config: str,
    tiny_dir: Path,
    work_dir: Path,
    *args: str,
    launcher: str = "xtuner",
    check: bool = True,
    **env: str,
) -> subprocess.CompletedProcess:
    """Train configs/CONFIG.py on the tiny LLaVA at `tiny_dir` into `work_dir` in a subprocess
    (`train_command`; `train_env` plus `env`); return it, its output captured as text.

    `check`: assert it trained, the only way that works for `xtuner train` (which exits 0 when
    training failed): a checkpoint was written and nothing raised.
    """
    run = subprocess.run(
        train_command(config, work_dir, *args, launcher=launcher),
        cwd=REPO,
        env=train_env(tiny_dir, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        output = run.stdout + run.stderr
        assert (work_dir / "last_checkpoint").exists() and "Traceback" not in output, output[-4000:]
    return run


# What the tiny configs adapt: 2 LLM layers x q, k, v, o, gate, up, down, and layers 0-1 of the
# 3-layer CLIP x q, k, v, out_proj, fc1, fc2 (the last layer runs after the hidden state LLaVA
# reads, visual_select_layer=-2, so they leave it out).
LLM_MIXERS = 2 * 7
VIT_MIXERS = 2 * 6


def assert_both_towers_have_mixers(state: dict[str, torch.Tensor]) -> None:
    """A trained tiny checkpoint's state: a mixer in every adapted linear of both towers, and the
    projector."""
    mixers = [key for key in state if "lora_mixer" in key]
    assert len([k for k in mixers if k.startswith("llm.")]) == LLM_MIXERS, mixers
    assert len([k for k in mixers if k.startswith("visual_encoder.")]) == VIT_MIXERS, mixers
    assert any(key.startswith("projector.") for key in state)
