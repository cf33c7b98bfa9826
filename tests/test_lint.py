"""ruff's lint and format checks over the repository (pyproject.toml's [tool.ruff]), so that CI
(.ci/run runs pytest) enforces what docs/development.md asks of every change."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"  # the dev group's, installed next to the interpreter


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(check):
    if not RUFF.is_file():
        pytest.fail(f"ruff is not installed at {RUFF}: run `uv sync` (it is in the dev group)")
    result = subprocess.run(
        [str(RUFF), *check, "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
