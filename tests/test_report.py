"""Table 5 and Figure 5: layout, MME scaling, missing scores, radar normalisation and the PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from llava_moslora.eval.benchmarks import TINY_MMBENCH_CN, TINY_MMBENCH_EN, TINY_MME
from llava_moslora.eval.report import (
    MISSING,
    draw_radar,
    mmbench_abilities,
    normalise,
    table_rows,
    write_table,
)
from llava_moslora.eval.runner import SUMMARY_NAME

HEADER = [
    "Run", "Config", "Adapter", "Seed", "Scorer",
    "MMBench EN", "MMBench CN", "SEED", "AI2D", "SciQA", "TextVQA", "MathVista", "MM-Vet", "MME",
    "Avg", "Avg over",
]  # fmt: skip
# The paper's Table 5, LLaMA-3 + ViT with LoRA: MME 58.4 is 1635.2 / 28; its Avg is 56.8.
PAPER_LORA = {
    "MMBench_DEV_EN": 72.0, "MMBench_DEV_CN": 67.8, "SEEDBench_IMG": 68.8, "AI2D_TEST": 61.4,
    "ScienceQA_TEST": 74.8, "TextVQA_VAL": 47.1, "MathVista_MINI": 27.7, "MMVet": 33.1,
    "MME": 58.4 * 28,
}  # fmt: skip
ABILITIES = ("CP", "FP-S", "FP-C", "AR", "RR", "LR")


def _fake_run(root: Path, name: str, scores: dict, pending=(), acc: dict | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    benchmarks = {n: {"status": "scored", "score": s} for n, s in scores.items()}
    benchmarks.update({n: {"status": "pending", "score": None} for n in pending})
    for bench, values in (acc or {}).items():
        # The *_acc.csv VLMEvalKit's report_acc writes: split, Overall, the six abilities, ...
        path = run / f"{name}_{bench}_exact_matching_acc.csv"
        path.write_text(
            "split,Overall,"
            + ",".join(ABILITIES)
            + "\n"
            + "dev,0.5,"
            + ",".join(map(str, values))
            + "\n"
        )
        benchmarks[bench] = {"status": "scored", "score": 50.0, "files": [path.name]}
    manifest = {"config": "configs/llama3_lora.py", "adapter_kind": "lora", "seed": 7}
    summary = {
        "run": name,
        "manifest": manifest,
        "judge": None,
        "pending": list(pending),
        "benchmarks": benchmarks,
    }
    (run / SUMMARY_NAME).write_text(json.dumps(summary))
    return run


def test_table5_layout_mme_scaling_and_missing_scores(tmp_path):
    full = _fake_run(tmp_path, "lora", PAPER_LORA)
    partial = {k: v for k, v in PAPER_LORA.items() if k not in ("MathVista_MINI", "MMVet")}
    part = _fake_run(tmp_path, "no_judge", partial, pending=("MathVista_MINI",))
    md_path, csv_path = write_table([full, part], tmp_path / "out" / "table")

    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == HEADER and len(rows) == 2
    assert rows[0]["MME"] == "58.4" and rows[0]["Avg"] == "56.8" and rows[0]["Avg over"] == "9/9"
    assert (rows[0]["Config"], rows[0]["Adapter"], rows[0]["Seed"]) == ("llama3_lora", "LoRA", "7")
    # Missing and pending are "–", never 0; the average of 7 columns is marked, not passed off.
    assert rows[1]["MathVista"] == rows[1]["MM-Vet"] == MISSING
    expected = sum(v / (28 if k == "MME" else 1) for k, v in partial.items()) / 7
    assert rows[1]["Avg"] == f"{expected:.1f}*" and rows[1]["Avg over"] == "7/9"
    assert "pending: MathVista_MINI" in rows[1]["Scorer"]
    md = md_path.read_text()
    assert md.splitlines()[0].startswith("| Run | Config | Adapter | Seed | Scorer | MMBench EN |")
    assert "| – | – |" in md and "average over the benchmarks present only" in md


def test_radar_normalises_each_ability_by_the_best_run(tmp_path):
    assert normalise({"CP": [0.5, 0.25], "LR": [0.0, 0.0]}) == {"CP": [1.0, 0.5], "LR": [0.0, 0.0]}
    runs = [
        _fake_run(tmp_path, "lora", {}, acc={"MMBench_DEV_EN": [0.8, 0.7, 0.6, 0.5, 0.4, 0.3], "MMBench_DEV_CN": [0.7] * 6}),
        _fake_run(tmp_path, "moslora", {}, acc={"MMBench_DEV_EN": [0.9, 0.7, 0.5, 0.6, 0.5, 0.4]}),
    ]  # fmt: skip
    assert mmbench_abilities(runs[1]) == {
        "EN": dict(zip(ABILITIES, [0.9, 0.7, 0.5, 0.6, 0.5, 0.4], strict=True))
    }
    png = draw_radar(runs, tmp_path / "radar.png")
    assert Image.open(png).size == (1200, 600)  # 12 x 6 inches at 100 dpi: EN and CN side by side


def test_report_errors_name_the_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`RUN_DIR` .* has no llava_moslora_results.json"):
        table_rows([tmp_path])
    run = _fake_run(tmp_path, "r", {"MME": 1500.0})
    with pytest.raises(ValueError, match=r"hold no scored MMBench run"):
        draw_radar([run], tmp_path / "x.png")


@pytest.mark.slow
def test_report_and_radar_on_the_offline_runs(tiny_runs, tmp_path, capsys):
    from llava_moslora.cli import main

    runs = [tiny_runs["work"] / name for name in ("oracle", "constant", "tiny_llava")]
    out = tmp_path / "tiny_table"
    assert (
        main(["report", *map(str, runs), "--out", str(out), "--radar", str(tmp_path / "r.png")])
        == 0
    )
    rows = {row["Run"]: row for row in csv.DictReader(out.with_suffix(".csv").open())}
    assert list(rows) == ["oracle", "constant", "tiny_llava"]
    oracle, constant = rows["oracle"], rows["constant"]
    assert (oracle["MMBench EN"], oracle["MMBench CN"], oracle["TextVQA"]) == (
        "100.0",
        "100.0",
        "100.0",
    )
    assert oracle["MME"] == f"{800 / 28:.1f}" and constant["MME"] == f"{200 / 28:.1f}"
    assert constant["MMBench EN"] == "0.0"  # a real zero is shown as one
    for column in ("SEED", "AI2D", "SciQA", "MathVista", "MM-Vet"):
        assert oracle[column] == MISSING  # not in the tiny suite
    assert oracle["Avg over"] == "4/9" and oracle["Avg"].endswith("*")
    assert (
        oracle["Adapter"] == "MoSLoRA"
        and oracle["Seed"] == "0"
        and oracle["Scorer"] == "exact matching"
    )
    assert "wrote" in capsys.readouterr().out

    assert Image.open(tmp_path / "r.png").size == (1200, 600)
    abilities = mmbench_abilities(runs[0])
    assert set(abilities) == {"EN", "CN"} and abilities["EN"] == dict.fromkeys(ABILITIES, 1.0)
    summary = tiny_runs["summaries"]["tiny_llava"]["benchmarks"]
    # The radar reads VLMEvalKit's own acc files, which agree with the summary's abilities.
    tiny = mmbench_abilities(runs[2])
    for bench, lang in ((TINY_MMBENCH_EN, "EN"), (TINY_MMBENCH_CN, "CN")):
        assert {a: 100 * v for a, v in tiny[lang].items()} == pytest.approx(
            summary[bench]["abilities"]
        )
    assert summary[TINY_MME]["status"] == "scored"


def test_cli_rejects_an_unknown_dataset(tmp_path, capsys):
    from llava_moslora.cli import main

    assert main(["eval", str(tmp_path), "--datasets", "MMBench_DEV_FR"]) == 2
    err = capsys.readouterr().err
    assert "`--datasets` has 'MMBench_DEV_FR'" in err and "MMBench_DEV_EN" in err


def test_chance_of_the_tiny_benchmarks_from_first_principles(tmp_path):
    """A uniform random guesser on the tiny TSVs: circular MCQ (1/n)^n per question (the six
    abilities have 4, 3, 4, 2, 3, 2 options), MME acc 50 + acc+ 25 in each of its 4 categories,
    short answers one over 4 colours / 3 shapes / 4 counts."""
    from llava_moslora.eval.tiny_bench import chance_scores, write_tiny_bench

    write_tiny_bench(tmp_path, per_category=3)
    mcq = sum((1 / n) ** n for n in (4, 3, 4, 2, 3, 2)) / 6 * 100
    expected = {
        "MMBench EN": mcq,
        "MMBench CN": mcq,
        "MME": 4 * 75 / 28,
        "TextVQA": 100 * (1 / 4 + 1 / 3 + 1 / 4) / 3,
    }
    assert chance_scores(tmp_path) == pytest.approx(expected, rel=1e-12)


def test_report_shows_chance_as_a_last_row_and_each_score_against_it(tmp_path):
    from llava_moslora.eval.report import versus_chance

    run = _fake_run(tmp_path, "lora", {TINY_MME: 600.0, "TinyShapes_TextVQA": 55.5})
    chance = {"MME": 300 / 28, "TextVQA": 27.75, "MMBench EN": 9.7}
    md, csv_path = write_table([run], tmp_path / "table", chance)
    rows = {row["Run"]: row for row in csv.DictReader(csv_path.open())}
    assert list(rows) == ["lora", "chance"]
    assert rows["chance"]["MME"] == "10.7" and rows["chance"]["TextVQA"] == "27.8"
    assert rows["chance"]["MMBench EN"] == "9.7" and rows["chance"]["SEED"] == MISSING
    assert rows["chance"]["Avg"] == MISSING  # a guesser's average is not a run's
    assert "| chance | – | – | – | – | 9.7 |" in md.read_text()
    assert versus_chance([run], chance) == [
        "lora: TextVQA 55.5 (chance 27.8, 2.0x); MME 21.4 (chance 10.7, 2.0x)"
    ]


def test_eval_data_root_becomes_vlmevalkits_lmudata(tmp_path, monkeypatch, capsys):
    """`--data-root` must set $LMUData (VLMEvalKit's spelling); it once set $LMUDATA, which
    VLMEvalKit ignores, so the tiny suite silently ran from ~/LMUData."""
    import os

    from llava_moslora.cli import main

    monkeypatch.setenv("LMUData", "unset")  # restored (to unset, if it was) after the test
    monkeypatch.delenv("LMUData")
    root = tmp_path / "bench"
    args = ["--suite", "tiny", "--data-root", str(root), "--create-data-root"]
    code = main(["eval", str(tmp_path / "no_export"), *args])
    assert code == 2 and "no_export" in capsys.readouterr().err  # stops at the missing export
    assert os.environ["LMUData"] == str(root.resolve())  # noqa: SIM112 (VLMEvalKit's spelling)


# ----------------------------------------------------------------------------- hostile inputs
def test_eval_refuses_a_data_root_that_does_not_exist_unless_asked_to_create_it(
    tmp_path, monkeypatch, capsys
):
    """A mistyped `--data-root` once got a fresh tiny benchmark written there, and scored."""
    from llava_moslora.cli import main

    monkeypatch.delenv("LMUData", raising=False)
    typo = tmp_path / "bnech"
    code = main(["eval", str(tmp_path / "no_export"), "--suite", "tiny", "--data-root", str(typo)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"`--data-root` {str(typo)!r} is not a folder" in err and "--create-data-root" in err
    assert not typo.exists()


def test_report_refuses_an_entry_that_is_not_an_object_naming_file_and_entry(tmp_path):
    run = _fake_run(tmp_path, "r", {"MME": 1500.0})
    summary = json.loads((run / SUMMARY_NAME).read_text())
    summary["benchmarks"]["TextVQA_VAL"] = 55.0  # a score where the entry object should be
    (run / SUMMARY_NAME).write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=rf"{run / SUMMARY_NAME}: the entry 'TextVQA_VAL' is 55.0"):
        write_table([run], tmp_path / "table")
    assert not (tmp_path / "table.md").exists()


def test_report_escapes_a_run_name_holding_a_pipe_or_a_line_break(tmp_path):
    run = _fake_run(tmp_path, "r", {"MME": 1400.0})
    summary = json.loads((run / SUMMARY_NAME).read_text())
    summary["run"] = "lora | seed 1\nrerun"
    (run / SUMMARY_NAME).write_text(json.dumps(summary))
    md, csv_path = write_table([run], tmp_path / "table")
    lines = md.read_text().splitlines()
    header, row = lines[0], lines[2]
    assert row.startswith("| lora \\| seed 1 rerun | llama3_lora |")
    # as many cells as the header: the name did not open a column or a row of its own
    assert row.replace("\\|", "").count("|") == header.count("|")
    assert lines[3] == "" and next(csv.DictReader(csv_path.open()))["Run"] == summary["run"]


def test_radar_refuses_an_ability_that_is_nan(tmp_path):
    run = _fake_run(tmp_path, "r", {}, acc={"MMBench_DEV_EN": [0.5] * 6})
    acc = next(run.glob("*_acc.csv"))
    acc.write_text(acc.read_text().replace("dev,0.5,0.5,", "dev,0.5,nan,"))
    with pytest.raises(ValueError, match=rf"{acc}: ability CP is nan, not an accuracy from 0 to 1"):
        mmbench_abilities(run)
    with pytest.raises(ValueError, match=r"ability CP is nan"):
        draw_radar([run], tmp_path / "radar.png")
    assert not (tmp_path / "radar.png").exists()


def test_report_out_with_a_suffix_of_its_own_never_overwrites_another_file(tmp_path):
    run = _fake_run(tmp_path, "r", {"MME": 1400.0})
    mine = tmp_path / "x.md"
    mine.write_text("the user's notes\n")
    md, csv_path = write_table([run], tmp_path / "x.v2")
    assert (md.name, csv_path.name) == ("x.v2.md", "x.v2.csv")
    assert mine.read_text() == "the user's notes\n"
    assert write_table([run], tmp_path / "t.md") == (tmp_path / "t.md", tmp_path / "t.csv")


def test_the_radar_reads_a_run_named_like_a_glob_by_its_literal_name(tmp_path):
    """An older results file lists no acc files, so the radar finds them by the run's name: taken
    literally, "exp[1]" must not read the "exp1_..." file that a glob would match."""
    run = _fake_run(tmp_path, "exp[1]", {}, acc={"MMBench_DEV_EN": [0.5] * 6})
    summary = json.loads((run / SUMMARY_NAME).read_text())
    del summary["benchmarks"]["MMBench_DEV_EN"]["files"]
    (run / SUMMARY_NAME).write_text(json.dumps(summary))
    own = next(run.glob("*_acc.csv"))
    other = run / own.name.replace("exp[1]", "exp1")
    other.write_text(own.read_text().replace("dev,0.5,0.5,", "dev,0.5,0.9,"))
    own.unlink()
    with pytest.raises(FileNotFoundError, match="MMBench_DEV_EN is scored but its VLMEvalKit"):
        mmbench_abilities(run)
