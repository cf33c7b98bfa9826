"""`llava-moslora ablate`: variants as config overrides, statistics over seeds, the runner."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from llava_moslora.ablate import stats
from llava_moslora.ablate.variants import VARIANTS, cfg_options, parse_variants

REPO = Path(__file__).resolve().parents[1]


def test_spread_is_mean_sample_std_and_t_interval():
    s = stats.spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s.n, s.mean) == (5, 3.0)
    assert s.std == pytest.approx(math.sqrt(2.5))  # ddof=1
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975, 4} from any t table
    assert (s.ci_low, s.ci_high) == pytest.approx((3.0 - half, 3.0 + half), abs=1e-5)
    one = stats.spread([0.7])
    assert one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.ci_low)
    with pytest.raises(ValueError, match="`values` is empty"):
        stats.spread([])


def test_paired_differences_on_shared_seeds():
    variant = {0: 0.6, 1: 0.7, 2: 0.8, 9: 0.1}  # seed 9 has no baseline run: ignored
    baseline = {0: 0.5, 1: 0.5, 2: 0.5}
    p = stats.paired(variant, baseline)
    assert (p.n, p.wins, p.losses) == (3, 3, 0)
    assert p.mean_diff == pytest.approx(0.2)
    # Of the 8 sign patterns of (.1, .2, .3) only +++ and --- reach |sum| >= .6.
    assert p.p_signflip == pytest.approx(2 / 8)
    # t = 0.2 / (0.1 / sqrt 3) = sqrt 12, 2 dof: Student's cdf is 1/2 + t / (2 sqrt(2 + t^2)).
    t = math.sqrt(12)
    assert p.p_ttest == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), rel=1e-6)
    assert p.ci_low < 0.2 < p.ci_high
    with pytest.raises(ValueError, match="no seed has a finished run in both"):
        stats.paired({1: 0.5}, {2: 0.5})


def test_five_seeds_cannot_reach_5_percent_by_sign_flips():
    assert stats.signflip_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)


def test_holm_adjusts_in_input_order_monotone_and_capped():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]  # capped
    adjusted = stats.holm([math.nan, 0.02, 0.04])  # no test: stays nan, is not counted
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.04, 0.04])
    assert stats.holm([0.01]) == [0.01]


def test_report_corrects_for_every_comparison_and_tests_kaiming_against_init_only(tmp_path):
    """Six seeds: Kaiming beats LoRA in all six (sign-flip p = 2/64) and init-only in all six; the
    family is three comparisons (two vs LoRA, one direct pair), so Holm triples the smallest."""
    from llava_moslora.ablate.report import write_report

    lora = [50.0, 52.0, 51.0, 49.0, 50.0, 53.0]
    results = _results(
        {
            "lora": lora,
            "moslora_kaiming": [v + d for v, d in zip(lora, (3, 2, 4, 3, 5, 2), strict=True)],
            "init_only": [v + d for v, d in zip(lora, (1, -1, 0.5, -0.5, 1, -1), strict=True)],
        }
    )
    paths = write_report(results, tmp_path, title="t")
    rows = {row["variant"]: row for row in csv.DictReader(paths["csv"].open())}
    kaiming = rows["moslora_kaiming"]
    assert float(kaiming["p_sign_flip"]) == pytest.approx(2 / 64, abs=1e-4)
    assert float(kaiming["p_sign_flip_holm"]) == pytest.approx(3 * 2 / 64, abs=1e-4)
    assert kaiming["control"] == "init_only"
    diffs = (3 - 1, 2 + 1, 4 - 0.5, 3 + 0.5, 5 - 1, 2 + 1)
    assert float(kaiming["diff_vs_control"]) == pytest.approx(sum(diffs) / 6, abs=1e-4)
    assert float(kaiming["p_sign_flip_vs_control"]) == pytest.approx(2 / 64, abs=1e-4)
    # tied smallest: both at 3 x 2/64 (Holm: the second may not fall below the first)
    assert float(kaiming["p_sign_flip_vs_control_holm"]) == pytest.approx(6 / 64, abs=1e-4)
    init_only = rows["init_only"]
    assert init_only["control"] == "–" and init_only["p_sign_flip_vs_control"] == "–"
    assert float(init_only["p_sign_flip_holm"]) >= float(init_only["p_sign_flip"])
    md = paths["md"].read_text()
    assert "| variant | control | Δ |" in md
    assert f"| moslora_kaiming | init_only | {sum(diffs) / 6:+.2f} |" in md
    assert "| p (t) | p (sign-flip) | p (t, Holm) | p (sign-flip, Holm) | wins/losses |" in md
    row = next(line for line in md.splitlines() if line.startswith("| moslora_kaiming | 6 |"))
    assert f"| {float(kaiming['p_paired_t_holm']):.3f} | {3 * 2 / 64:.3f} | 6/0 |" in row
    assert "Holm-adjusted over these 3 comparisons, the smallest possible is 0.094." in md


def test_variants_become_cfg_options_for_both_towers():
    assert parse_variants("lora, moslora_kaiming,lora") == ["lora", "moslora_kaiming"]
    with pytest.raises(ValueError, match=r"`--variants` .* got 'lora,moslra' \(moslra unknown\)"):
        parse_variants("lora,moslra")
    assert cfg_options("ts_mixing") == [
        f"model.{tower}.{k}={v}"
        for tower in ("llm_lora", "visual_encoder_lora")
        for k, v in (
            ("type", "llava_moslora.moslora.moslora_config"),
            ("mixer_init", "butterfly"),
            ("mixer_trainable", False),
        )
    ]


@pytest.fixture(scope="module")
def tiny_config():
    from mmengine.config import Config

    return Config.fromfile("configs/tiny_moslora.py")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_builds_the_adapter_it_names(variant, tiny_config):
    """The cfg-options, applied as `xtuner train` applies them, build the intended adapter."""
    import copy

    from xtuner.registry import BUILDER

    from llava_moslora.moslora import mixer_options_of
    from llava_moslora.train.launch import parse_cfg_options

    cfg = copy.deepcopy(tiny_config)
    parsed = parse_cfg_options(cfg_options(variant))  # "False" -> False, as on the CLI
    cfg.merge_from_dict(parsed)
    for tower in ("llm_lora", "visual_encoder_lora"):
        config = BUILDER.build(cfg.model[tower])
        options = mixer_options_of(config)
        expected = {
            "lora": (None, False),
            "dora": (None, True),
            "ts_mixing": (("butterfly", False, False), False),
            "moslora_kaiming": (("kaiming", True, False), False),
            "moslora_orthogonal": (("orthogonal", True, False), False),
            "init_only": (("kaiming", False, True), False),
        }[variant]
        got = None if options is None else (options.init, options.learnable, options.init_only)
        assert (got, bool(config.use_dora)) == expected
        assert config.r == cfg.model[tower].r  # the base's rank and targets are kept


def _results(scores: dict[str, list[float]]) -> list[dict]:
    return [
        {"variant": variant, "seed": seed, "score": score, "unit": "% held-out"}
        for variant, values in scores.items()
        for seed, score in enumerate(values)
    ]


def test_report_tables_and_plot(tmp_path):
    from PIL import Image

    from llava_moslora.ablate.report import CSV_COLUMNS, write_report

    results = _results(
        {"lora": [50.0, 52.0, 51.0], "moslora_kaiming": [53.0, 52.0, 55.0], "init_only": [49.0]}
    )
    paths = write_report(results, tmp_path, title="t")
    rows = {row["variant"]: row for row in csv.DictReader(paths["csv"].open())}
    assert list(rows) == ["lora", "moslora_kaiming", "init_only"]
    assert tuple(rows["lora"]) == CSV_COLUMNS
    assert float(rows["moslora_kaiming"]["mean"]) == pytest.approx(160 / 3, abs=1e-4)
    assert float(rows["moslora_kaiming"]["diff_vs_lora"]) == pytest.approx(7 / 3, abs=1e-4)
    assert (rows["moslora_kaiming"]["wins"], rows["moslora_kaiming"]["losses"]) == ("2", "0")
    assert rows["lora"]["diff_vs_lora"] == "–"  # the baseline is not compared with itself
    assert (
        rows["init_only"]["std"] == "–" and rows["init_only"]["diff_vs_lora"] == "-1.0000"
    )  # seed 0: 49 - 50
    md = paths["md"].read_text()
    assert "| moslora_kaiming | 3 | 53.33 ± 1.53 |" in md
    assert "| seed 0 | seed 1 | seed 2 |" in md and "| init_only | 49.00 | – | – |" in md
    assert "With 1 seed(s) the smallest possible sign-flip p-value is 1.000" in md  # init_only
    with Image.open(paths["png"]) as image:
        assert image.size[0] >= 600 and image.size[1] == 450
    with pytest.raises(ValueError, match="no finished runs to report"):
        write_report([], tmp_path)


def test_report_averages_score_parts_and_final_diagnostics_over_seeds(tmp_path):
    """The md's two extra tables: each `details` part and each tower's last logged diagnostics
    (from the jsonl next to the run's checkpoint), averaged over seeds; absent keys are "–"."""
    from llava_moslora.ablate.report import final_diagnostics, write_report
    from llava_moslora.train.diagnostics import JSONL_NAME

    results = _results({"lora": [60.0, 70.0], "moslora_kaiming": [65.0, 75.0]})
    for i, result in enumerate(results):  # lora seeds 0, 1, then moslora_kaiming 0, 1
        result["details"] = {"colour": 0.5 + 0.1 * i, "count": 0.2 * i, "overall": 0.6}
        train = tmp_path / result["variant"] / f"seed_{result['seed']}" / "train"
        train.mkdir(parents=True)
        result["checkpoint"] = str(train / "iter_10.pth")
        rows = []
        for step, scale in ((0, 0.0), (10, 1.0)):  # only the last step counts
            for group, erank in (("llm/q_proj", 2.0), ("llm/v_proj", 4.0), ("vit/fc1", 1.0)):
                row = {"iter": step, "group": group, "delta_erank_mean": scale * (erank + i)}
                if result["variant"] != "lora":  # LoRA has no mixer: no distance logged
                    row["distance_mean"] = scale * 0.1 * (i + 1)
                rows.append(row)
        (train / JSONL_NAME).write_text("".join(json.dumps(row) + "\n" for row in rows))

    assert final_diagnostics(results[3]) == pytest.approx(
        {"llm_erank": 6.0, "llm_distance": 0.4, "vit_erank": 4.0, "vit_distance": 0.4}
    )
    assert final_diagnostics({"checkpoint": str(tmp_path / "none" / "iter_1.pth")}) == {}
    md = write_report(results, tmp_path, title="t")["md"].read_text()
    assert "| variant | colour | count | overall |" in md
    # lora: i = 0, 1 -> colour (0.5 + 0.6) / 2, count (0 + 0.2) / 2
    assert "| lora | 0.550 | 0.100 | 0.600 |" in md
    assert "| moslora_kaiming | 0.750 | 0.500 | 0.600 |" in md
    assert "| variant | llm_erank | vit_erank | llm_distance | vit_distance |" in md
    # lora: llm erank mean of (2, 4) + i -> 3 and 4, over seeds 3.5; vit 1 + i -> 1.5
    assert "| lora | 3.500 | 1.500 | – | – |" in md
    assert "| moslora_kaiming | 5.500 | 3.500 | 0.350 | 0.350 |" in md
    # The same means in the CSV, one column each after the paired test's.
    with open(tmp_path / "ablation.csv", newline="") as f:
        table = {row["variant"]: row for row in csv.DictReader(f)}
    assert list(table["lora"])[-7:] == [
        "part_colour", "part_count", "part_overall",
        "diag_llm_erank", "diag_vit_erank", "diag_llm_distance", "diag_vit_distance",
    ]  # fmt: skip
    assert table["moslora_kaiming"]["part_colour"] == "0.7500"
    assert table["moslora_kaiming"]["diag_vit_distance"] == "0.3500"
    assert table["lora"]["diag_llm_erank"] == "3.5000"
    assert table["lora"]["diag_llm_distance"] == "–"


def test_plan_orders_seeds_outermost_and_evaluator_is_checked(tmp_path):
    from llava_moslora.ablate.runner import parse_evaluator, plan

    runs = plan(tmp_path, ["lora", "init_only"], [3, 4])
    assert [(r.variant, r.seed) for r in runs] == [
        ("lora", 3),
        ("init_only", 3),
        ("lora", 4),
        ("init_only", 4),
    ]
    assert runs[1].dir == tmp_path / "init_only" / "seed_3"
    assert parse_evaluator("suite:tiny") == ("suite", "tiny")
    assert parse_evaluator("heldout:val") == ("heldout", "val")
    for text in ("suit", "heldout:test"):
        with pytest.raises(
            ValueError,
            match=rf"`--eval` should be `heldout`, `heldout:val` or `suite:NAME`.*'{text}'",
        ):
            parse_evaluator(text)


def test_a_work_dir_resumes_only_with_the_settings_it_was_made_with(tmp_path, capsys):
    """Finished runs record their config, `--cfg-options` and evaluator; a resume that passes
    other ones is refused before anything trains, so one report never mixes two settings."""
    from llava_moslora.ablate.runner import plan, settings, train
    from llava_moslora.cli import main

    work = tmp_path / "ablation"
    (run,) = plan(work, ["lora"], [0])
    run.dir.mkdir(parents=True)
    record = {
        "score": 50.0,
        "unit": "% held-out",
        "details": {"overall": 0.5},
        "variant": "lora",
        "seed": 0,
        "checkpoint": str(run.train_dir / "iter_9.pth"),
        "config": "configs/tiny_ablation.py",
        "cfg_options": ["model.llm_lora.r=64"],
        "evaluator": "heldout",
    }
    run.result_path.write_text(json.dumps(record))
    base = ["ablate", "--variants", "lora", "--seeds", "1", "--work-dir", str(work)]
    same = ["--config", str(REPO / "configs" / "tiny_ablation.py")]  # same file, other path

    assert main([*base, *same, "--cfg-options", "model.llm_lora.r=64"]) == 0
    assert (
        (work / "ablation.md")
        .read_text()
        .startswith("# Ablation of tiny_ablation.py with model.llm_lora.r=64\n")
    )
    capsys.readouterr()
    refused = {
        "`--cfg-options` ['model.llm_lora.r=64'] but this command passes []": same,
        "`--eval` 'heldout' but this command passes 'suite:tiny'": [
            *same, "--eval", "suite:tiny", "--cfg-options", "model.llm_lora.r=64",
        ],
        "`--config` 'tiny_ablation.py' but this command passes 'tiny_lora.py'": [
            "--config", str(REPO / "configs" / "tiny_lora.py"),
            "--cfg-options", "model.llm_lora.r=64",
        ],
    }  # fmt: skip
    for message, args in refused.items():
        assert main([*base, *args]) == 1
        error = capsys.readouterr().err
        assert str(run.result_path) in error and message in error
        assert "give these settings their own `--work-dir`" in error
    assert json.loads(run.result_path.read_text()) == record  # nothing was overwritten

    # Trained but not evaluated: the training record is checked the same way.
    run.result_path.unlink()
    marker = run.dir / "trained.json"
    marker.write_text(json.dumps({"checkpoint": "x", **settings("configs/tiny_ablation.py", [])}))
    with pytest.raises(ValueError, match=r"trained.json was made with `--cfg-options` \[\]"):
        train(run, "configs/tiny_ablation.py", extra=["model.llm_lora.r=64"])
    assert marker.is_file()


@pytest.mark.slow
def test_ablate_end_to_end_and_resume(tiny_llava, tmp_path, monkeypatch):
    """2 variants x 2 seeds of the README's ablation (configs/tiny_ablation.py, held-out items)
    through `llava-moslora ablate`, then again: finished runs are not redone."""
    from llava_moslora.cli import main
    from llava_moslora.train.checkpoints import load_trained_state

    # 160 images / batch 8 = 20 iterations per epoch, 3 epochs: a few steps, with a warm-up >= 1.
    # The README's data: two short-answer rounds per image besides the free-form ones.
    tiny = tiny_llava(samples=160, benchmark_rounds=("short", "short"))
    monkeypatch.setenv("LLAVA_MOSLORA_TINY_DIR", str(tiny))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training subprocesses: no oversubscription
    work = tmp_path / "ablation"
    args = [
        "ablate",
        "--config",
        "configs/tiny_ablation.py",
        "--variants",
        "lora,moslora_kaiming",
        "--seeds",
        "2",
        "--work-dir",
        str(work),
    ]
    assert main(args) == 0

    results = {
        (v, s): json.loads((work / v / f"seed_{s}" / "result.json").read_text())
        for v in ("lora", "moslora_kaiming")
        for s in (0, 1)
    }
    for (variant, seed), result in results.items():
        assert (result["variant"], result["seed"]) == (variant, seed)
        details = result["details"]
        assert set(details) == {"colour", "shape", "count", "overall"}  # the config's items
        assert 0 <= result["score"] <= 100
        assert result["score"] == pytest.approx(100 * details["overall"])
        # The variant reached the model: only MoSLoRA checkpoints hold mixers, in both towers.
        state = load_trained_state(result["checkpoint"])
        mixers = {k.split(".")[0] for k in state if "lora_mixer" in k}
        assert mixers == ({"llm", "visual_encoder"} if variant == "moslora_kaiming" else set())
    rows = {row["variant"]: row for row in csv.DictReader((work / "ablation.csv").open())}
    scores = [results["moslora_kaiming", s]["score"] - results["lora", s]["score"] for s in (0, 1)]
    assert float(rows["moslora_kaiming"]["diff_vs_lora"]) == pytest.approx(
        sum(scores) / 2, abs=1e-4
    )
    assert rows["lora"]["n"] == rows["moslora_kaiming"]["n"] == "2"
    assert (work / "ablation.png").is_file() and (work / "ablation.md").is_file()

    # Resume: nothing is trained again, the report is rebuilt from the same results.
    logs = {p: p.stat().st_mtime_ns for p in work.glob("*/seed_*/train.log")}
    assert len(logs) == 4
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    rerun = {row["variant"]: row for row in csv.DictReader((work / "ablation.csv").open())}
    assert rerun == rows


def test_eval_compositional_refuses_a_malformed_cfg_option_before_building(capsys):
    """One parser for every `--cfg-options` of ours: the error names the item and the fix."""
    from llava_moslora.cli import main
    from llava_moslora.train.launch import parse_cfg_options

    assert parse_cfg_options(["model.llm_lora.r=2", "a.b=[1, 2]", "c=False"]) == {
        "model.llm_lora.r": 2,
        "a.b": [1, 2],
        "c": False,
    }
    code = main(["eval-compositional", "configs/tiny_ablation.py", "--cfg-options", "rank2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'rank2'" in err and "KEY=VALUE" in err and "model.llm_lora.r=2" in err


def test_tost_against_student_t_in_closed_form_and_the_90_percent_interval():
    # diffs 1, 2, 3: mean 2, sd 1, se 1/sqrt 3, 2 dof, where Student's cdf is
    # 1/2 + t / (2 sqrt(2 + t^2)); margin 5: t = (2 - 5) sqrt 3 and (2 + 5) sqrt 3
    e = stats.tost_paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0}, 5.0)

    def cdf(t):
        return 0.5 + t / (2 * math.sqrt(2 + t * t))

    expected = max(cdf((2 - 5) * math.sqrt(3)), 1 - cdf((2 + 5) * math.sqrt(3)))
    assert e.p == pytest.approx(expected, rel=1e-9) and e.p == pytest.approx(0.017549, abs=1e-6)
    assert (e.n, e.mean_diff, e.std_diff) == (3, 2.0, 1.0) and e.equivalent
    # equivalence at 5 % <=> the 90 % interval inside the margin: at its edge p is exactly 0.05
    edge = stats.tost_paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0}, e.ci90_high)
    assert edge.p == pytest.approx(0.05, rel=1e-9) and not edge.equivalent
    assert e.ci90_high == pytest.approx(2 + 2.919986 / math.sqrt(3), rel=1e-6)  # t_{.95, 2}
    wide = stats.tost_paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0}, 2.5)
    assert not wide.equivalent and wide.p > 0.05  # a mean of 2 is not shown inside +-2.5
    with pytest.raises(ValueError, match="`margin` should be a positive number"):
        stats.tost_paired({0: 1.0}, {0: 0.0}, 0)


