"""DeepSpeed 0.17.6-0.18.2's ZeRO-2 drops accumulated gradients (llava_moslora/train/
deepspeed_defects.py): both engines refuse that setting before training, and only that one."""

from __future__ import annotations

import dataclasses

import pytest

from llava_moslora.train import deepspeed_defects
from llava_moslora.train.deepspeed_defects import installed_deepspeed, zero2_accumulation_defect

ZERO2 = {"zero_optimization": {"stage": 2, "overlap_comm": True}}  # XTuner's preset's section


@pytest.mark.parametrize(
    ("config", "accumulation", "version", "refused"),
    [
        (ZERO2, 2, "0.17.6", True),
        (ZERO2, 16, "0.18.2", True),
        (ZERO2, 2, "0.17.6+cpu", True),  # a local build of the release
        (ZERO2, 2, "0.17.5", False),  # before PR #7509
        (ZERO2, 2, "0.18.3", False),  # PR #7665
        (ZERO2, 1, "0.17.6", False),  # every backward is a step
        (ZERO2, 2, None, False),  # no DeepSpeed: refused elsewhere, by name
        ({"zero_optimization": {"stage": 3}}, 2, "0.17.6", False),
        ({"zero_optimization": {"stage": 1}}, 2, "0.17.6", False),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            2,
            "0.17.6",
            False,
        ),  # fmt: skip
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}},
            2,
            "0.17.6",
            True,
        ),  # fmt: skip
    ],
)
def test_only_zero2_with_accumulation_on_the_affected_releases(
    config, accumulation, version, refused
):
    defect = zero2_accumulation_defect(config, accumulation, version)
    assert (defect is not None) is refused
    if refused:
        assert f"`accumulative_counts` {accumulation} on DeepSpeed {version}" in defect
        assert "deepspeed_zero3" in defect and ">= 0.18.3" in defect and "<= 0.17.5" in defect


def test_the_version_is_the_imported_deepspeeds(monkeypatch):
    class Imported:
        __version__ = "0.18.4"

    monkeypatch.setitem(__import__("sys").modules, "deepspeed", Imported)
    assert installed_deepspeed() == "0.18.4"


# --- the XTuner engine: `llava-moslora train CONFIG --deepspeed ...` ----------------------------


@pytest.mark.parametrize("version", ["0.17.6", "0.18.3"])
def test_xtuner_path_refuses_zero2_with_accumulation_where_deepspeed_drops_it(
    tiny_env, tmp_path, capsys, no_training, monkeypatch, version
):
    """tiny_moslora.py accumulates 2 micro-batches (the paper's schedule): with the locked
    DeepSpeed, `--deepspeed deepspeed_zero2` is refused in one line before XTuner starts;
    with a fixed one, and with ZeRO-3, it starts."""
    from llava_moslora.cli import main
    from tests.factories import CONFIGS, read_config

    assert read_config("tiny_moslora").optim_wrapper.accumulative_counts == 2
    monkeypatch.setattr(deepspeed_defects, "installed_deepspeed", lambda: version)
    config = str(CONFIGS / "tiny_moslora.py")
    work = tmp_path / "work"
    code = main(["train", config, "--work-dir", str(work), "--deepspeed", "deepspeed_zero2"])
    err = capsys.readouterr().err
    if version == "0.17.6":
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and not no_training and "Traceback" not in err
        assert len(lines) == 1, err
        assert lines[0].startswith("error: training refused: `--deepspeed deepspeed_zero2`: ")
        assert "`accumulative_counts` 2 on DeepSpeed 0.17.6" in lines[0]
        assert not work.exists()
    else:
        assert code == 0 and len(no_training) == 1, err
    zero3 = ["train", config, "--work-dir", str(tmp_path / "z3"), "--deepspeed", "deepspeed_zero3"]
    assert main(zero3) == 0 and no_training[-1][-1] == "deepspeed_zero3"


def test_the_locked_deepspeed_is_not_an_affected_release():
    """The lock holds DeepSpeed 0.17.5 (pyproject.toml) so that the paper's ZeRO-2 runs, which
    accumulate 2 micro-batches, train right: moving it into 0.17.6-0.18.2 fails here."""
    assert installed_deepspeed() == "0.17.5"
    assert zero2_accumulation_defect(ZERO2, 2, installed_deepspeed()) is None


# --- the hf engine: `llava-moslora train --engine hf CONFIG --deepspeed ...` --------------------


def test_hf_engine_refuses_zero2_with_accumulation_from_the_defect_on(tiny_env, monkeypatch):
    """The defect's message on an affected release; from 0.18.3 on its own (measured off the
    plain loop with 0.18.3, docs/training.md); accumulation 1 is taken; the lock's 0.17.5, which
    gives the plain loop's numbers (tests/test_hf_deepspeed.py), takes accumulation too."""
    from llava_moslora.train.hf_deepspeed import deepspeed_config
    from llava_moslora.train.hf_recipe import RecipeError, recipe_from_config
    from tests.factories import read_config

    recipe = recipe_from_config(read_config("tiny_moslora"))
    for version, message in (
        ("0.17.6", "keep only the last micro-batch's gradients"),
        ("0.18.3", "is not matched to the plain loop yet \\(DeepSpeed 0.18.3"),
    ):
        monkeypatch.setattr(deepspeed_defects, "installed_deepspeed", lambda v=version: v)
        with pytest.raises(RecipeError, match=message):
            deepspeed_config("deepspeed_zero2", recipe, cuda=False)
        one = dataclasses.replace(recipe, accumulative_counts=1)
        assert (
            deepspeed_config("deepspeed_zero2", one, cuda=False)["gradient_accumulation_steps"] == 1
        )
        zero3 = deepspeed_config("deepspeed_zero3", recipe, cuda=False)
        assert zero3["gradient_accumulation_steps"] == 2
    for version in ("0.17.5", "0.16.9"):
        monkeypatch.setattr(deepspeed_defects, "installed_deepspeed", lambda v=version: v)
        taken = deepspeed_config("deepspeed_zero2", recipe, cuda=False)
        assert taken["gradient_accumulation_steps"] == 2
        assert taken["zero_optimization"]["stage"] == 2
