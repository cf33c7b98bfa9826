"""What the tests share, by concern, each module loaded here as a pytest plugin:

    tests/factories.py          tiny models built from config objects (nothing is downloaded), the
                                tiny LLaVA on disk, the trained model and inputs the export tests
                                start from, the offline evaluation's exports and runs
    tests/launchers.py          a training run in a subprocess, the scripts under a recorder
    tests/stock_interpreter.py  one interpreter that never imports llava_moslora (`stock_python`)

Tests import helpers from those modules; fixtures reach every test through the plugins. Nothing
here imports XTuner, VLMEvalKit or bitsandbytes at module level: scripts/compat.sh runs the
adapter tests in environments without XTuner.
"""

from __future__ import annotations

import pytest
import torch

pytest_plugins = ["tests.factories", "tests.launchers", "tests.stock_interpreter"]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Once the tests that will run are known: without a slow test among them (the fast lane),
    torch runs on one thread in this process. Their models are tiny, so a thread pool buys
    nothing, and on a shared machine (CI, a 2-core box with other jobs) each op waits for pool
    threads the scheduler has parked: test_demo.py took 22 s instead of 3 s under load. (The
    stand-ins of the slow tests are 4096 wide: they keep the default.)"""
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker("slow") for item in session.items):
        torch.set_num_threads(1)
