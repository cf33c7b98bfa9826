"""scripts/gpu_check.sh cannot rot: its CPU dry run (tiny widths) runs here end to end; the report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# Every phase gpu_check.sh runs, in order (docs/gpu.md lists what each needs).
PHASES = [
    "env", "install", "cuda_tests", "hf_engine", "adapters", "nf4", "zero2", "zero3", "table4", "plan", "report",
]  # fmt: skip
CASES = ["lora", "moslora", "qlora", "qmoslora", "zero2", "zero3", "table4_lora", "table4_moslora"]


def write_case(out: Path, name: str, seconds: float, peak: int | None, planned: int) -> None:
    (out / "blocks").mkdir(parents=True, exist_ok=True)
    case = {
        "case": name, "device": "NVIDIA H100", "layers": 4, "hidden": 4096, "batch": 4,
        "seq": 2048, "r": 64, "adapter": "MoSLoRA" if "mos" in name else "LoRA",
        "deepspeed": "none", "median_s": seconds, "peak_bytes": peak, "planned_bytes": planned,
        "versions": {"torch": "2.11.0"},
    }  # fmt: skip
    (out / "blocks" / f"{name}.json").write_text(json.dumps(case))


def test_gpu_report_puts_each_peak_beside_the_plan_and_keeps_table4_apart(tmp_path):
    import gpu_report

    write_case(tmp_path, "lora", 0.50, 40 * 2**30, 41 * 2**30)
    write_case(tmp_path, "moslora", 0.51, 40.2 * 2**30, 41 * 2**30)
    write_case(tmp_path, "table4_lora", 0.10, 10 * 2**30, 10 * 2**30)
    write_case(tmp_path, "table4_moslora", 0.11, 10 * 2**30, 10 * 2**30)
    (tmp_path / "phases.tsv").write_text(
        "phase\tstatus\texit\tseconds\nadapters\tok\t0\t30\nnf4\ttimeout\t124\t75\n"
        "plan\tskipped\t-\t0\n"
    )
    text = gpu_report.report(tmp_path, elapsed=200)
    assert "| moslora | MoSLoRA | none | 64 | 4 x 2048 | 0.5100 | 40.200 | 41.000 | 1.020 |" in text
    assert "- moslora / lora (LLaVA's LLM recipe, bf16): time 1.020, peak memory 1.005" in text
    # The paper's Table 4 figures appear once, in the text-only section, after its own shape.
    llava, table4 = text.split("## The paper's Table 4 shape")
    assert "1.069" not in llava and "1.069" in table4 and "table4_moslora / table4_lora" in table4
    assert "| nf4 | timeout | 124 | 75 |" in text
    assert text.splitlines()[-1] == (
        "gpu_check: 1/2 phases ok (1 skipped), 4 cases in 200 s; MoSLoRA / LoRA time 1.020, "
        "peak memory 1.005; "
        "planner within 2.5 % of every measured peak"
    )


def test_gpu_report_puts_the_hf_engine_losses_beside_the_cpus(tmp_path):
    import gpu_report

    engine = tmp_path / "hf_engine"
    engine.mkdir()
    log = lambda losses: "".join(  # noqa: E731
        json.dumps({"iter": 5 * (i + 1), "loss": loss, "lr": 1e-3, "seconds_per_iter": 0.01}) + "\n"
        for i, loss in enumerate(losses)
    )
    (engine / "log.jsonl").write_text(log([5.0, 4.5, 4.0]))
    (engine / "cpu_log.jsonl").write_text(log([5.0, 4.4, 4.003]))
    (engine / "device.txt").write_text("NVIDIA H100 80GB HBM3\n")
    text = gpu_report.report(tmp_path)
    assert "## The hf engine: configs/tiny_moslora.py's run on NVIDIA H100 80GB HBM3" in text
    assert "| 10 | 4.5000 | 4.4000 | +1.00e-01 | 0.0100 |" in text
    assert text.splitlines()[-1] == (
        "gpu_check: 0/0 phases ok (0 skipped), 0 cases; hf engine 3 losses logged on "
        "NVIDIA H100 80GB HBM3, within 1.0e-01 of the CPU's"
    )


def test_gpu_report_of_a_check_killed_before_any_case(tmp_path):
    import gpu_report

    (tmp_path / "phases.tsv").write_text("phase\tstatus\texit\tseconds\nenv\tok\t0\t3\n")
    text = gpu_report.report(tmp_path)
    assert text.splitlines()[-1] == "gpu_check: 1/1 phases ok (0 skipped), 0 cases"


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The whole script on CPU at tiny widths: every phase, its log and row, each case's JSON,
    the report and its summary line, all under a fake $OUT. About 2 minutes on 2 quiet cores."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with (out / "phases.tsv").open() as f:
        rows = {row["phase"]: row for row in csv.DictReader(f, delimiter="\t")}
    assert list(rows) == PHASES
    assert {rows[p]["status"] for p in ("install", "cuda_tests")} == {"skipped"}
    failed = {p: r["status"] for p, r in rows.items() if r["status"] not in ("ok", "skipped")}
    assert not failed, {p: (out / "logs" / f"{p}.log").read_text()[-2000:] for p in failed}
    assert rows["plan"]["status"] == "ok"  # this venv holds the XTuner stack
    for phase in PHASES:
        assert (out / "logs" / f"{phase}.log").is_file()
    assert (
        "RANK" in (out / "env.txt").read_text()
        and "'HF_HUB_OFFLINE': '1'" in (out / "env.txt").read_text()
    )
    for name in CASES:
        case = json.loads((out / "blocks" / f"{name}.json").read_text())
        assert case["median_s"] > 0 and case["planned_bytes"] > 0 and case["peak_bytes"] is None
    assert "largest per-device batch" in (out / "logs" / "plan.log").read_text()
    # The hf engine's tiny run, here on this CPU twice: the same recipe, seed and machine.
    here, cpu = (
        [json.loads(line)["loss"] for line in (out / "hf_engine" / name).read_text().splitlines()]
        for name in ("log.jsonl", "cpu_log.jsonl")
    )
    assert len(here) == 8 and here == cpu
    report = (out / "gpu_check.md").read_text()
    assert "moslora / lora (LLaVA's LLM recipe, bf16): time" in report
    assert "table4_moslora / table4_lora (Table 4 shape): time" in report
    # The report counts the phases before it (its own row is written after it ends).
    summary = "gpu_check: 8/8 phases ok (2 skipped), 8 cases"
    assert report.splitlines()[-1].startswith(summary)
    assert result.stdout.strip().splitlines()[-1].startswith(summary)


def test_the_bundle_never_removes_a_folder_it_did_not_make(tmp_path):
    """gpu_bundle.sh rebuilds its OUT whole: a folder holding someone else's file is refused in
    one line (exit 2) before anything is removed or downloaded."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("not the bundle's")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_bundle.sh"), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"error: {out} holds files this script did not write" in result.stderr
    assert (out / "keep.txt").read_text() == "not the bundle's"