def test_tost_power_is_the_simulated_rejection_rate_and_seeds_needed_the_first_to_reach_80():
    import numpy as np
    from scipy import stats as sp

    rng = np.random.default_rng(0)
    for n, sd, true in ((5, 1.2, 0.0), (20, 5.0, 0.0), (12, 2.0, 1.0)):
        d = rng.normal(true, sd, (40_000, n))
        half = sp.t.ppf(0.95, n - 1) * d.std(1, ddof=1) / math.sqrt(n)
        rate = ((d.mean(1) - half > -3) & (d.mean(1) + half < 3)).mean()
        # 40,000 draws: the simulated rate's standard error is at most 0.0025
        assert stats.tost_power(n, sd, 3.0, true) == pytest.approx(rate, abs=0.01)
    needed = stats.tost_seeds_needed(5.0, 3.0)
    assert stats.tost_power(needed, 5.0, 3.0) >= 0.8 > stats.tost_power(needed - 1, 5.0, 3.0)
    assert needed == 26
    assert stats.tost_seeds_needed(0.0, 3.0) is None


OLD_RESULTS = REPO / "benchmarks" / "results" / "ablation_pretrained_2026-12-03_old_design"


def test_the_committed_old_design_report_gives_the_independently_recomputed_numbers(tmp_path):
    """benchmarks/results/ablation_pretrained (per-seed scores only in ablation.md, 2 decimals):
    issue 29's recomputation, without the project's code, found rank 64's TS-Mixing shared-rate
    p 0.3748 and, over all 20 t-tests, the smallest Holm p 0.66; family A after 28.3-35.6 %."""
    import shutil

    from llava_moslora.ablate import summary

    tables, grids = summary.read_tables(OLD_RESULTS)
    assert [(t.rank, t.setting) for t in tables] == [
        ("r8", "shared"),
        ("r8", "best"),
        ("r64", "shared"),
        ("r64", "best"),
    ]
    assert tables[0].scores["lora"][0] == 45 / 96 * 100  # 46.88 snapped back to 45 of 96 items
    found = summary.comparisons(tables)
    assert len(found) == 20
    by = {(c["rank"], c["setting"], c["variant"], c["control"]): c for c in found}
    assert round(by["r64", "shared", "ts_mixing", "lora"]["p"], 4) == 0.3748
    assert min(c["p_holm_pooled"] for c in found) == pytest.approx(0.6632, abs=1e-4)
    assert by["r8", "best", "ts_mixing", "lora"]["p_holm_table"] == pytest.approx(0.1658, abs=1e-4)
    assert summary.verdict(by["r64", "best", "moslora_kaiming", "lora"]) == "equivalent within ±3"
    assert summary.verdict(by["r8", "best", "ts_mixing", "lora"]).startswith("no difference")
    # The committed summary.md is what the command writes from these files, byte for byte.
    copy = tmp_path / OLD_RESULTS.name
    shutil.copytree(OLD_RESULTS, copy)
    (copy / summary.SUMMARY).unlink()
    text = summary.write_summary(copy).read_text()
    assert text == (OLD_RESULTS / summary.SUMMARY).read_text()
    assert "old design: the grid's seeds 0, 1 are test seeds" in text
    assert "Family A (the old questions) after adaptation: 28.3–35.6 %" in text
    assert "`position` accuracy, variant means: 0.500–0.554" in text


