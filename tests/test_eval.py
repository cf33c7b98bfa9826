"""Evaluation: the VLMEvalKit model class on every export layout, and the offline suite run
end to end through VLMEvalKit's own dataset classes and scoring, with the network refused."""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
import torch

from llava_moslora.eval import benchmarks
from llava_moslora.eval.benchmarks import (
    TINY,
    TINY_MMBENCH_CN,
    TINY_MMBENCH_EN,
    TINY_MME,
    TINY_TEXTVQA,
    TINY_TYPE,
    resolve_datasets,
)
from llava_moslora.eval.manifest import read_export_manifest
from llava_moslora.eval.runner import resolve_judge
from llava_moslora.eval.tiny_bench import CIRCULAR_OFFSET
from tests.factories import make_constant

QUESTION = "What colour are the shapes?"


# ----------------------------------------------------------------------------- user-input errors
def test_unknown_dataset_is_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match=r"`--datasets` has 'MMBench_DEV_FR'.*MMBench_DEV_EN, "):
        resolve_datasets("paper9", "MME,MMBench_DEV_FR")
    with pytest.raises(ValueError, match=r"`--suite` should be one of \['paper9', 'tiny'\]"):
        resolve_datasets("paper10")
    assert resolve_datasets("paper9", "MME, MMVet,MME") == ["MME", "MMVet"]
    assert len(resolve_datasets("paper9")) == 11  # 9 benchmarks; MMBench as dev + test, EN + CN


def test_judge_comes_from_flags_or_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    assert resolve_judge() is None
    with pytest.raises(ValueError, match=r"`--judge-api-key-env` is 'MY_KEY', but \$MY_KEY is not"):
        resolve_judge("qwen-72b", "http://judge:8000/v1", "MY_KEY")
    with pytest.raises(ValueError, match=r"without `--judge-model`"):
        resolve_judge(None, "http://judge:8000/v1")
    monkeypatch.setenv("MY_KEY", "sk-secret")
    judge = resolve_judge("qwen-72b", "http://judge:8000/v1/", "MY_KEY")
    assert judge.kwargs_for("MMVet") == {
        "model": "qwen-72b",
        "key": "sk-secret",
        "api_base": "http://judge:8000/v1/chat/completions",
    }
    assert "sk-secret" not in json.dumps(judge.record())
    assert judge.host() == "judge"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    env_judge = resolve_judge()
    # VLMEvalKit's run.py defaults: MathVista gpt-4o-mini, MM-Vet gpt-4-turbo.
    assert (env_judge.model_for("MathVista_MINI"), env_judge.model_for("MMVet")) == (
        "gpt-4o-mini",
        "gpt-4-turbo",
    )


def test_manifest_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no llava_moslora_export.json"):
        read_export_manifest(tmp_path)
    fields = dict(
        format="onnx", llm=None, visual_encoder=None, prompt_template="llama3_chat", system="",
        visual_select_layer=-2, pad_image_to_square=True, adapter_kind="moslora", mixer={},
        quantized_base=False, dtype="float32", config="c.py", checkpoint="x.pth", seed=0,
        trust_remote_code=False,
    )  # fmt: skip
    (tmp_path / "llava_moslora_export.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"`format` should be one of .*'onnx'"):
        read_export_manifest(tmp_path)


def test_offline_names_are_unknown_to_vlmevalkit_and_classes_score_them():
    """A known name would trigger VLMEvalKit's md5 check and a download."""
    import vlmeval.dataset as vd
    from vlmeval.dataset.utils.multiple_choice import MMB_abbrs

    for name in TINY:
        assert name not in vd.SUPPORTED_DATASETS
        assert TINY_TYPE[name] == getattr(vd, benchmarks.BENCHMARKS[name].vlmeval_class).TYPE
    # Our ability table matches the abbreviations VLMEvalKit writes into *_acc.csv.
    assert {full: abbr for full, abbr, _ in benchmarks.MMBENCH_ABILITIES} == MMB_abbrs


# ----------------------------------------------------------------------------- export layouts
# `tiny_exports` and `tiny_runs` (below) are session fixtures of tests/factories.py, shared with
# test_report.py.
def _last_logits(model, image) -> torch.Tensor:
    with torch.no_grad():
        return model.llm(**model.prepare_inputs(QUESTION, str(image))).logits[0, -1]


def test_every_export_layout_gives_the_same_answers(tiny_exports):
    from llava_moslora.eval.model import GenerationSettings, LLaVAMoSLoRA

    settings = GenerationSettings(max_new_tokens=6, short_max_new_tokens=6)
    models = {
        fmt: LLaVAMoSLoRA(tiny_exports[fmt], generation=settings)
        for fmt in ("xtuner", "peft-folded", "merged-xtuner", "hf-llava", "base")
    }
    # The MoSLoRA layers were registered and the saved mixers loaded, on both towers.
    for tower in (models["xtuner"].llm, models["xtuner"].visual_encoder):
        mixers = [m for m in tower.modules() if hasattr(m, "lora_mixer")]
        assert mixers and all(m.lora_mixer["default"].weight.abs().sum() > 0 for m in mixers)

    reference = _last_logits(models["xtuner"], tiny_exports["image"])
    base = _last_logits(models["base"], tiny_exports["image"])
    assert (
        reference - base
    ).abs().max() > 0.1  # the adapters matter: equalities below mean something
    for fmt in ("peft-folded", "merged-xtuner", "hf-llava"):
        # float32 throughout; folding B·M and merging W + s·B·M·A only reorder the rounding.
        # hf-llava's vocabulary has one extra row, `<image>` (never predicted by our inputs' rows).
        logits = _last_logits(models[fmt], tiny_exports["image"])[: reference.shape[0]]
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)

    message = [
        dict(type="image", value=str(tiny_exports["image"])),
        dict(type="text", value=QUESTION),
    ]
    answers = {
        fmt: m.generate(message, dataset="MMVet") for fmt, m in models.items() if fmt != "base"
    }
    assert len(set(answers.values())) == 1, answers  # greedy: one answer for all four layouts


