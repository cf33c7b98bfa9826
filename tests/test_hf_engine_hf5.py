"""Transformers 5: the hf engine trains there, and every export format loads there.

These run in the hf5 environment (pyproject's `hf5` group, no XTuner), which `hf5_python` builds
from uv.lock into .venv-hf5 once a session; the XTuner side and the exports are made here, in the
default environment (transformers 4.57). Slow: building the environment and starting its
interpreters takes a minute or more on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from llava_moslora.export import export
from llava_moslora.train import hf_engine
from llava_moslora.train.hf_recipe import recipe_from_config, write_recipe
from tests.factories import FP32_ATOL, QUESTION, TINY_MOSLORA, max_diff, read_config
from tests.stock_interpreter import STOCK_READER

pytestmark = pytest.mark.slow


def hf5_run(hf5_python, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` (or `-c SCRIPT ARGS`) in the hf5 environment, offline, one thread."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("VIRTUAL_ENV", None)
    command = [str(hf5_python), *(["-c", script] if script else []), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def test_the_hf5_environment_has_transformers_5_and_no_xtuner(hf5_python):
    script = (
        "import importlib.util, transformers; "
        "print(transformers.__version__, importlib.util.find_spec('xtuner') is not None)"
    )
    result = hf5_run(hf5_python, script=script)
    version, has_xtuner = result.stdout.split()
    assert int(version.split(".")[0]) >= 5 and has_xtuner == "False", result.stdout


CHECKPOINTED = r"""
import sys
from llava_moslora.train import hf_engine
from llava_moslora.train.hf_recipe import read_recipe

llava = hf_engine.Run(read_recipe(sys.argv[1]), sys.argv[2]).model.model
clip = getattr(llava.vision_tower, "vision_model", llava.vision_tower)
for layers in (llava.language_model.layers, clip.encoder.layers):
    print(all(layer.gradient_checkpointing for layer in layers))
"""


class OnBoth(NamedTuple):
    recipe: Any
    run: Any  # the Run here (4.57), trained
    work: Path  # the 5.x run's work dir
    start: dict  # the trained tensors at init, here


def iterations_on_both(config: str, iterations: int, tmp_path, hf5_python) -> OnBoth:
    """configs/CONFIG.py's recipe JSON trained `iterations` on transformers 5 and here from the
    same seed: every logged loss the same within 1e-5 (the adapters' init is re-seeded after the
    towers are built, which draw differently on 5.x: before, a 5.x run's third loss was 0.006
    away and its gradients of B up to 2x off)."""
    recipe = dataclasses.replace(recipe_from_config(read_config(config)), log_interval=1)
    path = write_recipe(recipe, tmp_path / "recipe.json")
    work = tmp_path / "work"
    result = hf5_run(
        hf5_python, "-m", "llava_moslora.cli", "train", "--engine", "hf", str(path),
        "--work-dir", str(work), "--max-iters", str(iterations),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(line) for line in (work / "hf_engine_log.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in logged] == list(range(1, iterations + 1))

    run = hf_engine.Run(recipe, tmp_path / "here")
    start = hf_engine.trained_state(run.model, recipe)
    here = run.train(run.samples(), max_iters=iterations)
    print(f"{config} losses: transformers 5 {[line['loss'] for line in logged]}, 4.57 {here}")
    assert max(abs(line["loss"] - loss) for line, loss in zip(logged, here, strict=True)) <= 1e-5
    return OnBoth(recipe, run, work, start)


def test_hf_engine_trains_on_transformers_5_as_on_4(tiny_env, tmp_path, hf5_python):
    """Four iterations (two optimizer steps) on 5.x and here: the same losses, trained tensors
    within an eighth of their move, activation checkpointing on every layer there; the
    checkpoint loads strictly here and exports."""
    recipe, run, work, start = iterations_on_both("tiny_moslora", 4, tmp_path, hf5_python)
    checkpoint = work / "iter_4.pth"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    ours = hf_engine.trained_state(run.model, recipe)
    assert state.keys() == ours.keys()
    apart = max(max_diff(ours[key], value) for key, value in state.items())
    moved = max(max_diff(ours[key], value) for key, value in start.items())
    print(f"trained tensors: 5.x vs 4.57 within {apart:.2e}; moved by up to {moved:.2e}")
    # Adam divides each gradient entry by its own size: an entry near zero whose last bits differ
    # between the stacks (gradients agree to 1e-6 relative) can step the other way, by up to a
    # step. Measured 1.2e-4 (a mixer entry) against moves of 4e-3; different adapters at init
    # would differ by their init's scale (~0.1).
    assert apart <= 5e-4 and moved >= 2e-3
    hf_engine.load_trained(run.model, recipe, state, checkpoint)  # strict: same keys on 5.x
    # With activation checkpointing on (the config's default: transformers 5's switch on every
    # layer of both towers), every adapter got its gradient: B, zero at init, moved.
    assert recipe.activation_checkpointing
    assert all(state[k].abs().max() > 0 for k in state if "lora_B" in k)
    result = hf5_run(hf5_python, str(tmp_path / "recipe.json"), str(work), script=CHECKPOINTED)
    assert result.stdout.split() == ["True", "True"], result.stderr[-3000:]
    manifest = export(checkpoint, TINY_MOSLORA, "peft-folded", tmp_path / "export", dtype="float32")
    assert manifest.format == "peft-folded"


def test_4bit_base_trains_on_transformers_5_as_on_4(tiny_env, tmp_path, hf5_python):
    """configs/tiny_qmoslora.py (QMoSLoRA, the LLM in 4-bit NF4) through its recipe JSON on 5.x,
    whose lock has bitsandbytes too: the losses are this stack's, and the checkpoint loads
    strictly here with every B moved."""
    pytest.importorskip("bitsandbytes")
    recipe, run, work, _ = iterations_on_both("tiny_qmoslora", 2, tmp_path, hf5_python)
    assert recipe.quantization is not None
    state = torch.load(work / "iter_2.pth", weights_only=True)["state_dict"]
    hf_engine.load_trained(run.model, recipe, state, work / "iter_2.pth")
    assert all(state[k].abs().max() > 0 for k in state if "lora_B" in k)


HF_LLAVA_READER = r"""
import sys
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
from PIL import Image

