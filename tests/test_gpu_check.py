"""scripts/gpu_check.sh cannot rot: its CPU dry run (tiny shapes, 2 steps) runs here; gpu_report.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def write_run(work: Path, name: str, times: list[float], memory: int) -> None:
    vis = work / name / "20260101_000000" / "vis_data"
    vis.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "time": t, "memory": memory}) for i, t in enumerate(times)]
    (vis / "scalars.json").write_text("\n".join(lines) + "\n")


def test_gpu_report_medians_after_warmup_and_ratios(tmp_path):
    import gpu_report

    write_run(tmp_path, "mos", [9.0, 1.02, 1.01, 1.03], 31000)
    write_run(tmp_path, "lora", [9.0, 1.0, 1.0, 1.0], 29000)
    text = gpu_report.report(tmp_path, [("mos", "lora")], skip=1, title="t")
    assert "| mos | 4 | 1.0200 | 31000 |" in text
    assert "mos / lora: time 1.020, memory 1.069" in text
    with pytest.raises(FileNotFoundError, match="did the run start"):
        gpu_report.run_stats(tmp_path / "missing", 0)


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The whole script on CPU: 4 xtuner train runs (ZeRO-2 and ZeRO-3), report, plan, export.

    About 5-7 minutes on 2 shared CPU cores, nearly all of it `xtuner train` start-up.
    """
    env = dict(os.environ, GPU_CHECK_WORK=str(tmp_path), PYTHON=sys.executable)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "tiny_moslora / tiny_lora: time" in report
    assert "tiny_qmoslora / tiny_qlora: time" in report
    assert "## llava-moslora plan for the same runs" in report
    assert "generated 8 tokens" in report or "generated" in report
    for name in ("tiny_moslora", "tiny_lora", "tiny_qmoslora", "tiny_qlora"):
        assert (tmp_path / name / "iter_2.pth").exists()