def test_a_report_whose_numbers_do_not_add_up_is_refused_naming_the_file(tmp_path, capsys):
    import shutil

    from llava_moslora.cli import main

    copy = tmp_path / "r"
    shutil.copytree(OLD_RESULTS, copy)
    md = copy / "r8" / "ablation.md"
    md.write_text(md.read_text().replace("| lora | 46.88 | 41.67 |", "| lora | 46.80 | 41.67 |", 1))
    assert main(["ablate-report", str(copy)]) == 1
    assert f"{md}: lora seed 0 scores 46.80, not k/96 of the test items" in capsys.readouterr().err
    md.write_text(md.read_text().replace("| lora | 46.80 | 41.67 |", "| lora | 47.92 | 41.67 |", 1))
    assert main(["ablate-report", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "ablation_shared_lr.csv: lora's mean 42.5000 is not the mean of its per-seed" in err
    assert (copy / "summary.md").read_text() == (OLD_RESULTS / "summary.md").read_text()  # kept
    assert main(["ablate-report", str(tmp_path / "none")]) == 1
    assert "holds no `ablate --lr-grid` report" in capsys.readouterr().err


def test_a_redone_suite_run_scores_its_own_export_never_the_predictions_it_replaces(
    tmp_path, monkeypatch
):
    """`--eval suite:NAME` re-exports a redone run into the same folder: its eval must record that
    export's identity and predict afresh (issue 27's stale predictions, on the ablation's side)."""
    from dataclasses import replace

    import llava_moslora.eval.runner as eval_runner
    import llava_moslora.export as export_package
    from llava_moslora.ablate.runner import Run, evaluate
    from llava_moslora.export.manifest import write_manifest
    from tests.factories import _export_manifest

    run = Run("lora", 0, tmp_path / "lora_seed0")
    weights = {"before": b"old weights", "after": b"new weights"}
    calls = []

    def fake_export(checkpoint, config, fmt, out, **kwargs):  # writes what a real export lists
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter.safetensors").write_bytes(weights[checkpoint.name])
        manifest = _export_manifest("xtuner", tmp_path, merged=False)
        write_manifest(out, replace(manifest, files=("adapter.safetensors",)))

    def fake_run_benchmarks(datasets, **kwargs):
        calls.append(kwargs)
        return {"benchmarks": {datasets[0]: {"score": 50.0}}}

    monkeypatch.setattr(export_package, "export", fake_export)
    monkeypatch.setattr(eval_runner, "run_benchmarks", fake_run_benchmarks)
    for checkpoint in ("before", "after"):
        evaluate(run, tmp_path / checkpoint, "configs/tiny_lora.py", evaluator="suite:tiny")
    assert [c["overwrite"] for c in calls] == [True, True]
    assert [c["export"]["dir"] for c in calls] == [str(run.dir / "export")] * 2
    assert calls[0]["export"]["identity"] != calls[1]["export"]["identity"]


def _tables(seeds: int, kaiming_gain: float, noise: float = 0.25) -> tuple[list, dict]:
    """One rank, both settings: LoRA, Kaiming MoSLoRA (LoRA + `kaiming_gain` + noise) and its
    init-only control (LoRA + small noise), over `seeds` seeds; a grid on seeds 100, 101."""
    from llava_moslora.ablate import summary

    lora = {s: 40.0 + 3 * (s % 4) for s in range(seeds)}
    wobble = {s: (-1) ** s * noise * (1 + s % 3) for s in range(seeds)}
    scores = {
        "lora": lora,
        "moslora_kaiming": {s: x + kaiming_gain + wobble[s] for s, x in lora.items()},
        "init_only": {s: x - wobble[s] for s, x in lora.items()},
    }
    parts = {v: {"overall": 0.5, "count": 0.5, "old_overall": 0.3} for v in scores}
    tables = [summary.Table("r8", setting, scores, parts) for setting in summary.SETTINGS]
    rates = {"0.002": [40.0, 41.0], "0.004": [45.0, 44.0], "0.008": [41.0, 40.0]}
    grid = {v: dict(rates) for v in scores}
    grids = {"r8": {"grid": grid, "chosen": {v: 0.004 for v in scores}, "grid_seeds": [100, 101]}}
    return tables, grids


def test_the_headline_names_what_differs_and_what_is_equivalent_over_many_seeds(tmp_path):
    from llava_moslora.ablate import summary

    tables, grids = _tables(12, kaiming_gain=10.0)
    found = summary.comparisons(tables)
    assert (
        len(found) == 6
    )  # 2 settings x (kaiming vs lora, kaiming vs init-only, init-only vs lora)
    text = " ".join(
        summary._headline(tmp_path, tables, grids, found, summary._placements(grids))[2].split()
    )
    assert (
        "Rank 8, 12 test seeds, rates chosen on grid seeds 100, 101, disjoint from the test seeds"
        in text
    )
    assert "3 of 3 chosen rates interior" in text
    assert "4 differ after Holm over all 6: r8 shared rate moslora_kaiming vs lora +10.00" in text
    assert "shows equivalence for 2 of 6: r8 shared rate init_only vs lora; r8 own rate" in text
    assert '0 are only "no difference detected".' in text and "would need" not in text
    # 12 seeds: the sign-flip test's floor, 2/4096, survives Holm over 6
    assert "could reject" in summary._sign_flip_floor(tables, len(found))


def test_the_headline_over_few_seeds_says_no_difference_detected(tmp_path):
    from llava_moslora.ablate import summary

    tables, grids = _tables(5, kaiming_gain=0.0, noise=4.0)
    grids["r8"]["grid_seeds"] = [0, 1]  # the old design: grid seeds among the test seeds
    found = summary.comparisons(tables)
    text = " ".join(
        summary._headline(tmp_path, tables, grids, found, summary._placements(grids))[2].split()
    )
    assert "rates chosen on test seeds as in the old design" in text
    assert "None differs after Holm over all 6" in text
    assert "would need" in text and "forget family A: 30.0–30.0 % after" in text
    assert "cannot help: over 5 seeds its smallest p is 2/32, 20 x 2/32 >= 0.05" in (
        summary._sign_flip_floor(tables, 20)
    )


RESULTS = REPO / "benchmarks" / "results" / "ablation_pretrained"


def test_the_committed_rerun_regenerates_and_the_docs_quote_its_headline(tmp_path):
    """benchmarks/results/ablation_pretrained (issue 29's rerun): grid and test seeds disjoint, a
    summary.md that `ablate-report` writes byte for byte from the folder's files, and a README
    and docs/ablation.md that quote its generated headline instead of numbers of their own."""
    import shutil

    from llava_moslora.ablate import summary

    tables, grids = summary.read_tables(RESULTS)
    assert {t.rank for t in tables} == {"r8", "r64"}
    for grid in grids.values():
        assert grid["grid_seeds"] == [100, 101]
    seeds = {s for t in tables for by in t.scores.values() for s in by}
    assert seeds == set(range(12))
    copy = tmp_path / RESULTS.name
    shutil.copytree(RESULTS, copy)
    (copy / summary.SUMMARY).unlink()
    text = summary.write_summary(copy).read_text()
    assert text == (RESULTS / summary.SUMMARY).read_text()
    assert "old design" not in text and text.count(": disjoint.") == 2
    quote = summary.headline(text)
    assert "12 test seeds, rates chosen on grid seeds 100, 101, disjoint" in quote
    for doc in (REPO / "README.md", REPO / "docs" / "ablation.md"):
        folded = " ".join(re.sub(r"(?m)^\s*> ?", "", doc.read_text()).split())
        assert quote in folded, f"{doc.name} does not quote summary.md's headline"
    assert "machine.md" in [p.name for p in RESULTS.iterdir()]