model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sys.argv[4]}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
batch = processor(images=Image.open(sys.argv[2]), text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
torch.save({"logits": logits, "input_ids": batch["input_ids"],
            "image_token_id": model.config.image_token_index}, sys.argv[3])
"""

MOSLORA_READER = r"""
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from llava_moslora.moslora import load_adapter

ids = torch.load(sys.argv[1])
llm = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
moslora = load_adapter(llm, sys.argv[3]).eval()
with torch.no_grad():
    ours = moslora(input_ids=ids).logits
llm = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
folded = PeftModel.from_pretrained(llm, sys.argv[4]).eval()
base = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
with torch.no_grad():
    theirs = folded(input_ids=ids).logits
    plain = base(input_ids=ids).logits
torch.save({"moslora": ours, "folded": theirs, "base": plain}, sys.argv[5])
"""


def test_every_export_format_loads_in_transformers_5(
    trained, inputs, tmp_path, stock_python_hf5, hf5_python
):
    """peft-folded and merged-xtuner in stock PEFT / transformers 5 give the training model's
    logits; hf-llava in stock LlavaForConditionalGeneration too; the xtuner format's MoSLoRA
    adapter loads there with the plugin and equals its folded twin."""
    _, checkpoint, expected = trained
    dirs = {fmt: tmp_path / fmt for fmt in ("xtuner", "peft-folded", "merged-xtuner", "hf-llava")}
    for fmt, out in dirs.items():
        export(checkpoint, TINY_MOSLORA, fmt, out, dtype="float32")

    torch.save({k: inputs[k] for k in ("input_ids", "pixel_values")}, tmp_path / "inputs.pt")
    stock_python_hf5(
        STOCK_READER, str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt"),
        str(dirs["peft-folded"]), str(dirs["merged-xtuner"]),
    )  # fmt: skip
    logits = torch.load(tmp_path / "logits.pt")
    # float32, same weights; summation order only (as on 4.57 in test_export.py).
    assert max_diff(logits[str(dirs["peft-folded"])], expected) < FP32_ATOL
    assert max_diff(logits[str(dirs["merged-xtuner"])], expected) < FP32_ATOL

    image = tmp_path / "image.png"
    inputs["image"].save(image)
    stock_python_hf5(HF_LLAVA_READER, str(dirs["hf-llava"]), str(image), str(tmp_path / "hf.pt"),
                     QUESTION)  # fmt: skip
    hf = torch.load(tmp_path / "hf.pt")
    is_text = hf["input_ids"][0] != hf["image_token_id"]
    assert is_text.sum() == inputs["input_ids"].shape[1] - 1  # same prompt, 16 image tokens
    vocab = expected.shape[-1]  # hf-llava adds the <image> token: one more column
    assert max_diff(hf["logits"][..., :vocab], expected) < FP32_ATOL

    manifest = json.loads((dirs["xtuner"] / "llava_moslora_export.json").read_text())
    ids = inputs["input_ids"][:, : int((inputs["input_ids"][0] == -200).nonzero()[0])]
    torch.save(ids, tmp_path / "ids.pt")
    result = hf5_run(
        hf5_python, str(tmp_path / "ids.pt"), manifest["llm"],
        str(dirs["xtuner"] / "llm_adapter"), str(dirs["peft-folded"] / "llm_adapter"),
        str(tmp_path / "moslora.pt"), script=MOSLORA_READER,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    both = torch.load(tmp_path / "moslora.pt")
    assert (both["moslora"] - both["base"]).abs().max() > 0.1  # the adapter changes the output
    assert max_diff(both["moslora"], both["folded"]) < FP32_ATOL
