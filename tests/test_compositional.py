"""The compositional task: deterministic, answers derived from the scene, held-out scenes disjoint
from training, balanced answers (chance = 1 / options), VLMEvalKit TSV, and (slow) that training on
it beats the untrained model on the held-out items."""

from __future__ import annotations

import base64
import csv
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from llava_moslora.data import compositional as comp
from llava_moslora.data.drawing import CELLS, COLOURS, SHAPES, Obj
from llava_moslora.data.items import read_eval_items
from llava_moslora.eval.heldout import chance_accuracy, evaluate_run
from tests.factories import vlmevalkit_mcq_prompts

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    return comp.write_task(tmp_path_factory.mktemp("comp"), train_images=120, eval_items=100)


def _rounds(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    return [
        (q["value"].removeprefix("<image>\n"), a["value"])
        for q, a in zip(turns[::2], turns[1::2], strict=True)
    ]


def test_same_seed_same_files_other_seed_other_files(tmp_path, task):
    again = comp.write_task(tmp_path / "again", train_images=120, eval_items=100)
    for key in ("data", "eval", "eval_tsv"):
        assert again[key].read_bytes() == task[key].read_bytes(), key
    assert (again["images"] / "000017.png").read_bytes() == (
        task["images"] / "000017.png"
    ).read_bytes()
    other = comp.write_task(tmp_path / "other", train_images=120, eval_items=100, seed=1)
    assert other["data"].read_bytes() != task["data"].read_bytes()


def test_answers_are_derived_from_the_scene():
    rng = random.Random(0)
    for _ in range(200):
        scene = comp.random_scene(rng)
        assert 2 <= len(scene) <= 4 and len({o.cell for o in scene}) == len(scene)
        for category in comp.CATEGORIES:
            for answer in comp.feasible_answers(scene, category):
                for question in comp.questions_with_answer(scene, category, answer):
                    assert comp.answer_of(scene, category, question) == answer
    # One scene worked by hand: a red circle top left, a red square top right, a blue triangle
    # bottom right.
    scene = (
        Obj(0, "circle", "red"),
        Obj(1, "square", "red"),
        Obj(3, "triangle", "blue"),
    )
    ask = comp.answer_of
    assert ask(scene, "colour_at", "What colour is the shape in the top right?") == "red"
    assert ask(scene, "shape_at", "What shape is in the bottom right?") == "triangle"
    assert ask(scene, "count", "How many red shapes are there?") == "two"
    assert ask(scene, "count", "How many green shapes are there?") == "zero"
    assert ask(scene, "exists", "Is there a red triangle?") == "no"  # both present, not bound
    assert ask(scene, "exists", "Is there a blue triangle?") == "yes"
    assert ask(scene, "where", "Where is the red square?") == "top right"
    # A hard negative is preferred: red and triangle are both in the scene, on different objects.
    assert comp.questions_with_answer(scene, "exists", "no")[0] in {
        "Is there a red triangle?",
        "Is there a blue circle?",
        "Is there a blue square?",
    }


def test_held_out_scenes_are_disjoint_from_training_scenes(task):
    train = comp.distinct_scenes(random.Random(0), 120)  # write_task's first draws for seed 0
    items = read_eval_items(task["eval"])
    scenes = [item.scene for item in items]
    assert not set(scenes) & set(train)
    assert len(set(scenes)) == len(scenes)  # and no scene is evaluated twice
    for item in items:  # the stored scene is the one the answer was derived from
        assert comp.answer_of(item.scene, item.category, item.question) == item.answer


def test_training_rounds_match_the_scene_and_need_the_image(task):
    records = json.loads(task["data"].read_text())
    assert len(records) == 120
    answers_to: dict[str, set[str]] = defaultdict(set)
    for record in records:
        assert record["conversations"][0]["value"].startswith("<image>\n")
        assert (task["images"] / record["image"]).is_file()
        for question, reply in _rounds(record):
            answers_to[question].add(reply)
    # The same question gets different answers on different images: text alone cannot answer.
    repeated = [q for q, replies in answers_to.items() if len(replies) > 1]
    assert len(repeated) > 0.8 * len(answers_to)


def test_held_out_answers_are_balanced_so_chance_is_one_over_options(task):
    items = read_eval_items(task["eval"])
    per_category = Counter(item.category for item in items)
    assert set(per_category.values()) == {len(items) // len(comp.CATEGORIES)}
    for category, options in comp.ANSWERS.items():
        counts = Counter(item.answer for item in items if item.category == category)
        assert set(counts) == set(options)
        assert max(counts.values()) - min(counts.values()) <= 1  # no answer is a better guess
    assert {
        "colour_at": 1 / len(COLOURS),
        "shape_at": 1 / len(SHAPES),
        "count": 1 / 4,
        "exists": 1 / 2,
        "where": 1 / len(CELLS),
    } == comp.CHANCE
    assert chance_accuracy(items) == pytest.approx(sum(comp.CHANCE.values()) / 5)
    for item in items:
        assert item.options == comp.ANSWERS[item.category]
        assert item.options["ABCD".index(item.answer_letter)] == item.answer
        assert item.l2_category == comp.L2_CATEGORY[item.category]


def test_mcq_tsv_has_vlmevalkit_columns(task):
    items = read_eval_items(task["eval"])
    with open(task["eval_tsv"], newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert list(rows[0]) == [
        "index", "image", "question", "A", "B", "C", "D", "answer", "category", "l2-category",
        "split",
    ]  # fmt: skip
    assert len(rows) == len(items)
    for row, item in zip(rows, items, strict=True):
        assert int(row["index"]) == item.index and row["answer"] == item.answer_letter
        assert row[row["answer"]] == item.answer
        assert [row[c] for c in "ABCD"][len(item.options) :] == [""] * (4 - len(item.options))
        png = (task["eval"].parent / item.image).read_bytes()
        assert base64.b64decode(row["image"]) == png


def test_vlmevalkit_reads_the_tsv_as_a_multiple_choice_set(task, tmp_path, monkeypatch):
    """VLMEvalKit's own loader takes the TSV as a custom MCQ set and prompts with each row's
    options only (a question with three options gets no empty "D.")."""
    items = read_eval_items(task["eval"])
    prompts = vlmevalkit_mcq_prompts(task["eval_tsv"], tmp_path, monkeypatch)
    assert len(prompts) == len(items)
    for prompt, item in zip(prompts, items, strict=True):
        assert prompt.startswith(f"Question: {item.question}")
        listed = [
            f"{letter}. {option}" for letter, option in zip("ABCD", item.options, strict=False)
        ]
        assert [
            line for line in prompt.split("\n") if line[:3] in {"A. ", "B. ", "C. ", "D. "}
        ] == listed


def test_bad_sizes_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"`train_images` should be an integer >= 1 .* is 0\."):
        comp.write_task(tmp_path, train_images=0)
    with pytest.raises(ValueError, match=r"`eval_items` should be an integer >= 5 .* is 3\."):
        comp.write_task(tmp_path, eval_items=3)


def test_make_tiny_task_option_and_cli_choices_agree():
    from llava_moslora import cli
    from llava_moslora.builders import make_tiny

    assert cli.TASKS == make_tiny.TASKS
    with pytest.raises(ValueError, match=r"`task` should be one of shapes, compositional .*'vqa'"):
        make_tiny.make_tiny("unused", task="vqa")


def test_tokenizer_corpus_covers_every_question(task):
    corpus = set(comp.corpus())
    records = json.loads(task["data"].read_text())
    asked = {q for record in records for q, _ in _rounds(record)}
    asked |= {item.question for item in read_eval_items(task["eval"])}
    assert asked <= corpus


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compositional_run(tiny_llava, tmp_path_factory):
    """make-tiny --task compositional, train in-process with the config's runner, score options
    before and after: ({"overall": ...} untrained, the same trained, the work dir).

    mmengine's Runner is built from the config in this process (what `xtuner train` does in a
    subprocess, minus a second Python start-up), one torch thread: on a shared 2-core machine
    the default thread pool made each step 30-50x slower (5 s instead of 0.1 s).
    """
    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner

    from llava_moslora.train.checkpoints import last_checkpoint

    work = tmp_path_factory.mktemp("compositional") / "work"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            tiny = tiny_llava(samples=400, task="compositional")
            patch.setenv("LLAVA_MOSLORA_TINY_DIR", str(tiny))  # read when the config is parsed
            config = REPO / "configs" / "tiny_compositional_moslora.py"
            untrained = evaluate_run(config)
            cfg = Config.fromfile(str(config))
            cfg.work_dir = str(work)
            cfg.randomness = dict(seed=0)
            Runner.from_cfg(cfg).train()
            trained = evaluate_run(config, last_checkpoint(work))
    finally:
        torch.set_num_threads(threads)
    return untrained, trained, work


@pytest.mark.slow
def test_the_compositional_run_writes_its_mixer_diagnostics(compositional_run):
    _, _, work = compositional_run
    lines = (work / "mixer_diagnostics.jsonl").read_text().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)


@pytest.mark.slow
def test_the_untrained_model_is_at_chance_on_held_out_scenes(compositional_run):
    untrained, _, _ = compositional_run
    chance = sum(comp.CHANCE.values()) / len(comp.CHANCE)
    assert abs(untrained["overall"] - chance) < 0.08, untrained


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,  # only the accuracy check may fail: an error in the pipeline fails
    reason="measured: the tiny LLaVA learns the answer priors but not to read the image "
    "(held-out accuracy stays at chance, 0.324 vs 0.317, after 750 steps); see docs/ablation.md, "
    "'A harder task the tiny model does not learn'. Remove this marker when it passes.",
)
def test_training_beats_the_untrained_model_on_held_out_scenes(compositional_run):
    untrained, trained, _ = compositional_run
    assert trained["overall"] > untrained["overall"] + 0.15, (untrained, trained)
