"""The main job's table is the same on every x86-64 machine with AVX2 (scripts/pin_numerics.sh).

A machine can emulate a narrower instruction set than its own, never a wider one. So the slow test
trains the same slice under the settings this machine can take, pinned and unpinned, and compares
the adapters bit for bit: pinned, the machine's own kernels and an emulated AVX2-only machine give
the same bits; unpinned, the machine's own kernels differ from the AVX2 machine's wherever the
machine has AVX512 (the table the issue saw change from one CPU to the next).

The slice is scripts/numerics_slice.py (scripts/bench_numerics.py times it pinned and unpinned).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIN = REPO / "scripts" / "pin_numerics.sh"
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
# What an AVX2-only machine (no AVX512) would run, emulated here: each library's own cap.
AVX2_MACHINE = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
NUMERIC_VARS = (*PINNED, "MKL_ENABLE_INSTRUCTIONS")


def run_in(env_vars: dict[str, str], code: str, *, pinned: bool) -> str:
    """`code` in a fresh interpreter, with `env_vars` set and, if `pinned`, the pin sourced after
    them (as the main job does); the numeric variables of this process are cleared first."""
    env = {k: v for k, v in os.environ.items() if k not in NUMERIC_VARS}
    env.update(env_vars, OMP_NUM_THREADS="1", PYTHON=sys.executable, CODE=code)
    source = f'source "{PIN}"; ' if pinned else ""
    result = subprocess.run(
        ["bash", "-c", source + '"$PYTHON" -c "$CODE"'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


CAPABILITY = "import torch; print(torch.backends.cpu.get_cpu_capability())"


def test_the_pin_caps_every_kernel_library_at_avx2_whatever_the_user_had_set():
    seen = run_in(
        {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"},
        "import os, torch; print(torch.backends.cpu.get_cpu_capability(), "
        "*(os.environ[k] for k in ('ONEDNN_MAX_CPU_ISA', 'MKL_CBWR')))",
        pinned=True,
    )
    assert seen.split() == ["AVX2", "AVX2", "AVX2,STRICT"]


def test_the_main_job_runs_every_command_pinned(tmp_path):
    from tests.launchers import recorded_calls, run_script

    result = run_script(REPO / "scripts" / "offline_pipeline.sh", tmp_path, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    calls = recorded_calls(tmp_path)
    # The recorder standing in for `llava-moslora` logs the numeric settings of each call.
    isa = [line.split() for line in (tmp_path / "calls.isa").read_text().splitlines()]
    # make-tiny, bench, 2 x (train, export, eval), machine, report
    assert len(isa) == len(calls) == 10
    assert {tuple(x) for x in isa} == {tuple(PINNED.values())}


SLICE = f"import runpy; runpy.run_path({str(REPO / 'scripts' / 'numerics_slice.py')!r}, run_name='__main__')"


@pytest.mark.slow
def test_pinned_slices_are_bit_identical_on_every_instruction_set_this_machine_emulates():
    native = run_in({}, CAPABILITY, pinned=False)
    pinned = {
        "own kernels": run_in({}, SLICE, pinned=True),
        "an AVX2-only machine": run_in(AVX2_MACHINE, SLICE, pinned=True),
        "MKL told to use AVX512": run_in({"MKL_ENABLE_INSTRUCTIONS": "AVX512"}, SLICE, pinned=True),
    }
    avx2_machine_unpinned = run_in(AVX2_MACHINE, SLICE, pinned=False)
    own_unpinned = run_in({}, SLICE, pinned=False)
    print(native, pinned, avx2_machine_unpinned, own_unpinned)  # shown with `pytest -s`
    assert set(pinned.values()) == {avx2_machine_unpinned}, pinned
    # The pin is not a no-op where it matters: on an AVX512 machine its own kernels add in another
    # order than an AVX2 machine's (on an AVX2-only machine there is nothing to pin, and they agree).
    if native.startswith("AVX512"):
        assert own_unpinned != avx2_machine_unpinned
    else:
        assert native == "AVX2" and own_unpinned == avx2_machine_unpinned