def test_a_moslora_export_that_lost_its_mixer_is_refused(tiny_exports, tmp_path):
    from safetensors.torch import load_file, save_file

    from llava_moslora.eval.model import LLaVAMoSLoRA

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_exports["xtuner"], broken)
    weights = broken / "llm_adapter" / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if "lora_mixer" not in k}
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"declares a MoSLoRA adapter .* the mixer was lost"):
        LLaVAMoSLoRA(broken)


def test_generation_settings_are_checked():
    from llava_moslora.eval.model import GenerationSettings

    with pytest.raises(ValueError, match=r"`max_new_tokens` should be a positive integer, got 0"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"`temperature` is needed with `do_sample=True`"):
        GenerationSettings(do_sample=True)


# ----------------------------------------------------------------------------- offline suite
def _scores(summary):
    return {name: entry["score"] for name, entry in summary["benchmarks"].items()}


@pytest.mark.slow
def test_oracle_scores_full_marks_through_vlmevalkit(tiny_runs):
    scores = _scores(tiny_runs["summaries"]["oracle"])
    assert scores[TINY_MMBENCH_EN] == scores[TINY_MMBENCH_CN] == 100.0
    assert scores[TINY_TEXTVQA] == 100.0
    # MME: per category acc (100) + acc+ (100), 4 perception categories, no cognition ones.
    assert scores[TINY_MME] == 800.0
    entry = tiny_runs["summaries"]["oracle"]["benchmarks"][TINY_MMBENCH_EN]
    assert entry["abilities"] == {a: 100.0 for a in ("CP", "FP-S", "FP-C", "AR", "RR", "LR")}
    assert entry["judge"] == "exact_matching" and entry["questions"] == 18  # rotations included


@pytest.mark.slow
def test_constant_answerer_gets_chance_level_and_circular_scoring_applies(tiny_runs):
    scores = _scores(tiny_runs["summaries"]["constant"])
    # Circular: always "A" is right for at most one rotation of each question, so 0
    # (plain accuracy would be ~1/3 on the first rotations).
    assert scores[TINY_MMBENCH_EN] == scores[TINY_MMBENCH_CN] == 0.0
    # MME pairs: "Yes" is right on one question of each pair: acc 50, acc+ 0 per category.
    details = tiny_runs["summaries"]["constant"]["benchmarks"][TINY_MME]
    assert details["categories"] == {c: 50.0 for c in ("color", "count", "existence", "position")}
    assert scores[TINY_MME] == 200.0
    reds = [r.answer_text == "red" for r in tiny_runs["records"][TINY_TEXTVQA]]
    assert scores[TINY_TEXTVQA] == pytest.approx(100 * sum(reds) / len(reds))


