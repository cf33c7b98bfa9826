"""`ablate --lr-grid`: rates chosen on the validation split, full runs at shared and best rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_moslora.ablate import lr_grid
from llava_moslora.ablate.runner import RESULT, VAL_RESULT, Run, evaluate, parse_evaluator

RATES = [5e-4, 1e-3, 2e-3]
# (validation, test) score per (variant, rate): on validation LoRA is best at 1e-3, MoSLoRA at
# 2e-3 (the grid's edge, so 4e-3 is tried, and is worse); the test items (never to be looked at
# for the choice) would pick 5e-4 for both.
SCORES = {
    "lora": {5e-4: (40.0, 90.0), 1e-3: (70.0, 20.0), 2e-3: (60.0, 10.0)},
    "moslora_orthogonal": {
        5e-4: (30.0, 95.0),
        1e-3: (50.0, 15.0),
        2e-3: (80.0, 12.0),
        4e-3: (75.0, 11.0),
    },
}


def table_score(variant: str, rate: float, seed: int, split: int) -> float:
    """SCORES plus the seed's last two digits (grid seeds 100, 101 add 0 and 1, as seeds 0, 1)."""
    return SCORES[variant][rate][split] + seed % 100


class FakeRunner:
    """`run_all` without training: a score per (variant, rate, seed, split; `table_score` unless
    given), and a record of every call (runs, cfg-options, evaluator)."""

    def __init__(self, score=table_score) -> None:
        self.calls: list[dict] = []
        self.score = score

    def __call__(self, runs, config, *, extra, evaluator, launcher=None, log=print):
        rate = float(extra[-1].split("=")[1])
        self.calls.append({"runs": list(runs), "extra": list(extra), "evaluator": evaluator})
        split = 0 if evaluator == "heldout:val" else 1
        return [
            {
                "variant": run.variant,
                "seed": run.seed,
                "score": self.score(run.variant, rate, run.seed, split),
                "unit": "% validation" if evaluator == "heldout:val" else "% held-out",
                "details": {"overall": self.score(run.variant, rate, run.seed, split) / 100},
                "checkpoint": str(run.dir / "train" / "iter_1.pth"),
            }
            for run in runs
        ]


def test_choose_rates_takes_the_best_mean_and_the_lower_of_equals_in_any_order():
    chosen = lr_grid.choose_rates(
        {"lora": {1e-3: [50, 70], 2e-3: [80, 30]}, "dora": {2e-3: [60, 60], 1e-3: [60, 60]}}
    )
    assert chosen == {"lora": 1e-3, "dora": 1e-3}  # 60 > 55; a tie: the lower rate, listed last
    assert lr_grid.choose_rates({"lora": {4e-3: [1.0], 1e-3: [1.0]}}) == {"lora": 1e-3}
    assert lr_grid.TIE_RULE == "the lower rate"
    with pytest.raises(ValueError, match="'lora' has no validation score"):
        lr_grid.choose_rates({"lora": {1e-3: []}})


