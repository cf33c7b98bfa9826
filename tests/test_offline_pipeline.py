"""scripts/offline_pipeline.sh (the README's main job): its control flow, with `llava-moslora`
replaced by a recorder on PATH, so these run in a second; the real run is the README's command."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "offline_pipeline.sh"

# Records each call; `train` writes the checkpoint pointer the script reads and fails for the
# configs named in $FAIL_TRAIN; `report` prints a table line; every other subcommand succeeds.
RECORDER = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
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
[ "$1" = report ] && echo "| the table |"
exit 0
"""


def run_pipeline(tmp_path: Path, out: Path, fail_train: str = "") -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "llava-moslora"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        CALLS=str(tmp_path / "calls"),
        FAIL_TRAIN=fail_train,
    )
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )


def calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_a_folder_the_script_did_not_write_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_pipeline(tmp_path, out)
    assert result.returncode == 2
    assert f"{out} exists and was not written by this script" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert calls(tmp_path) == []  # nothing ran


def test_each_adapter_is_trained_exported_and_scored_then_reported(tmp_path):
    out = tmp_path / "out"
    result = run_pipeline(tmp_path, out)
    assert result.returncode == 0, result.stderr
    made = calls(tmp_path)
    assert [c[0] for c in made[:2]] == ["make-tiny", "make-tiny-bench"]
    for kind in ("moslora", "lora"):
        chain = [c for c in made if f"configs/tiny_quickstart_{kind}.py" in c or kind in c]
        assert [c[0] for c in chain] == ["train", "export", "eval"], chain
        assert f"{out}/train_{kind}/iter_1200.pth" == chain[1][1]  # the checkpoint it trained
    assert made[-1][0] == "report" and made[-1][1:3] == [f"{out}/eval/moslora", f"{out}/eval/lora"]
    assert "1200 steps" in result.stdout  # read off the checkpoint, not hand-copied
    # A rerun into the folder it wrote is allowed (it replaces its own runs).
    assert run_pipeline(tmp_path, out).returncode == 0


def test_a_failed_training_fails_the_job_and_says_which_the_other_chain_still_finishes(tmp_path):
    out = tmp_path / "out"
    result = run_pipeline(tmp_path, out, fail_train="tiny_quickstart_lora")
    assert result.returncode == 1
    assert "error: training lora failed; the end of its log:" in result.stderr
    assert "Traceback: boom in configs/tiny_quickstart_lora.py" in result.stderr
    made = calls(tmp_path)
    assert [c[0] for c in made if "moslora" in " ".join(c)] == ["train", "export", "eval"]
    assert not any(c[0] in ("export", "eval") and "_lora" in " ".join(c) for c in made)
    assert not any(c[0] == "report" for c in made)
