"""The hf engine under `--fsdp` (llava_moslora/train/hf_fsdp.py: torch's `fully_shard`), on CPU,
float32: the same losses, trained tensors and checkpoints as the hf engine's plain loop.

The runs train the tiny LLaVA on its first 20 samples for one epoch: 5 micro-batches of 4 with
accumulation 2, so the optimizer steps after 2, 2 and a short last group of 1 (divided by 1, as
mmengine's OptimWrapper divides it), under the warm-up and cosine stepped per micro-batch and
clipping at the config's max_norm 1 (the gradient norms are 4.45, 3.39 and 3.31: every step
clips). One process shares the module's FSDP run; one test starts two under torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_moslora.moslora.safety import safe_torch_load
from llava_moslora.train import hf_engine
from llava_moslora.train.checkpoints import load_trained_state
from llava_moslora.train.hf_fsdp import require_fsdp
from llava_moslora.train.hf_recipe import RecipeError, recipe_from_config, write_recipe
from tests.factories import read_config

ROOT = Path(__file__).parents[1]
SAMPLES = 20  # 5 iterations of batch 4: optimizer steps after 2, 2 and 1 micro-batches


# a run here starts this process's group: torn down after the module
pytestmark = pytest.mark.usefixtures("no_process_group_left_behind")


@pytest.fixture(scope="module")
def recipe(tiny_env, tmp_path_factory):
    """The tiny MoSLoRA recipe on the first SAMPLES samples, one epoch, a checkpoint every 2."""
    recipe = recipe_from_config(read_config("tiny_moslora"))
    records = json.loads(Path(recipe.data_path).read_text())[:SAMPLES]
    data = tmp_path_factory.mktemp("data") / "data.json"
    data.write_text(json.dumps(records))
    return dataclasses.replace(recipe, epochs=1, save_steps=2, data_path=str(data))


def trained(recipe, work_dir: Path, fsdp: bool):
    """(losses, iter_5.pth as saved, run)."""
    run = hf_engine.Run(recipe, work_dir, fsdp=fsdp)
    losses = run.train(run.samples())
    return losses, safe_torch_load(work_dir / "iter_5.pth"), run


@pytest.fixture(scope="module")
def plain(recipe, tmp_path_factory):
    return trained(recipe, tmp_path_factory.mktemp("plain"), fsdp=False)


@pytest.fixture(scope="module")
def fsdp(recipe, tmp_path_factory):
    return trained(recipe, tmp_path_factory.mktemp("fsdp"), fsdp=True)


def apart(plain_state: dict, state: dict) -> float:
    assert state.keys() == plain_state.keys()
    moved = max(t.abs().max().item() for k, t in plain_state.items() if "lora_B" in k)
    assert moved > 1e-3  # B starts at zero: the runs trained, the equality means something
    return max((state[k] - plain_state[k]).abs().max().item() for k in state)


@pytest.mark.slow
def test_fsdp_trains_as_the_plain_loop(plain, fsdp):
    """Each decoder layer of both towers and the root are FSDP units; the trained tensors are
    DTensors; the checkpoint holds them gathered, in XTuner's keys, as the plain loop's does."""
    from torch.distributed.tensor import DTensor

    run = fsdp[2]
    units = {type(m).__name__ for m in run.model.modules() if type(m).__name__.startswith("FSDP")}
    # every decoder layer of both towers, and the root (transformers 5 adds CLIP's embeddings)
    layers = {"FSDPLlamaDecoderLayer", "FSDPCLIPEncoderLayer", "FSDPLlavaForConditionalGeneration"}
    assert layers <= units
    assert all(isinstance(p, DTensor) for p in run.trainable)
    assert fsdp[1]["meta"]["fsdp"] is True and plain[1]["meta"]["fsdp"] is False
    assert len(fsdp[0]) == SAMPLES // 4
    # Measured on one process: losses and every trained tensor 0.0 apart (the one shard is the
    # whole tensor; FSDP's reduce-scatter divides by 1). Tested at 1e-6, Adam's steps move 3e-3.
    assert max(abs(a - b) for a, b in zip(fsdp[0], plain[0], strict=True)) <= 1e-6
    assert apart(plain[1]["state_dict"], fsdp[1]["state_dict"]) <= 1e-6
    # the optimizer state gathered, keyed by parameter name (torch.distributed.checkpoint)
    state = fsdp[1]["optimizer"]["state"]
    assert len(state) == len(run.trainable) and all(s["step"].item() == 3 for s in state.values())
    # what `export` and the evaluators read: every trained tensor of the unsharded model, strictly
    read = load_trained_state(run.work_dir / "iter_5.pth")
    assert read.keys() == fsdp[1]["state_dict"].keys()
    hf_engine.ours_from_xtuner(plain[2].model, plain[2].recipe, read, "iter_5.pth")


DRIVER = """
import json, sys
from llava_moslora.train import hf_engine
from llava_moslora.train.checkpoints import load_trained_state
from llava_moslora.train.hf_recipe import read_recipe

