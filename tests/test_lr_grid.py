"""`ablate --lr-grid`: rates chosen on the validation split, full runs at shared and best rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_moslora.ablate import lr_grid
from llava_moslora.ablate.runner import RESULT, VAL_RESULT, Run, evaluate, parse_evaluator

RATES = [5e-4, 1e-3, 2e-3]
# (validation, test) score per (variant, rate): on validation LoRA is best at 1e-3, MoSLoRA at
# 2e-3; the test items (never to be looked at for the choice) would pick 5e-4 for both.
SCORES = {
    "lora": {5e-4: (40.0, 90.0), 1e-3: (70.0, 20.0), 2e-3: (60.0, 10.0)},
    "moslora_orthogonal": {5e-4: (30.0, 95.0), 1e-3: (50.0, 15.0), 2e-3: (80.0, 12.0)},
}


class FakeRunner:
    """`run_all` without training: a score per (variant, rate, split) plus the seed, and a record
    of every call (runs, cfg-options, evaluator)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, runs, config, *, extra, evaluator, launcher=None, log=print):
        rate = float(extra[-1].split("=")[1])
        self.calls.append({"runs": list(runs), "extra": list(extra), "evaluator": evaluator})
        split = 0 if evaluator == "heldout:val" else 1
        return [
            {
                "variant": run.variant,
                "seed": run.seed,
                "score": SCORES[run.variant][rate][split] + run.seed,
                "unit": "% validation" if evaluator == "heldout:val" else "% held-out",
                "details": {"overall": SCORES[run.variant][rate][split] / 100},
                "checkpoint": str(run.dir / "train" / "iter_1.pth"),
            }
            for run in runs
        ]


def test_choose_rates_takes_the_best_mean_and_the_first_of_equals():
    chosen = lr_grid.choose_rates(
        {"lora": {1e-3: [50, 70], 2e-3: [80, 30]}, "dora": {1e-3: [60, 60], 2e-3: [60, 60]}}
    )
    assert chosen == {"lora": 1e-3, "dora": 1e-3}  # 60 > 55; a tie keeps the rate listed first
    assert lr_grid.choose_rates({"lora": {4e-3: [1.0], 1e-3: [1.0]}}) == {"lora": 4e-3}
    with pytest.raises(ValueError, match="'lora' has no validation score"):
        lr_grid.choose_rates({"lora": {1e-3: []}})