def _recount(run_dir: Path, run: str, name: str) -> float:
    """Score a prediction file independently of VLMEvalKit's aggregation."""
    from vlmeval.utils import can_infer

    frame = pd.read_excel(run_dir / f"{run}_{name}.xlsx")
    preds = [str(p) for p in frame["prediction"]]
    if TINY_TYPE[name] == "MCQ":
        groups = defaultdict(list)
        for row, pred in zip(frame.to_dict("records"), preds, strict=True):
            choices = {c: row[c] for c in "ABCD" if c in row and not pd.isna(row[c])}
            groups[int(row["index"]) % CIRCULAR_OFFSET].append(
                can_infer(pred, choices) == row["answer"]
            )
        return 100 * sum(all(g) for g in groups.values()) / len(groups)
    if TINY_TYPE[name] == "Y/N":
        words = [re.sub(r"[^\w\s]", " ", p.lower()).split() for p in preds]
        said = [
            "Yes" if "yes" in w and "no" not in w else "No" if "no" in w and "yes" not in w else "?"
            for w in words
        ]
        by_image = defaultdict(list)
        for row, s in zip(frame.to_dict("records"), said, strict=True):
            by_image[(row["category"], row["image_path"])].append(s == row["answer"])
        total = 0.0
        for category in {c for c, _ in by_image}:
            pairs = [v for (c, _), v in by_image.items() if c == category]
            total += 100 * sum(sum(p) for p in pairs) / sum(len(p) for p in pairs)
            total += 100 * sum(all(p) for p in pairs) / len(pairs)
        return total
    answers = [eval(a)[0] for a in frame["answer"]]
    norm = [p.strip().lower().rstrip(".") for p in preds]
    return 100 * sum(p == a for p, a in zip(norm, answers, strict=True)) / len(answers)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tiny_llava", "constant", "oracle"])
def test_scores_equal_an_independent_recount_of_the_prediction_files(tiny_runs, run):
    run_dir = tiny_runs["work"] / run
    summary = tiny_runs["summaries"][run]
    assert summary["manifest"]["adapter_kind"] == "moslora"
    assert summary["generation"]["do_sample"] is False and summary["pending"] == []
    for name in TINY:
        entry = summary["benchmarks"][name]
        assert entry["status"] == "scored"
        assert entry["score"] == pytest.approx(_recount(run_dir, run, name)), name
        assert f"{run}_{name}.xlsx" in entry["files"]
    # Every question was asked and answered (junk is fine from an untrained toy).
    frame = pd.read_excel(run_dir / f"{run}_{TINY_MMBENCH_EN}.xlsx")
    assert frame["prediction"].notna().all()
    # One row per rotation: colour 4 options, shape 3, count 4, warmth 2, rows 3, parity 2.
    assert len(frame) == summary["benchmarks"][TINY_MMBENCH_EN]["questions"] == 18


def test_circular_scoring_leaves_no_scratch_file_and_names_it_per_call(tmp_path, monkeypatch):
    """VLMEvalKit's MMBench scoring round-trips its table through /tmp/<second>.xlsx: shared by
    two scorings in the same second, and never removed. Ours is unique per call and removed."""
    from vlmeval.dataset.utils import multiple_choice

    from llava_moslora.eval import runner
    from llava_moslora.eval.tiny_bench import write_tiny_bench

    original_timestr = multiple_choice.timestr
    dumped = []
    real_dump = multiple_choice.dump

    def recording_dump(data, path, *args, **kwargs):
        dumped.append((Path(path), Path(path).parent == runner.SCRATCH_DIR))
        return real_dump(data, path, *args, **kwargs)

    monkeypatch.setattr(multiple_choice, "dump", recording_dump)
    # a file of the same kind that this run did not write stays where it is
    stranger = runner.SCRATCH_DIR / f"{runner.SCRATCH_PREFIX}{uuid.uuid4().hex}.xlsx"
    stranger.write_bytes(b"not ours")
    try:
        lmu = tmp_path / "LMUData"
        lmu.mkdir()
        write_tiny_bench(lmu, per_category=1)
        monkeypatch.setenv("LMUData", str(lmu))
        summary = runner.run_benchmarks(
            [TINY_MMBENCH_EN, TINY_MMBENCH_CN],
            work_dir=tmp_path / "runs",
            run_name="constant",
            model=make_constant(),
            offline=True,
            log=lambda _: None,
        )
        assert stranger.read_bytes() == b"not ours"
    finally:
        stranger.unlink()
    scratch = [path for path, in_scratch_dir in dumped if in_scratch_dir]
    assert len(scratch) == 2 == len(set(scratch))  # one per benchmark, each its own name
    assert all(p.name.startswith(runner.SCRATCH_PREFIX) for p in scratch)
    assert not any(p.exists() for p in scratch)
    assert multiple_choice.timestr is original_timestr
    # the scoring itself is VLMEvalKit's, unchanged: always "A" is right on no circular group
    assert summary["benchmarks"][TINY_MMBENCH_EN]["score"] == 0.0
    assert summary["benchmarks"][TINY_MMBENCH_CN]["score"] == 0.0