# every process takes every sample: the gradients FSDP averages are then the plain loop's
hf_engine.rank_share = lambda order, rank, world: order
run = hf_engine.Run(read_recipe(sys.argv[1]), sys.argv[2], fsdp=True)
run.world = 1
shard = run.trainable[0]
losses = run.train(run.samples())
print(json.dumps({"losses": losses, "local": list(shard.to_local().shape), "full": list(shard.shape)}))
"""


@pytest.mark.slow
def test_two_processes_train_as_the_plain_loop(recipe, plain, tmp_path):
    """torchrun, 2 processes, each tensor split between them: the same steps as the plain loop
    when both see the same data, so the gradients' reduction, clipping with the norm over both
    shards and the gather into the checkpoint are all checked."""
    (tmp_path / "driver.py").write_text(DRIVER)
    recipe_file = write_recipe(recipe, tmp_path / "recipe.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(tmp_path / "driver.py"), str(recipe_file)]
    command += [str(tmp_path / "work")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2
    for report in reports:
        assert report["local"][0] * 2 == report["full"][0]  # sharded in halves
        # measured: the losses equal to the last digit, trained tensors 7.5e-9 apart (clipping
        # each shard by its own norm instead: tensors 1.0e-3 apart, the last loss 5.4e-4)
        assert max(abs(a - b) for a, b in zip(report["losses"], plain[0], strict=True)) <= 1e-6
    saved = safe_torch_load(tmp_path / "work" / "iter_5.pth")
    assert apart(plain[1]["state_dict"], saved["state_dict"]) <= 1e-6


def test_each_process_takes_the_samples_mmengines_sampler_gives_it(monkeypatch):
    """`rank_share` deals an epoch as mmengine's DefaultSampler (shuffle off: the order is the
    engine's own permutation) deals it to each of `world` processes, padding included."""
    from mmengine.dataset import sampler

    order = torch.randperm(11, generator=torch.Generator().manual_seed(3)).tolist()
    for world in (1, 2, 3, 4):
        for rank in range(world):
            monkeypatch.setattr(sampler, "get_dist_info", lambda r=rank, w=world: (r, w))
            theirs = sampler.DefaultSampler(list(range(11)), shuffle=False, round_up=True)
            assert hf_engine.rank_share(order, rank, world) == [order[i] for i in theirs]
    assert hf_engine.rank_share(order, 0, 1) == order


@pytest.mark.slow
@pytest.mark.parametrize("killed_after", [2, 3])
def test_a_resumed_fsdp_run_is_bit_identical(recipe, fsdp, tmp_path, killed_after):
    """Killed after iteration 2 (a group's end) or 3 (inside an accumulation group, whose
    gradients no checkpoint holds: the resume goes on from the group's first micro-batch with the
    RNG state taken there) and resumed: the trained tensors and the optimizer state restored into
    the sharded optimizer, the run's iter_5.pth equals the uninterrupted one's."""
    work = tmp_path / "killed"
    assert hf_engine.train(recipe, work, max_iters=killed_after, fsdp=True) == 0
    assert (work / "last_checkpoint").read_text().endswith(f"iter_{killed_after}.pth")
    assert hf_engine.train(recipe, work, resume=True, fsdp=True) == 0
    straight, resumed = fsdp[1], safe_torch_load(work / "iter_5.pth")
    for key, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][key]), key
    for name, state in straight["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][name][field]), (name, field)


@pytest.mark.slow
@pytest.mark.parametrize("written_with", ["plain", "fsdp"])
def test_resume_refuses_the_other_choice(recipe, plain, fsdp, written_with, capsys):
    """A run written without `--fsdp` does not resume with it, nor the other way round."""
    run = {"plain": plain, "fsdp": fsdp}[written_with][2]
    before = sorted(p.name for p in run.work_dir.iterdir())
    code = hf_engine.train(recipe, run.work_dir, resume=True, fsdp=written_with == "plain")
    assert code == 2
    written = "without" if written_with == "plain" else "with"
    assert (
        f"the run was written {written} `--fsdp`; resume it the same way" in capsys.readouterr().err
    )
    assert sorted(p.name for p in run.work_dir.iterdir()) == before


def test_fsdp_with_deepspeed_is_refused_in_one_line(tiny_env, tmp_path):
    """Through the CLI: exit 2, one `error:` line, nothing trained."""
    recipe_file = write_recipe(recipe_from_config(read_config("tiny_moslora")), tmp_path / "r.json")
    work = tmp_path / "work"
    command = [sys.executable, "-m", "llava_moslora.cli", "train", "--engine", "hf"]
    command += [
        str(recipe_file),
        "--work-dir",
        str(work),
        "--fsdp",
        "--deepspeed",
        "deepspeed_zero3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "`--fsdp` and `--deepspeed deepspeed_zero3` both shard the model" in errors[0]
    assert "Traceback" not in result.stderr
    assert not work.exists()


def test_a_stack_without_fsdp2_is_refused(tiny_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)
    recipe = recipe_from_config(read_config("tiny_moslora"))
    with pytest.raises(RecipeError, match=r"`--fsdp` needs torch's FSDP2 .* use torch >= 2.6"):
        require_fsdp(recipe)


def test_a_4bit_base_is_refused_before_anything_is_built(tiny_env, tmp_path, capsys):
    """QLoRA / QMoSLoRA: bitsandbytes' packed 4-bit weights are not sharded. One line, exit 2."""
    recipe = recipe_from_config(read_config("tiny_qmoslora"))
    assert recipe.quantization is not None
    assert hf_engine.train(recipe, tmp_path / "work", fsdp=True) == 2
    err = capsys.readouterr().err
    assert "`--fsdp` with a 4-bit LLM (`model.llm.quantization_config`, QLoRA / QMoSLoRA)" in err
    assert not (tmp_path / "work").exists()
