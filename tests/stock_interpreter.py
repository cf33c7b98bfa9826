"""One interpreter that has never imported llava_moslora, for the checks that stock libraries
(transformers, PEFT, remote code) read our files right: the `stock_python` fixture; the same on
the hf5 environment (transformers 5, built once a session from uv.lock): `stock_python_hf5`;
and STOCK_READER, an export read the way those libraries read it.

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
    cached), an empty working directory, one thread (tiny models). `executable`: this
    environment's python by default, or the hf5 environment's (`stock_python_hf5`)."""

    def __init__(self, executable: str = sys.executable) -> None:
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
                [executable, "-c", _STOCK_SERVER],
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
_hf5_interpreters: list[_StockInterpreter] = []  # `stock_python_hf5`: transformers 5


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
    while _hf5_interpreters:
        _hf5_interpreters.pop().close()


@pytest.fixture(scope="session")
def stock_python() -> Callable[..., None]:
    """`stock_python(script, *args)`: run `script` as `python -c script args` would, in one
    interpreter for the session that never imports llava_moslora: what a user's stock
    transformers and PEFT see. One interpreter, started as collection ends, because each start
    imports torch, transformers and PEFT again (seconds to a minute on a busy machine)."""
    if not _stock_interpreters:
        _stock_interpreters.append(_StockInterpreter())
    return _stock_interpreters[0].run


# --- an export read the way stock libraries read it ------------------------------------------

# Runs in `stock_python`, which never imports llava_moslora: stock transformers + PEFT, the folder
# layout probed the way VLMEvalKit's LLaVA_XTuner and `xtuner chat --llava` probe it (llm/ and
# visual_encoder/ if present, else the manifest's base models plus llm_adapter/ and
# visual_encoder_adapter/), the projector through AutoModel with trust_remote_code (its code is
# saved next to it; on transformers 5, where that code no longer loads, from its safetensors into
# the same Linear-GELU-Linear), and the image features spliced where the image index sits.
STOCK_READER = r"""
import json, os, sys
import torch
import transformers
from peft import PeftModel
from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionModel

inputs = torch.load(sys.argv[1])
results = {}
for export_dir in sys.argv[3:]:
    manifest = json.load(open(os.path.join(export_dir, "llava_moslora_export.json")))
    entries = os.listdir(export_dir)
    llm_path = os.path.join(export_dir, "llm") if "llm" in entries else manifest["llm"]
    vit_path = (
        os.path.join(export_dir, "visual_encoder")
        if "visual_encoder" in entries else manifest["visual_encoder"]
    )
    llm = AutoModelForCausalLM.from_pretrained(llm_path, torch_dtype=torch.float32)
    vit = CLIPVisionModel.from_pretrained(vit_path, torch_dtype=torch.float32)
    if "llm_adapter" in entries:
        llm = PeftModel.from_pretrained(llm, os.path.join(export_dir, "llm_adapter"))
    if "visual_encoder_adapter" in entries:
        # transformers 5's CLIPVisionModel has no `vision_model.` level; the adapter (saved from
        # 4.57's) names its layers under it: PEFT's key_mapping renames them, or they'd be dropped.
        flat = not hasattr(vit, "vision_model")
        vit = PeftModel.from_pretrained(
            vit,
            os.path.join(export_dir, "visual_encoder_adapter"),
            key_mapping={r"^vision_model\.": ""} if flat else None,
        )
    projector_dir = os.path.join(export_dir, "projector")
    if int(transformers.__version__.split(".")[0]) < 5:
        projector = AutoModel.from_pretrained(
            projector_dir, trust_remote_code=True, torch_dtype=torch.float32
        )
    else:  # XTuner's ProjectorModel code fails on 5.x (no `all_tied_weights_keys`)
        from safetensors.torch import load_file

        weights = load_file(os.path.join(projector_dir, "model.safetensors"))
        projector = torch.nn.Sequential(
            torch.nn.Linear(*weights["model.0.weight"].shape[::-1]),
            torch.nn.GELU(),
            torch.nn.Linear(*weights["model.2.weight"].shape[::-1]),
        )
        projector.load_state_dict({k[len("model."):]: v for k, v in weights.items()})
    for m in (llm, vit, projector):
        m.eval()
    ids = inputs["input_ids"]
    with torch.no_grad():
        hidden = vit(inputs["pixel_values"], output_hidden_states=True).hidden_states
        features = projector(hidden[manifest["visual_select_layer"]][:, 1:])  # (1, 16, hidden)
        at = int((ids[0] == -200).nonzero()[0])
        embed = llm.get_input_embeddings()
        embeds = torch.cat([embed(ids[:, :at]), features, embed(ids[:, at + 1:])], dim=1)
        results[export_dir] = llm(inputs_embeds=embeds).logits
assert not any(name.startswith("llava_moslora") for name in sys.modules), "imported our package"
torch.save(results, sys.argv[2])
"""


# --- the hf5 environment: transformers 5, no XTuner ------------------------------------------

REPO = Path(__file__).resolve().parent.parent
HF5_ENV = REPO / ".venv-hf5"


@pytest.fixture(scope="session")
def hf5_python() -> Path:
    """The python of the hf5 environment (pyproject's `hf5` group: transformers 5.x, accelerate,
    no XTuner), built from uv.lock into .venv-hf5 beside .venv by `uv sync`, once a session (a
    few seconds when it is up to date; about a minute from uv's cache)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("the hf5 tests build .venv-hf5 with `uv`: install it (pip install uv)")
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(HF5_ENV))
    env.pop("VIRTUAL_ENV", None)  # `uv run` sets it to .venv
    command = [uv, "sync", "--frozen", "--no-group", "xtuner", "--group", "hf5", "--quiet"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"
    return HF5_ENV / "bin" / "python"


@pytest.fixture(scope="session")
def stock_python_hf5(hf5_python) -> Callable[..., None]:
    """`stock_python` on the hf5 environment's python: stock transformers 5 and PEFT."""
    if not _hf5_interpreters:
        _hf5_interpreters.append(_StockInterpreter(str(hf5_python)))
    return _hf5_interpreters[0].run