def test_grid_picks_on_its_own_seeds_then_runs_every_test_seed_at_shared_and_best_rates(
    tmp_path,
):
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
    assert outcome.grid["lora"][1e-3] == [70.0, 71.0]  # grid seeds 100 and 101
    assert outcome.placement == {"lora": lr_grid.INTERIOR, "moslora_orthogonal": lr_grid.INTERIOR}

    val_calls = [c for c in fake.calls if c["evaluator"] == "heldout:val"]
    test_calls = [c for c in fake.calls if c["evaluator"] == "heldout"]
    assert fake.calls == val_calls + test_calls  # every choice made before any test run
    # The grid's trainings and the test table's are disjoint: no seed is in both.
    val_seeds = {r.seed for c in val_calls for r in c["runs"]}
    test_seeds = {r.seed for c in test_calls for r in c["runs"]}
    assert val_seeds == {100, 101} and test_seeds == {0, 1, 2, 3}
    grid_calls, widened = val_calls[:3], val_calls[3:]
    for call, rate in zip(grid_calls, RATES, strict=True):
        assert call["extra"] == ["model.llm_lora.r=4", f"optim_wrapper.optimizer.lr={rate!r}"]
        assert {(r.variant, r.seed) for r in call["runs"]} == {
            (v, s) for v in variants for s in (100, 101)
        }
        assert all(r.result_name == VAL_RESULT for r in call["runs"])
        assert all(r.dir.parent.parent == tmp_path / f"lr_{rate:g}" for r in call["runs"])
    # MoSLoRA's 2e-3 was the grid's top: 4e-3 is tried for it alone, and is worse
    assert [(c["extra"][-1], {r.variant for r in c["runs"]}) for c in widened] == [
        ("optim_wrapper.optimizer.lr=0.004", {"moslora_orthogonal"})
    ]
    assert outcome.grid["moslora_orthogonal"][4e-3] == [75.0, 76.0]
    shared, *best = test_calls
    assert shared["extra"][-1] == "optim_wrapper.optimizer.lr=0.001"
    assert {(r.variant, r.seed) for r in shared["runs"]} == {
        (v, s) for v in variants for s in range(4)
    }
    assert [(c["runs"][0].variant, c["extra"][-1]) for c in best] == [
        ("lora", "optim_wrapper.optimizer.lr=0.001"),
        ("moslora_orthogonal", "optim_wrapper.optimizer.lr=0.002"),
    ]
    # LoRA's best rate is the shared one: its best runs are its shared runs (one training)
    assert best[0]["runs"] == [r for r in shared["runs"] if r.variant == "lora"]
    assert all(r.result_name == RESULT for c in best for r in c["runs"])
    assert {r["lr"] for r in outcome.best if r["variant"] == "moslora_orthogonal"} == {2e-3}
    recorded = json.loads((tmp_path / lr_grid.CHOICE).read_text())
    assert recorded["chosen"] == {"lora": 1e-3, "moslora_orthogonal": 2e-3}
    assert (recorded["grid_seeds"], recorded["seeds"]) == ([100, 101], [0, 1, 2, 3])
    assert recorded["tie_rule"] == "the lower rate" and recorded["widen"] == 2

    paths = write_lr_grid_report(outcome, tmp_path, title="t")
    md = paths["md"].read_text()
    shared_at = md.index("## One shared rate, lr 0.001 (as the paper)")
    best_at = md.index("## Each variant at its best validation rate")
    assert md.index("## Learning rates: the validation grid") < shared_at < best_at
    assert "grid's seeds (100, 101; the test tables below use seeds 0, 1, 2, 3" in md
    assert "a tie goes to the lower rate" in md
    assert "| lora | 40.50 (n=2) | **70.50 (n=2)** | 60.50 (n=2) | – | 0.001 | interior |" in md
    assert (
        "| moslora_orthogonal | 30.50 (n=2) | 50.50 (n=2) | **80.50 (n=2)** | 75.50 (n=2) "
        "| 0.002 | interior |" in md
    )
    assert "Every chosen rate is interior" in md
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
    runs = json.loads(paths["runs"].read_text())
    assert runs["seeds"] == [0, 1, 2, 3] and len(runs["runs"]) == 16  # 2 settings x 2 x 4
    mine = [r for r in runs["runs"] if r["variant"] == "moslora_orthogonal"]
    assert {(r["setting"], r["lr"], r["seed"], r["score"]) for r in mine} == {
        ("shared", 1e-3, s, 15.0 + s) for s in range(4)
    } | {("best", 2e-3, s, 12.0 + s) for s in range(4)}


def _widened(by_rate_score, rates, widen=2):
    """run_lr_grid of LoRA alone on synthetic validation scores (rate -> score, both seeds)."""
    fake = FakeRunner(lambda variant, rate, seed, split: by_rate_score(rate))
    outcome = lr_grid.run_lr_grid(
        "cfg.py",
        ["lora"],
        [0],
        rates,
        "unused",
        shared_lr=rates[0],
        widen=widen,
        runner=fake,
        log=lambda _: None,
    )
    tried = [float(c["extra"][-1].split("=")[1]) for c in fake.calls if c["evaluator"] != "heldout"]
    return outcome, tried


