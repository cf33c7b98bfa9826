"""`llava-moslora train`: XTuner's launcher, but a failed run exits non-zero.

(`xtuner train` returns 0 whatever its child returned.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_moslora.train.launch import USAGE_ERROR, launch_command
from tests.launchers import run_train

CHILD = ["-m", "llava_moslora.train.launch"]


def test_one_process_runs_the_child_in_this_interpreter():
    args = ["configs/tiny_moslora.py", "--work-dir", "w", "--deepspeed", "deepspeed_zero2"]
    assert launch_command(args, env={}) == [sys.executable, *CHILD, *args]
    # `--launcher slurm` starts one process per task itself, as in XTuner's entry point
    slurm = ["configs/tiny_moslora.py", "--launcher", "slurm"]
    assert launch_command(slurm, env={"NPROC_PER_NODE": "8"}) == [sys.executable, *CHILD, *slurm]


def test_several_processes_go_through_torchrun_with_xtuners_variables():
    env = {
        "NPROC_PER_NODE": "2",
        "NNODES": "2",
        "NODE_RANK": "1",
        "ADDR": "10.0.0.1",
        "PORT": "29123",
    }
    args = ["configs/tiny_moslora.py", "--seed", "3"]
    assert launch_command(args, env=env) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--node_rank=1",
        "--nproc_per_node=2",
        "--master_addr=10.0.0.1",
        "--master_port=29123",
        *CHILD,
        *args,
        "--launcher",
        "pytorch",
    ]
    picked = launch_command(args, env={"NPROC_PER_NODE": "2"})
    port = int(next(a for a in picked if a.startswith("--master_port=")).split("=")[1])
    assert 20000 <= port <= 29999  # XTuner's range when PORT is unset


# --- the exit code of real runs ----------------------------------------------------------------


def train(tiny_dir: Path, work_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """`llava-moslora train configs/tiny_moslora.py --work-dir WORK_DIR --seed 0 ARGS`."""
    return run_train(
        "tiny_moslora", tiny_dir, work_dir, *args, launcher="llava-moslora", check=False
    )


@pytest.mark.slow
def test_a_run_refused_by_the_data_check_exits_2_with_one_line_naming_the_samples(
    tiny_dir, tmp_path
):
    bad = tmp_path / "bad_tiny"
    shutil.copytree(tiny_dir, bad)
    data = bad / "data" / "tiny_llava.json"
    records = json.loads(data.read_text())
    records[3]["image"] = "missing.png"
    data.write_text(json.dumps(records))

    run = train(bad, tmp_path / "work")
    assert run.returncode == USAGE_ERROR, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    error = run.stderr[run.stderr.index("error: training refused:") :]
    assert "1 of 160 samples" in error and records[3]["id"] in error and "missing.png" in error
    assert "llava-moslora check-data" in error  # the fix
    assert not (tmp_path / "work" / "last_checkpoint").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "key", ["model.llm.pretrained_model_name_or_path", "train_dataloader.dataset.data_path"]
)
def test_a_missing_model_or_data_path_exits_2_naming_it(tiny_dir, tmp_path, key):
    missing = tmp_path / "no_such_file"
    run = train(tiny_dir, tmp_path / "work", "--cfg-options", f"{key}={missing}")
    assert run.returncode == USAGE_ERROR, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert str(missing) in run.stderr[run.stderr.index("error: training refused:") :]


@pytest.mark.slow
def test_a_crash_exits_non_zero_with_its_traceback(tiny_dir, tmp_path):
    # torch's optimizer refuses a negative rate when XTuner builds it: not an input error the
    # launcher knows, so it keeps its traceback; `xtuner train` would have returned 0 here. (A bad
    # adapter option is refused before XTuner starts: tests/test_hostile_inputs.py.)
    run = train(tiny_dir, tmp_path / "work", "--cfg-options", "optim_wrapper.optimizer.lr=-1")
    assert run.returncode not in (0, USAGE_ERROR), run.stderr[-3000:]
    assert "Traceback" in run.stderr and "Invalid learning rate: -1" in run.stderr


@pytest.mark.slow
def test_a_finished_run_exits_0(tiny_dir, tmp_path):
    work = tmp_path / "work"
    run = train(tiny_dir, work, "--cfg-options", "train_cfg.max_epochs=1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "last_checkpoint").is_file()