def test_grid_picks_on_validation_then_runs_every_seed_at_shared_and_best_rates(tmp_path):
    from llava_moslora.ablate.report import write_lr_grid_report

    fake = FakeRunner()
    variants = ["lora", "moslora_orthogonal"]
    outcome = lr_grid.run_lr_grid(
        "cfg.py",
        variants,
        range(4),
        RATES,
        tmp_path,
        shared_lr=1e-3,
        extra=["model.llm_lora.r=4"],
        runner=fake,
        log=lambda _: None,
    )
    assert outcome.chosen == {"lora": 1e-3, "moslora_orthogonal": 2e-3}  # not the test's 5e-4
    assert outcome.grid["lora"][1e-3] == [70.0, 71.0]  # seeds 0 and 1 only

    grid_calls, full_calls = fake.calls[:3], fake.calls[3:]
    for call, rate in zip(grid_calls, RATES, strict=True):
        assert call["evaluator"] == "heldout:val"
        assert call["extra"] == ["model.llm_lora.r=4", f"optim_wrapper.optimizer.lr={rate!r}"]
        assert {(r.variant, r.seed) for r in call["runs"]} == {
            (v, s) for v in variants for s in (0, 1)
        }
        assert all(r.result_name == VAL_RESULT for r in call["runs"])
        assert all(r.dir.parent.parent == tmp_path / f"lr_{rate:g}" for r in call["runs"])
    shared, *best = full_calls
    assert (
        shared["evaluator"] == "heldout"
        and shared["extra"][-1] == "optim_wrapper.optimizer.lr=0.001"
    )
    assert {(r.variant, r.seed) for r in shared["runs"]} == {
        (v, s) for v in variants for s in range(4)
    }
    assert [(c["runs"][0].variant, c["extra"][-1]) for c in best] == [
        ("lora", "optim_wrapper.optimizer.lr=0.001"),
        ("moslora_orthogonal", "optim_wrapper.optimizer.lr=0.002"),
    ]
    # A grid run and the full run of its variant, seed and rate share one run dir (one training,
    # two result files): LoRA's best rate is the shared one, so its runs are the shared runs.
    assert best[0]["runs"] == [r for r in shared["runs"] if r.variant == "lora"]
    assert all(r.result_name == RESULT for c in best for r in c["runs"])
    assert {r["lr"] for r in outcome.best if r["variant"] == "moslora_orthogonal"} == {2e-3}
    recorded = json.loads((tmp_path / lr_grid.CHOICE).read_text())
    assert recorded["chosen"] == {"lora": 1e-3, "moslora_orthogonal": 2e-3}

    paths = write_lr_grid_report(outcome, tmp_path, title="t")
    md = paths["md"].read_text()
    shared_at = md.index("## One shared rate, lr 0.001 (as the paper)")
    best_at = md.index("## Each variant at its best validation rate")
    assert md.index("## Learning rates: the validation grid") < shared_at < best_at
    assert "| lora | 40.50 (n=2) | **70.50 (n=2)** | 60.50 (n=2) | 0.001 |" in md
    assert "| moslora_orthogonal | 30.50 (n=2) | 50.50 (n=2) | **80.50 (n=2)** | 0.002 |" in md
    shared_md, best_md = md[shared_at:best_at], md[best_at:]
    # shared rate: both at 1e-3 (test 20 and 15, + seed); best: MoSLoRA at 2e-3 (12, + seed)
    assert "| lora | 4 | 21.50 ± 1.29 |" in shared_md
    assert "| moslora_orthogonal | 4 | 16.50 ± 1.29 | [" in shared_md
    assert "| variant | lr | n | mean ± std |" in best_md
    assert "| lora | 0.001 | 4 | 21.50 ± 1.29 |" in best_md
    assert "| moslora_orthogonal | 0.002 | 4 | 13.50 ± 1.29 | [" in best_md
    assert "| -8.00 |" in best_md and "| -5.00 |" in shared_md  # paired against LoRA per table
    for key in ("csv_shared_lr", "csv_best_lr", "png_shared_lr", "png_best_lr"):
        assert paths[key].is_file()


def test_grid_refuses_what_would_make_the_choice_unfair():
    fake = FakeRunner()
    common = dict(shared_lr=1e-3, runner=fake, log=lambda _: None)
    with pytest.raises(ValueError, match="`--eval` should be `heldout`, got 'heldout:val'"):
        lr_grid.run_lr_grid("c.py", ["lora"], [0], RATES, "w", evaluator="heldout:val", **common)
    with pytest.raises(ValueError, match="`--cfg-options` sets `optim_wrapper.optimizer.lr`"):
        lr_grid.run_lr_grid(
            "c.py", ["lora"], [0], RATES, "w", extra=["optim_wrapper.optimizer.lr=1"], **common
        )
    assert fake.calls == []


@pytest.mark.parametrize("text", ["1e-3,2e-3", "1e-3,1e-3,2e-3", "1e-3,0,2e-3", "a,b,c"])
def test_rates_are_at_least_three_distinct_positive_numbers(text):
    with pytest.raises(ValueError, match="`--lr-grid` should be at least 3 distinct positive"):
        lr_grid.parse_rates(text)


