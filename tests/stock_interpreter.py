"""One interpreter that has never imported llava_moslora, for the checks that stock libraries
(transformers, PEFT, remote code) read our files right: the `stock_python` fixture.

Loaded as a pytest plugin by tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# --- one interpreter that never imports llava_moslora ------------------------------------------

# Imports torch and PEFT (and with it transformers) first, while the tests before the first job
# run; then reads one job a line ({"script", "argv"}), runs the script as `python -c SCRIPT
# ARGV...` would, and answers one line: the traceback, or null. The replies keep the original
# stdout to themselves; whatever a job prints goes to stderr. Checked after every job: nothing
# imported llava_moslora.
_STOCK_SERVER = textwrap.dedent(
    """
    import json, os, sys, traceback
    import torch
    from peft import PeftModel
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        job = json.loads(line)
        sys.argv = ["-c", *job["argv"]]
        error = None
        try:
            exec(compile(job["script"], "<stock job>", "exec"), {"__name__": "__main__"})
            ours = [name for name in sys.modules if name.startswith("llava_moslora")]
            assert not ours, f"the job imported our package: {ours}"
        except BaseException:
            error = traceback.format_exc()
        sys.stdout.flush()
        replies.write(json.dumps(error) + "\\n")
        replies.flush()
    """
)


class _StockInterpreter:
    """The interpreter behind `stock_python`: offline, its own $HF_HOME (where remote code is
    cached), an empty working directory, one thread (tiny models)."""

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="stock_python_"))
        self.log = self.work / "stderr.log"
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HOME=str(self.work / "hf_home"),
            PYTHONPATH="",
            OMP_NUM_THREADS="1",  # tiny models: see conftest.pytest_collection_finish
        )
        with open(self.log, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _STOCK_SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=self.work,
                env=env,
                text=True,
            )

    def run(self, script: str, *args: str, timeout: float = 600) -> None:
        process = self.process
        assert process.poll() is None, self.log.read_text()[-4000:]
        process.stdin.write(json.dumps({"script": script, "argv": list(args)}) + "\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        reply = process.stdout.readline() if ready else ""
        assert reply, f"no answer within {timeout} s: {self.log.read_text()[-4000:]}"
        error = json.loads(reply)
        assert error is None, error[-4000:]

    def close(self) -> None:
        self.process.kill()  # nothing to flush: every job wrote its results before it answered
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()
        shutil.rmtree(self.work, ignore_errors=True)


_stock_interpreters: list[_StockInterpreter] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """If a test uses `stock_python`, its interpreter starts as collection ends: its imports
    (seconds to a minute) run beside the tests before that one."""
    if session.config.option.collectonly:
        return
    if any("stock_python" in getattr(item, "fixturenames", ()) for item in session.items):
        _stock_interpreters.append(_StockInterpreter())


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _stock_interpreters:
        _stock_interpreters.pop().close()


@pytest.fixture(scope="session")
def stock_python() -> Callable[..., None]:
    """`stock_python(script, *args)`: run `script` as `python -c script args` would, in one
    interpreter for the session that never imports llava_moslora: what a user's stock
    transformers and PEFT see. One interpreter, started as collection ends, because each start
    imports torch, transformers and PEFT again (seconds to a minute on a busy machine)."""
    if not _stock_interpreters:
        _stock_interpreters.append(_StockInterpreter())
    return _stock_interpreters[0].run
