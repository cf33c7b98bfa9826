"""Scores you can cite: a run folder never mixes two exports, every score carries its protocol,
MMBench V1.1 test is scored locally from the user's TSV (never re-downloaded), TextVQA can be
asked with LLaVA-1.5's OCR-token prompt, and `report` shows who scored what."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from llava_moslora.eval.benchmarks import BENCHMARKS, TINY_TEXTVQA
from llava_moslora.eval.runner import SUMMARY_NAME
from llava_moslora.eval.tiny_bench import CIRCULAR_OFFSET, write_tiny_bench


def _predictions(run_dir: Path, run: str, name: str) -> list[str]:
    return [str(p) for p in pd.read_excel(run_dir / f"{run}_{name}.xlsx")["prediction"]]


# ----------------------------------------------------------------------------- 1. one export per folder
@pytest.mark.slow  # three tiny-LLaVA evaluations through VLMEvalKit
def test_a_re_exported_model_is_scored_on_its_own_predictions(tiny_exports, tmp_path, capsys):
    """Retrain -> re-export into the same folder -> eval into the same run: the old model's
    predictions were once picked up again (0 questions asked, the old score, exit 0)."""
    from safetensors.torch import load_file, save_file

    from llava_moslora.cli import main

    export = tmp_path / "export_moslora"
    shutil.copytree(tiny_exports["xtuner"], export)
    bench = tmp_path / "bench"
    write_tiny_bench(bench, per_category=1)
    work = tmp_path / "eval"
    args = ["--suite", "tiny", "--datasets", TINY_TEXTVQA, "--data-root", str(bench)]
    args += ["--work-dir", str(work), "--short-max-new-tokens", "6"]
    assert main(["eval", str(export), *args]) == 0
    run_dir = work / "export_moslora"
    first = _predictions(run_dir, "export_moslora", TINY_TEXTVQA)
    old = json.loads((run_dir / SUMMARY_NAME).read_text())
    (run_dir / "notes.txt").write_text("the user's notes\n")

    # "retrain": the same export folder, other adapter weights (the manifest is unchanged)
    weights = export / "llm_adapter" / "adapter_model.safetensors"
    tensors = {k: (-4 * v if "lora_B" in k else v) for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    capsys.readouterr()

    assert main(["eval", str(export), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run_dir} holds predictions of the export" in err
    assert old["export"]["identity"][:19] in err and "--overwrite" in err and "--reuse" in err

    assert main(["eval", str(export), *args, "--overwrite"]) == 0
    new = json.loads((run_dir / SUMMARY_NAME).read_text())
    assert main(["eval", str(export), *args, "--run-name", "fresh"]) == 0
    fresh = json.loads((work / "fresh" / SUMMARY_NAME).read_text())
    overwritten = _predictions(run_dir, "export_moslora", TINY_TEXTVQA)
    assert overwritten == _predictions(work / "fresh", "fresh", TINY_TEXTVQA)
    assert (
        overwritten != first
    )  # the new model answers otherwise: the equality above means something
    assert new["benchmarks"][TINY_TEXTVQA]["score"] == fresh["benchmarks"][TINY_TEXTVQA]["score"]
    assert new["export"]["identity"] == fresh["export"]["identity"] != old["export"]["identity"]
    assert (run_dir / "notes.txt").read_text() == "the user's notes\n"  # not eval's: kept

    # 2. the protocol of the score, recorded with it
    protocol = new["benchmarks"][TINY_TEXTVQA]["protocol"]
    tsv = bench / f"{TINY_TEXTVQA}.tsv"
    import hashlib

    assert protocol["data"] == {
        "version": "TinyShapes (synthetic)",
        "file": tsv.name,
        "md5": hashlib.md5(tsv.read_bytes()).hexdigest(),
        "listed_md5": None,
    }
    assert protocol["scorer"] == "exact matching"
    assert protocol["prompt"] == "LLaVA-1.5 short answer (a single word or phrase)"
    assert protocol["decoding"]["short_max_new_tokens"] == 6
    assert protocol["decoding"]["do_sample"] is False
    assert re.fullmatch(r"ms-vlmeval \d+\.\d+\.\d+", protocol["vlmevalkit_scoring"])

    # --reuse: the user vouches for the predictions; the folder records whose they were
    # the same tensors saved again: another file, so another identity
    save_file(load_file(weights), weights, metadata={"format": "pt", "saved": "again"})
    assert main(["eval", str(export), *args, "--reuse"]) == 0
    reused = json.loads((run_dir / SUMMARY_NAME).read_text())
    assert reused["reused_predictions_of"]["identity"] == new["export"]["identity"]
    assert _predictions(run_dir, "export_moslora", TINY_TEXTVQA) == overwritten


def test_overwrite_removes_only_what_eval_wrote_and_refuses_unrecorded_files(tmp_path):
    from llava_moslora.eval.runner import RunFolderError, claim_run_dir

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "r_MME.xlsx").write_bytes(b"predictions")
    with pytest.raises(RunFolderError, match=r"holds r_MME.xlsx but no llava_moslora_results"):
        claim_run_dir(run_dir, "r", {"dir": "x", "identity": "sha256:1"}, overwrite=True)
    with pytest.raises(RunFolderError, match=r"predictions of an export whose identity was not"):
        claim_run_dir(run_dir, "r", {"dir": "x", "identity": "sha256:1"})
    summary = {
        "export": {"dir": "a", "identity": "sha256:a"},
        "written": ["r_MME.xlsx", "r_MME_score.csv", "../outside.txt"],
        "benchmarks": {"MME": {"status": "scored", "files": ["r_MME.xlsx"]}},
    }
    (run_dir / SUMMARY_NAME).write_text(json.dumps(summary))
    (run_dir / "r_MME_score.csv").write_text("s")
    (run_dir / "r_MME_mine.csv").write_text("the user's")  # named like VLMEvalKit's, not listed
    (tmp_path / "outside.txt").write_text("outside")
    same = claim_run_dir(run_dir, "r", {"dir": "b", "identity": "sha256:a"})
    assert same["benchmarks"] == summary["benchmarks"]  # the same export resumes
    assert claim_run_dir(run_dir, "r", {"dir": "b", "identity": "sha256:b"}, overwrite=True) == {
        "benchmarks": {}
    }
    assert sorted(p.name for p in run_dir.iterdir()) == ["r_MME_mine.csv"]
    assert (tmp_path / "outside.txt").read_text() == "outside"


# ----------------------------------------------------------------------------- 3. MMBench V1.1 test
# One question per L2 ability: (ability, question, options, the right one). The test double
# below picks the first option (in letter order) named in the question, so it is right in every
# rotation of all but the logic question, where it is right only while "bird" comes first.
V11_QUESTIONS = (
    ("coarse_perception", "Pick cat", ["cat", "dog"], "cat"),
    ("finegrained_perception (instance-level)", "Pick red", ["red", "blue", "green"], "red"),
    ("finegrained_perception (cross-instance)", "Pick two", ["one", "two"], "two"),
    ("attribute_reasoning", "Pick warm", ["warm", "cold"], "warm"),
    ("relation_reasoning", "Pick left", ["right", "left", "up"], "left"),
    ("logic_reasoning", "Pick bird over fish", ["bird", "fish"], "bird"),
)


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_v11_tsv(path: Path) -> None:
    """An MMBench_TEST_EN_V11.tsv of our own in MMBench's layout (circular rotations at
    index + k * 1e6, the image stored once per question)."""
    rows = []
    for index, (ability, question, options, right) in enumerate(V11_QUESTIONS):
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            row = {
                "index": index + k * CIRCULAR_OFFSET,
                "question": question,
                "hint": None,
                "answer": "ABCD"[rotated.index(right)],
                "category": ability,
                "l2-category": ability,
                "split": "test",
                "image": _png() if k == 0 else str(index),
            }
            row.update({"ABCD"[i]: text for i, text in enumerate(rotated)})
            rows.append(row)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def keyword_picker():
    from llava_moslora.eval import import_vlmeval

    class KeywordPicker(import_vlmeval("vlmeval.vlm.base").BaseModel):
        def generate_inner(self, message, dataset=None):
            prompt = next(m["value"] for m in message if m["type"] == "text")
            question = re.search(r"Question: (.*)", prompt)[1].split()
            options = re.findall(r"^([A-D])\. (.*)$", prompt, re.M)
            return next(letter for letter, text in options if text.strip() in question)

    return KeywordPicker()


@pytest.mark.slow  # VLMEvalKit's circular scoring of 15 rows, offline
def test_mmbench_v11_test_is_scored_locally_from_the_users_tsv_labelled_v11(tmp_path, monkeypatch):
    from vlmeval.smp import md5

    from llava_moslora.eval.offline import listed_tsv
    from llava_moslora.eval.report import draw_radar, mmbench_abilities, write_table
    from llava_moslora.eval.runner import run_benchmarks

    lmu = tmp_path / "LMUData"
    lmu.mkdir()
    tsv = lmu / "MMBench_TEST_EN_V11.tsv"
    write_v11_tsv(tsv)
    ours, listed = md5(str(tsv)), listed_tsv("MMBench_TEST_EN_V11")[2]
    assert listed and ours != listed  # VLMEvalKit would re-download over it
    monkeypatch.setenv("LMUData", str(lmu))
    logged = []
    summary = run_benchmarks(
        ["MMBench_TEST_EN_V11"],
        work_dir=tmp_path / "runs",
        run_name="picker",
        model=keyword_picker(),
        offline=True,
        log=logged.append,
    )  # fmt: skip  (offline: any download attempt would raise)
    warnings = [line for line in logged if line.startswith("warning:")]
    assert len(warnings) == 1 and ours in warnings[0] and listed in warnings[0]
    assert md5(str(tsv)) == ours  # the user's file, as it was

    entry = summary["benchmarks"]["MMBench_TEST_EN_V11"]
    # Circular: a question counts only if every rotation is right; the logic one fails once.
    assert entry["score"] == pytest.approx(100 * 5 / 6)
    assert entry["abilities"] == {"CP": 100.0, "FP-S": 100.0, "FP-C": 100.0, "AR": 100.0,
                                  "RR": 100.0, "LR": 0.0}  # fmt: skip
    assert entry["protocol"]["data"] == {
        "version": "MMBench V1.1 test", "file": tsv.name, "md5": ours, "listed_md5": listed,
    }  # fmt: skip
    assert entry["column"] == "MMBench EN V1.1 test"

    run = tmp_path / "runs" / "picker"
    md, csv_path = write_table([run], tmp_path / "table")
    row = pd.read_csv(csv_path).iloc[0]
    assert row["MMBench EN V1.1 test"] == pytest.approx(83.3) and row["MMBench EN"] == "–"
    assert row["Avg"] == "–" and row["Avg over"] == "0/9"  # V1.1 test is not in Table 5's mean
    text = md.read_text()
    assert "| MMBench EN V1.1 test |" in text.splitlines()[0]
    assert f"MMBench_TEST_EN_V11 (MMBench V1.1 test; md5 {ours}, not VLMEvalKit's listed" in text
    assert mmbench_abilities(run, "V1.1 test")["EN"]["LR"] == 0.0
    assert mmbench_abilities(run) == {}  # the dev radar (the default) has nothing of it
    with pytest.raises(ValueError, match=r"no scored MMBench run of the dev split"):
        draw_radar([run], tmp_path / "dev.png")
    assert draw_radar([run], tmp_path / "v11.png", split="v11-test").is_file()


# ----------------------------------------------------------------------------- 4. TextVQA, LLaVA's way
def _llava_jsonl(path: Path, questions: list[str]) -> list[str]:
    prompts = [
        f"{q}\nReference OCR token: STOP, {i}, Main St\nAnswer the question using a single word "
        "or phrase."
        for i, q in enumerate(questions)
    ]
    path.write_text(
        "".join(json.dumps({"question_id": 34602 + i, "image": f"{i}.jpg", "text": p}) + "\n"
                for i, p in enumerate(prompts))
    )  # fmt: skip
    return prompts


@pytest.mark.slow  # the tiny LLaVA through VLMEvalKit on 3 questions
def test_textvqa_with_llavas_ocr_prompt_is_asked_verbatim_and_recorded(
    tiny_exports, tmp_path, monkeypatch
):
    from vlmeval.smp import md5

    from llava_moslora.eval.model import GenerationSettings, LLaVAMoSLoRA
    from llava_moslora.eval.runner import run_benchmarks

    lmu = tmp_path / "LMUData"
    write_tiny_bench(lmu, per_category=1)
    # TextVQA_VAL.tsv of our own: the tiny TextVQA rows under the real name (another md5)
    shutil.copy(lmu / f"{TINY_TEXTVQA}.tsv", lmu / "TextVQA_VAL.tsv")
    questions = list(pd.read_csv(lmu / "TextVQA_VAL.tsv", sep="\t")["question"])
    ocr = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    prompts = _llava_jsonl(ocr, questions)
    monkeypatch.setenv("LMUData", str(lmu))
    settings = GenerationSettings(short_max_new_tokens=4)
    model = LLaVAMoSLoRA(tiny_exports["xtuner"], generation=settings)
    summary = run_benchmarks(
        ["TextVQA_VAL"], work_dir=tmp_path / "runs", run_name="ocr", model=model,
        generation=settings.as_dict(), offline=True, textvqa_ocr=ocr, log=lambda _: None,
    )  # fmt: skip
    frame = pd.read_excel(tmp_path / "runs" / "ocr" / "ocr_TextVQA_VAL.xlsx")
    assert list(frame["llava_prompt"]) == prompts  # each row got its own prompt, in order
    line = frame.iloc[1].to_dict() | {"image": base64.b64encode(b"").decode()}
    model.dump_image = lambda line, dataset: ["x.png"]
    message = model.build_prompt(pd.Series(line), "TextVQA_VAL")
    assert message[-1] == {"type": "text", "value": prompts[1]}  # verbatim, nothing added
    del model.dump_image  # the class's again
    protocol = summary["benchmarks"]["TextVQA_VAL"]["protocol"]
    assert "reference OCR tokens" in protocol["prompt"] and md5(str(ocr)) in protocol["prompt"]

    # Without the option the same benchmark is asked with LLaVA-1.5's plain prompt, recorded
    # as another protocol: the report marks the column.
    run_benchmarks(
        ["TextVQA_VAL"], work_dir=tmp_path / "runs", run_name="plain", model=model,
        generation=settings.as_dict(), offline=True, log=lambda _: None,
    )  # fmt: skip
    from llava_moslora.eval.report import write_table

    md, _ = write_table([tmp_path / "runs" / "ocr", tmp_path / "runs" / "plain"], tmp_path / "t")
    text = md.read_text()
    assert "| TextVQA† |" in text.splitlines()[0]
    assert "- TextVQA† (rows differ in protocol, not comparable):" in text

    _llava_jsonl(ocr, questions[:1])  # a file of another split: a question without its prompt
    with pytest.raises(ValueError, match=rf"{ocr.name}' has no prompt for question 1 \("):
        run_benchmarks(
            ["TextVQA_VAL"], work_dir=tmp_path / "runs", run_name="other", model=model,
            offline=True, textvqa_ocr=ocr, log=lambda _: None,
        )  # fmt: skip


# ----------------------------------------------------------------------------- the report's scorer
def _run(root: Path, name: str, scorers: dict[str, str]) -> Path:
    run = root / name
    run.mkdir()
    benchmarks = {
        bench: {"status": "scored", "score": 50.0, "protocol": {"scorer": scorer}}
        for bench, scorer in scorers.items()
    }
    (run / SUMMARY_NAME).write_text(json.dumps({"run": name, "benchmarks": benchmarks}))
    return run


def test_the_table_shows_the_scorer_of_each_benchmark_not_the_last_calls(tmp_path):
    """eval without a judge, then --score-only with one for MathVista and MM-Vet: the row once
    said "VLMEvalKit default" although seven benchmarks were scored by exact matching."""
    from llava_moslora.eval.report import write_table

    exact = {b: "exact matching" for b in ("MMBench_DEV_EN", "SEEDBench_IMG", "MME")}
    judged = {"MathVista_MINI": "gpt-4o-mini (judge at api.openai.com)", "MMVet": "gpt-4-turbo"}
    run = _run(tmp_path, "moslora", exact | judged)
    other = _run(tmp_path, "lora", exact | {"MathVista_MINI": "exact matching"})
    md, csv_path = write_table([run, other], tmp_path / "table")
    rows = {r["Run"]: r for r in pd.read_csv(csv_path).to_dict("records")}
    assert rows["moslora"]["Scorer"] == (
        "exact matching; MathVista: gpt-4o-mini (judge at api.openai.com); MM-Vet: gpt-4-turbo"
    )
    assert rows["lora"]["Scorer"] == "exact matching"
    header = md.read_text().splitlines()[0]
    assert "| MathVista† |" in header and "| MMBench EN |" in header  # only MathVista differs
    assert BENCHMARKS["MathVista_MINI"].column == "MathVista"


# ----------------------------------------------------------------------------- a new benchmark
@pytest.mark.slow  # VLMEvalKit's multiple-choice scoring of 4 rows, offline
def test_a_benchmark_is_one_entry(tmp_path, monkeypatch):
    """A throwaway benchmark: one `Benchmark` entry and a line in a suite file; the runner, the
    report and the protocol notes need nothing else."""
    from llava_moslora.eval import benchmarks
    from llava_moslora.eval.benchmarks import MCQ, Benchmark, resolve_datasets
    from llava_moslora.eval.report import write_table
    from llava_moslora.eval.runner import run_benchmarks

    name = "Throwaway_Shapes"
    entry = Benchmark(name, MCQ, "Shapes", "throwaway v0", vlmeval_class="CustomMCQDataset")
    monkeypatch.setitem(benchmarks.BENCHMARKS, name, entry)
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "mine.txt").write_text(f"# a suite of one\n{name}\n")
    monkeypatch.setattr(benchmarks, "SUITES_DIR", suites)
    assert resolve_datasets("mine") == [name]

    lmu = tmp_path / "LMUData"
    lmu.mkdir()
    rows = [  # not circular: plain accuracy; the picker misses the last one ("fish" first)
        {"index": i, "question": q, "A": a, "B": b, "answer": ans, "image": _png()}
        for i, (q, a, b, ans) in enumerate(
            [("Pick cat", "cat", "dog", "A"), ("Pick red", "blue", "red", "B"),
             ("Pick two", "two", "one", "A"), ("Pick bird over fish", "fish", "bird", "B")]
        )
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(lmu / f"{name}.tsv", sep="\t", index=False)
    monkeypatch.setenv("LMUData", str(lmu))
    summary = run_benchmarks(
        resolve_datasets("mine"), work_dir=tmp_path / "runs", run_name="picker",
        model=keyword_picker(), offline=True, log=lambda _: None,
    )  # fmt: skip
    assert summary["benchmarks"][name]["score"] == 75.0
    md, csv_path = write_table([tmp_path / "runs" / "picker"], tmp_path / "table")
    assert pd.read_csv(csv_path).iloc[0]["Shapes"] == 75.0
    assert f"- Shapes: {name} (throwaway v0; md5 " in md.read_text()


def test_a_judge_that_does_not_answer_is_an_error_not_a_silent_exact_match(tmp_path, monkeypatch):
    """VLMEvalKit scores by exact matching, with a warning only, when its judge does not answer;
    the results would then name a judge that scored nothing."""
    from vlmeval.dataset import utils as vlmeval_utils

    from llava_moslora.eval.benchmarks import TINY_MMBENCH_EN
    from llava_moslora.eval.runner import resolve_judge, run_benchmarks
    from tests.factories import make_constant

    asked = []

    class SilentJudge:
        def working(self):
            return False

    def build_judge(**kwargs):
        asked.append(kwargs)
        return SilentJudge()

    monkeypatch.setattr(vlmeval_utils, "build_judge", build_judge)
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    lmu = tmp_path / "LMUData"
    write_tiny_bench(lmu, per_category=1)
    monkeypatch.setenv("LMUData", str(lmu))
    judge = resolve_judge("qwen-72b", "http://judge.invalid:8000/v1", "JUDGE_KEY")
    with pytest.raises(ValueError, match=r"the judge 'qwen-72b' at judge.invalid did not answer"):
        run_benchmarks(
            [TINY_MMBENCH_EN], work_dir=tmp_path / "runs", run_name="c", model=make_constant(),
            judge=judge, log=lambda _: None,
        )  # fmt: skip
    assert asked[0]["model"] == "qwen-72b" and asked[0]["key"] == "sk-test"
    assert not (tmp_path / "runs" / "c" / SUMMARY_NAME).exists()  # nothing recorded as scored