def test_ablate_lr_grid_flags_are_checked_before_anything_runs(tmp_path, capsys):
    from llava_moslora.cli import main

    config = tmp_path / "c.py"
    config.write_text("lr = 1\n")
    base = ["ablate", "--config", str(config), "--work-dir", str(tmp_path / "w"), "--seeds", "2"]
    assert main([*base, "--lr-grid", "1e-3,2e-3"]) == 2
    assert "at least 3 distinct positive learning rates" in capsys.readouterr().err
    assert main([*base, "--lr-grid", "1e-3,2e-3,4e-3", "--grid-seeds", "3"]) == 2
    assert "`--grid-seeds` should be between 1 and `--seeds` (2), got 3" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_evaluate_scores_the_split_asked_and_the_old_family_on_test(tmp_path, monkeypatch):
    """`heldout` scores the config's test items and, as `old_*`, its forgetting items;
    `heldout:val` its validation items only; a config without validation items is refused."""
    import llava_moslora.eval.heldout as heldout

    config = tmp_path / "c.py"
    config.write_text(
        "heldout_eval_path = 'b_test.json'\n"
        "heldout_val_path = 'b_val.json'\n"
        "forgetting_eval_path = 'a_test.json'\n"
    )
    scores = {"b_test.json": 0.75, "b_val.json": 0.5, "a_test.json": 0.25}
    seen = []

    def fake_evaluate_run(config, checkpoint=None, items=None, cfg_options=None):
        seen.append(items)
        return {"count": scores[items], "overall": scores[items]}

    monkeypatch.setattr(heldout, "evaluate_run", fake_evaluate_run)
    run = Run("lora", 0, tmp_path / "run")
    test = evaluate(run, Path("ckpt"), config, log=lambda _: None)
    assert seen == ["b_test.json", "a_test.json"]
    assert test["score"] == 75.0 and test["unit"] == "% held-out"
    assert test["details"] == {
        "count": 0.75,
        "overall": 0.75,
        "old_count": 0.25,
        "old_overall": 0.25,
    }
    val = evaluate(run, Path("ckpt"), config, evaluator="heldout:val", log=lambda _: None)
    assert seen[2:] == ["b_val.json"]
    assert val["score"] == 50.0 and val["details"] == {"count": 0.5, "overall": 0.5}

    assert parse_evaluator("heldout:val") == ("heldout", "val")
    config.write_text("heldout_eval_path = 'b_test.json'\n")
    with pytest.raises(ValueError, match="`--eval heldout:val` needs `heldout_val_path`"):
        evaluate(run, Path("ckpt"), config, evaluator="heldout:val", log=lambda _: None)


@pytest.mark.slow
def test_ablate_lr_grid_end_to_end_on_a_pretrained_base(tmp_path, monkeypatch):
    """`make-tiny --pretrain` at toy size, then `ablate --lr-grid` of LoRA on its family B
    (configs/tiny_ablation_pretrained.py), 1 seed, 3 rates: each rate reaches the optimizer, the
    grid is scored on the validation items, the config's own rate is one training scored twice."""
    from llava_moslora.builders.pretrain import PretrainSpec, pretrain_tiny
    from llava_moslora.cli import main

    # 160 images / batch 8 = 20 iterations per epoch, 3 epochs: a warm-up of >= 1 iteration.
    spec = PretrainSpec(hidden_size=16, samples=160, steps=2, val_items=4, test_items=4)
    pretrain_tiny(tmp_path / "base", spec, log=lambda _: None)
    monkeypatch.setenv("LLAVA_MOSLORA_TINY_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training subprocesses: no oversubscription
    work = tmp_path / "work"
    argv = ["ablate", "--config", "configs/tiny_ablation_pretrained.py", "--variants", "lora"]
    argv += ["--seeds", "1", "--grid-seeds", "1", "--lr-grid", "1e-3,2e-3,4e-3"]
    assert main([*argv, "--work-dir", str(work)]) == 0

    for rate in ("0.001", "0.002", "0.004"):
        run = work / f"lr_{rate}" / "lora" / "seed_0"
        val = json.loads((run / VAL_RESULT).read_text())
        assert val["evaluator"] == "heldout:val" and val["unit"] == "% validation"
        assert not any(key.startswith("old_") for key in val["details"])
        dumped = (run / "train" / "tiny_ablation_pretrained.py").read_text()
        assert f"lr={rate}," in dumped  # the optimizer's rate, as mmengine ran it
    # The config's rate (2e-3) was in the grid: its full run is the grid run, scored on test too.
    shared = json.loads((work / "lr_0.002" / "lora" / "seed_0" / RESULT).read_text())
    assert shared["evaluator"] == "heldout" and "old_overall" in shared["details"]
    assert len(list((work / "lr_0.002" / "lora" / "seed_0" / "train").glob("iter_*.pth"))) == 1
    chosen = json.loads((work / lr_grid.CHOICE).read_text())["chosen"]["lora"]
    assert (work / f"lr_{chosen:g}" / "lora" / "seed_0" / RESULT).is_file()
    md = (work / "ablation.md").read_text()
    assert "## One shared rate, lr 0.002 (as the paper)" in md
    assert f"| lora | {chosen:g} | 1 |" in md
