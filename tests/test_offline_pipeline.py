"""scripts/offline_pipeline.sh (the README's main job): its control flow, with `llava-moslora`
replaced by a recorder on PATH, so these run in a second; the real run is the README's command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.factories import REPO
from tests.launchers import recorded_calls, run_script

SCRIPT = REPO / "scripts" / "offline_pipeline.sh"


def run_pipeline(
    tmp_path: Path, out: Path, fail_train: str = "", fail_make_tiny: str = ""
) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, tmp_path, out, FAIL_TRAIN=fail_train, FAIL_MAKE_TINY=fail_make_tiny)


def test_a_folder_the_script_did_not_write_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_pipeline(tmp_path, out)
    assert result.returncode == 2
    assert f"{out} exists and was not written by this script" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert recorded_calls(tmp_path) == []  # nothing ran


def test_each_adapter_is_trained_exported_and_scored_then_reported(tmp_path):
    out = tmp_path / "out"
    result = run_pipeline(tmp_path, out)
    assert result.returncode == 0, result.stderr
    made = recorded_calls(tmp_path)
    assert sorted(c[0] for c in made[:2]) == ["make-tiny", "make-tiny-bench"]
    # MME's yes/no rounds say the picture's word first, and the tiny LLM is taught the verdict
    # (llava_moslora/builders/verdict.py); without both MME stays at its "always one answer" floor.
    (tiny,) = [c for c in made if c[0] == "make-tiny"]
    assert "yes_no_read" in tiny[tiny.index("--benchmark-rounds") + 1].split(",")
    assert int(tiny[tiny.index("--verdict-steps") + 1]) > 0
    for kind in ("moslora", "lora"):
        chain = [c for c in made if f"configs/tiny_quickstart_{kind}.py" in c or kind in c]
        assert [c[0] for c in chain] == ["train", "export", "eval"], chain
        assert f"{out}/train_{kind}/iter_1200.pth" == chain[1][1]  # the checkpoint it trained
    (machine,) = [c for c in made if c[0] == "machine"]  # beside the report, in the background
    made.remove(machine)
    assert made[-1][0] == "report" and made[-1][1:3] == [f"{out}/eval/moslora", f"{out}/eval/lora"]
    assert "1200 steps each" in result.stdout  # read off the checkpoint, not hand-copied
    # What it printed is also its summary, with the machine and the time.
    summary = (out / "summary.md").read_text()
    assert result.stdout.endswith(summary) and summary.startswith("| the table |")
    assert "Machine (numerics pinned by scripts/pin_numerics.sh" in summary
    assert "- the job: 0 min" in summary
    # A rerun into the folder it wrote is allowed (it replaces its own runs).
    assert run_pipeline(tmp_path, out).returncode == 0


def test_a_failed_training_fails_the_job_and_says_which_the_other_chain_still_finishes(tmp_path):
    out = tmp_path / "out"
    result = run_pipeline(tmp_path, out, fail_train="tiny_quickstart_lora")
    assert result.returncode == 1
    assert "error: training lora failed; the end of its log:" in result.stderr
    assert "Traceback: boom in configs/tiny_quickstart_lora.py" in result.stderr
    made = recorded_calls(tmp_path)
    assert [c[0] for c in made if "moslora" in " ".join(c)] == ["train", "export", "eval"]
    assert not any(c[0] in ("export", "eval") and "_lora" in " ".join(c) for c in made)
    assert not any(c[0] == "report" for c in made)


def test_a_failed_make_tiny_fails_the_job_with_the_end_of_its_log(tmp_path):
    out = tmp_path / "out"
    result = run_pipeline(tmp_path, out, fail_make_tiny="1")
    assert result.returncode == 1
    assert f"error: make-tiny failed; the end of {out}/make_tiny.log:" in result.stderr
    assert "Traceback: boom in make-tiny" in result.stderr
    assert not any(c[0] == "train" for c in recorded_calls(tmp_path))


def test_a_rerun_refuses_a_training_folder_holding_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    assert run_pipeline(tmp_path, out).returncode == 0
    mine = out / "train_lora" / "my_notes.txt"
    mine.write_text("keep me")
    (tmp_path / "calls").unlink()
    result = run_pipeline(tmp_path, out)
    assert result.returncode == 2
    assert f"error: {mine} was not written by the job's training" in result.stderr
    assert mine.read_text() == "keep me"
    assert (out / "train_lora" / "last_checkpoint").exists()  # the earlier run's, untouched
    assert recorded_calls(tmp_path) == []  # refused before anything ran
    # What a training writes there (logs, the config's copy, checkpoints) is replaced on a rerun.
    mine.unlink()
    (out / "train_lora" / "20261207_111604").mkdir()
    for name in ("iter_750.pth", "tiny_quickstart_lora.py"):
        (out / "train_lora" / name).touch()
    assert run_pipeline(tmp_path, out).returncode == 0
    assert sorted(p.name for p in (out / "train_lora").iterdir()) == ["last_checkpoint"]


def test_the_readme_shows_the_main_jobs_output_verbatim_and_it_clears_its_targets():
    """benchmarks/results/offline_results.md is the job's own summary.md of its last fresh-clone
    run; the README shows it unchanged (no retyped number), and it clears issue 24's bar: every
    tiny benchmark at 2.2x chance or more, for both runs, on a named machine with the pin."""
    results = (REPO / "benchmarks" / "results" / "offline_results.md").read_text().strip()
    readme = (REPO / "README.md").read_text()
    block = readme.split("## What the main job prints", 1)[1].split("```\n", 2)[1]
    assert block.strip() == results
    multiples = {
        line.split(": ", 1)[0]: [
            float(x) for x in re.findall(r"\(chance [\d.]+, ([\d.]+)x\)", line)
        ]
        for line in results.splitlines()
        if line.startswith(("moslora: ", "lora: ")) and "chance" in line
    }
    assert set(multiples) == {"moslora", "lora"}
    assert all(len(m) == 4 and min(m) >= 2.2 for m in multiples.values()), multiples
    assert "Machine (numerics pinned by scripts/pin_numerics.sh" in results
    assert "ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_CBWR=AVX2,STRICT" in results