@pytest.fixture
def unused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_a_best_rate_at_the_top_edge_widens_upwards_until_it_is_interior(unused):
    # still rising at 8e-3 (as Kaiming at rank 8 was); best at 1.6e-2, worse at 3.2e-2
    scores = {2e-3: 40.0, 4e-3: 46.0, 8e-3: 49.0, 1.6e-2: 55.0, 3.2e-2: 50.0}
    outcome, tried = _widened(scores.__getitem__, [2e-3, 4e-3, 8e-3])
    assert tried == [2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
    assert outcome.chosen == {"lora": 1.6e-2}
    assert outcome.placement == {"lora": lr_grid.INTERIOR}


def test_a_best_rate_at_the_bottom_edge_widens_downwards(unused):
    scores = {5e-4: 60.0, 1e-3: 65.0, 2e-3: 62.0, 4e-3: 50.0, 8e-3: 40.0}
    outcome, tried = _widened(scores.__getitem__, [1e-3, 2e-3, 4e-3, 8e-3])
    assert tried == [1e-3, 2e-3, 4e-3, 8e-3, 5e-4]
    assert (outcome.chosen, outcome.placement) == ({"lora": 1e-3}, {"lora": lr_grid.INTERIOR})


def test_widening_stops_at_its_limit_and_the_report_says_so(unused, tmp_path):
    from llava_moslora.ablate.report import write_lr_grid_report

    outcome, tried = _widened(lambda rate: 1000 * rate, [2e-3, 4e-3, 8e-3], widen=1)
    assert tried == [2e-3, 4e-3, 8e-3, 1.6e-2]  # one step beyond 8e-3, then the limit
    assert outcome.chosen == {"lora": 1.6e-2}
    assert outcome.placement == {"lora": lr_grid.HIGH_EDGE}
    md = write_lr_grid_report(outcome, tmp_path)["md"].read_text()
    assert "Not interior: lora (highest of its grid (widening limit reached))." in md
    outcome, tried = _widened(lambda rate: -rate, [2e-3, 4e-3, 8e-3], widen=0)
    assert tried == [2e-3, 4e-3, 8e-3] and outcome.placement == {"lora": lr_grid.LOW_EDGE}


def test_a_tie_goes_to_the_lower_rate_and_a_plateau_is_named(unused):
    # 4e-3 and 8e-3 tie for best: the lower is chosen, and it has no worse neighbour above
    scores = {2e-3: 40.0, 4e-3: 50.0, 8e-3: 50.0, 1.6e-2: 30.0}
    outcome, tried = _widened(scores.__getitem__, [8e-3, 4e-3, 2e-3])  # any listed order
    assert outcome.chosen == {"lora": 4e-3} and 1.6e-2 not in tried
    assert outcome.placement == {"lora": lr_grid.TIED_ABOVE}
    # a tie at the edge: the lower rate is the edge, so the grid widens below it
    scores = {1e-3: 20.0, 2e-3: 50.0, 4e-3: 50.0, 8e-3: 10.0}
    outcome, tried = _widened(scores.__getitem__, [2e-3, 4e-3, 8e-3])
    assert tried[-1] == 1e-3 and outcome.chosen == {"lora": 2e-3}


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
    grid = [*base, "--lr-grid", "1e-3,2e-3,4e-3"]
    assert main([*grid, "--grid-seeds", "1,7"]) == 2  # seed 1 is one of the test seeds 0, 1
    assert "`--grid-seeds` '1,7' shares seed(s) 1 with the test seeds 0-1" in (
        capsys.readouterr().err
    )
    assert main([*grid, "--grid-seeds", "a"]) == 2
    assert "`--grid-seeds` should be comma-separated non-negative seeds" in capsys.readouterr().err
    assert main([*grid, "--grid-widen", "-1"]) == 2
    assert "`--grid-widen` should be a non-negative integer, got -1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_evaluate_scores_the_split_asked_and_the_old_family_on_test(tmp_path, monkeypatch):
    """`heldout` scores the config's test items and, as `old_*`, its forgetting items, the model
    loaded once for both; `heldout:val` its validation items only; a config without validation
    items is refused."""
    import llava_moslora.eval.heldout as heldout

    config = tmp_path / "c.py"
    config.write_text(
        "heldout_eval_path = 'b_test.json'\n"
        "heldout_val_path = 'b_val.json'\n"
        "forgetting_eval_path = 'a_test.json'\n"
    )
    scores = {"b_test.json": 0.75, "b_val.json": 0.5, "a_test.json": 0.25}
    seen = []

    class Scored:
        def __init__(self, items):
            self.items = items

        def accuracy(self):
            return {"count": scores[self.items], "overall": scores[self.items]}

    def fake_score_sets(config, checkpoint, item_sets, cfg_options=None):
        seen.append(list(item_sets))  # one call: one model load
        return [Scored(items) for items in item_sets]

    monkeypatch.setattr(heldout, "score_sets", fake_score_sets)
    run = Run("lora", 0, tmp_path / "run")
    test = evaluate(run, Path("ckpt"), config, log=lambda _: None)
    assert seen == [["b_test.json", "a_test.json"]]
    assert test["score"] == 75.0 and test["unit"] == "% held-out"
    assert test["details"] == {
        "count": 0.75,
        "overall": 0.75,
        "old_count": 0.25,
        "old_overall": 0.25,
    }
    val = evaluate(run, Path("ckpt"), config, evaluator="heldout:val", log=lambda _: None)
    assert seen[1:] == [["b_val.json"]]
    assert val["score"] == 50.0 and val["details"] == {"count": 0.5, "overall": 0.5}

    assert parse_evaluator("heldout:val") == ("heldout", "val")
    config.write_text("heldout_eval_path = 'b_test.json'\n")
    with pytest.raises(ValueError, match="`--eval heldout:val` needs `heldout_val_path`"):
        evaluate(run, Path("ckpt"), config, evaluator="heldout:val", log=lambda _: None)


@pytest.mark.slow
def test_ablate_lr_grid_end_to_end_on_a_pretrained_base(tmp_path, monkeypatch):
    """`make-tiny --pretrain` at toy size, then `ablate --lr-grid` of LoRA on its family B
    (configs/tiny_ablation_pretrained.py), test seed 0, grid seed 1, 3 rates, no widening: each
    rate reaches the optimizer, the grid is scored on the validation items of its own seed, the
    test runs on the test items of theirs."""
    from llava_moslora.builders.pretrain import PretrainSpec, pretrain_tiny
    from llava_moslora.cli import main

    # 160 images / batch 8 = 20 iterations, the config's 1 epoch: a warm-up of >= 1 iteration.
    spec = PretrainSpec(hidden_size=16, samples=160, steps=2, val_items=4, test_items=4)
    pretrain_tiny(tmp_path / "base", spec, log=lambda _: None)
    monkeypatch.setenv("LLAVA_MOSLORA_TINY_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training subprocesses: no oversubscription
    work = tmp_path / "work"
    argv = ["ablate", "--config", "configs/tiny_ablation_pretrained.py", "--variants", "lora"]
    argv += ["--seeds", "1", "--grid-seeds", "1", "--grid-widen", "0"]
    argv += ["--lr-grid", "1e-3,2e-3,4e-3"]
    assert main([*argv, "--work-dir", str(work)]) == 0

    for rate in ("0.001", "0.002", "0.004"):
        run = work / f"lr_{rate}" / "lora" / "seed_1"
        val = json.loads((run / VAL_RESULT).read_text())
        assert val["evaluator"] == "heldout:val" and val["unit"] == "% validation"
        assert not any(key.startswith("old_") for key in val["details"])
        assert not (run / RESULT).exists()  # a grid run is never a test run
        dumped = (run / "train" / "tiny_ablation_pretrained.py").read_text()
        assert f"lr={rate}," in dumped  # the optimizer's rate, as mmengine ran it
    shared = json.loads((work / "lr_0.002" / "lora" / "seed_0" / RESULT).read_text())
    assert shared["evaluator"] == "heldout" and "old_overall" in shared["details"]
    assert not (work / "lr_0.002" / "lora" / "seed_0" / VAL_RESULT).exists()
    chosen = json.loads((work / lr_grid.CHOICE).read_text())["chosen"]["lora"]
    assert (work / f"lr_{chosen:g}" / "lora" / "seed_0" / RESULT).is_file()
    md = (work / "ablation.md").read_text()
    assert "## One shared rate, lr 0.002 (as the paper)" in md
    assert f"| lora | {chosen:g} | 1 |" in md
    assert {r["seed"] for r in json.loads((work / "runs.json").read_text())["runs"]} == {0}