@pytest.mark.slow
def test_pending_without_judge_then_score_only_from_saved_predictions(
    tiny_runs, tmp_path, monkeypatch
):
    """Treat the VQA stand-in as judge-graded: inference runs, the score is "pending", and
    --score-only later scores the saved predictions without any model."""
    import dataclasses

    from llava_moslora.eval import runner

    entry = benchmarks.BENCHMARKS[TINY_TEXTVQA]
    judged = dataclasses.replace(entry.family, needs_judge=True)
    monkeypatch.setenv("LMUData", str(tiny_runs["lmu"]))
    monkeypatch.setitem(
        benchmarks.BENCHMARKS, TINY_TEXTVQA, dataclasses.replace(entry, family=judged)
    )
    first = runner.run_benchmarks(
        [TINY_TEXTVQA], work_dir=tmp_path, run_name="c", model=make_constant(), offline=True,
        log=lambda _: None,
    )  # fmt: skip
    assert first["pending"] == [TINY_TEXTVQA] and first["benchmarks"][TINY_TEXTVQA]["score"] is None
    saved = json.loads((tmp_path / "c" / runner.SUMMARY_NAME).read_text())
    assert (
        saved["pending"] == [TINY_TEXTVQA] and "judge" in saved["benchmarks"][TINY_TEXTVQA]["note"]
    )

    # "the judge is now configured"
    monkeypatch.setitem(benchmarks.BENCHMARKS, TINY_TEXTVQA, entry)
    later = runner.run_benchmarks(
        [TINY_TEXTVQA],
        work_dir=tmp_path,
        run_name="c",
        score_only=True,
        offline=True,
        log=lambda _: None,
    )  # fmt: skip: no model given: inference would raise
    assert later["pending"] == []
    assert (
        later["benchmarks"][TINY_TEXTVQA]["score"]
        == _scores(tiny_runs["summaries"]["constant"])[TINY_TEXTVQA]
    )

    with pytest.raises(FileNotFoundError, match=r"`--score-only`: no predictions for"):
        runner.run_benchmarks(
            [TINY_MME], work_dir=tmp_path, run_name="c", score_only=True, offline=True
        )


@pytest.mark.slow
def test_offline_refusals_are_immediate_and_explain_themselves(tmp_path, monkeypatch):
    from llava_moslora.eval.offline import OfflineError, no_network
    from llava_moslora.eval.runner import run_benchmarks

    monkeypatch.setenv("LMUData", str(tmp_path))
    with pytest.raises(OfflineError, match=r"`--datasets` MMVet: .*MMVet.tsv does not exist"):
        run_benchmarks(
            ["MMVet"], work_dir=tmp_path, run_name="r", model=make_constant(), offline=True
        )
    from vlmeval.dataset import image_base

    with no_network(), pytest.raises(OfflineError, match=r"tried to download https://x/MME.tsv"):
        image_base.download_file("https://x/MME.tsv", "MME.tsv")
    import urllib.request

    with no_network(), pytest.raises(OfflineError, match=r"network connection to 192.0.2.1"):
        urllib.request.urlopen("http://192.0.2.1/", timeout=30)  # TEST-NET-1: would hang, not fail


def test_import_vlmeval_keeps_the_grad_mode_an_import_switches_off(tmp_path, monkeypatch):
    """What `vlmeval/vlm/__init__.py` does when imported, done by a module of our own: through
    `import_vlmeval` the grad mode after the import is the one before it. (The real import, in a
    fresh interpreter: the next test.)"""
    from llava_moslora.eval import import_vlmeval

    (tmp_path / "grad_off_on_import.py").write_text("import torch\ntorch.set_grad_enabled(False)\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "grad_off_on_import", raising=False)
    assert torch.is_grad_enabled()
    module = import_vlmeval("grad_off_on_import")
    assert module.__file__ == str(tmp_path / "grad_off_on_import.py") and torch.is_grad_enabled()
    sys.modules.pop("grad_off_on_import")


@pytest.mark.slow  # a fresh interpreter importing VLMEvalKit: 10-50 s, most of it imports
def test_importing_the_model_class_keeps_autograd_on():
    """`vlmeval/vlm/__init__.py` runs torch.set_grad_enabled(False); our import undoes it."""
    import subprocess

    code = (
        "import sys, torch, llava_moslora.eval.model\n"
        "print('vlmeval.vlm' in sys.modules, torch.is_grad_enabled())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.stdout.split() == ["True", "True"], run.stdout + run.stderr[-2000:]


def test_limit_never_cuts_an_mme_pair_in_half():
    """VLMEvalKit's `limit` takes the first rows; MME scores acc+ per image (both questions)."""
    import pandas as pd

    from llava_moslora.eval.runner import whole_pair_limit

    mme = pd.DataFrame({"image_path": ["a", "a", "b", "b", "c", "c"], "answer": list("YNYNYN")})
    assert [whole_pair_limit(mme, n) for n in (1, 2, 3, 5, 6, 9)] == [2, 2, 4, 6, 6, 9]
    assert whole_pair_limit(mme, None) is None
    mcq = pd.DataFrame({"index": range(5), "answer": list("ABCDA")})  # no pairs: as given
    assert whole_pair_limit(mcq, 3) == 3
