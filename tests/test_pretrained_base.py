"""The pretrained base (`make-tiny --pretrain`) and its two question families."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from llava_moslora.data import families
from llava_moslora.data.items import read_eval_items
from llava_moslora.data.prompts import IMAGE_TOKEN, SHORT_ANSWER_INSTRUCTION


def _human_questions(data: Path) -> set[str]:
    """Every question of a family's training JSON, without the image token and the suffix."""
    questions = set()
    for record in json.loads(data.read_text()):
        for turn in record["conversations"]:
            if turn["from"] == "human":
                text = turn["value"].replace(f"{IMAGE_TOKEN}\n", "")
                questions.add(text.replace(f"\n{SHORT_ANSWER_INSTRUCTION}", ""))
    return questions


def _words(texts) -> set[str]:
    return {word.strip("?.").lower() for text in texts for word in text.split()}


def test_families_share_no_question_kind_and_no_question(tmp_path):
    a, b = families.FAMILY_A, families.FAMILY_B
    assert set(a.kinds) == {"colour", "shape"} and set(b.kinds) == {"count"}
    paths = families.write_task(tmp_path, samples=40, val_items=8, test_items=8)
    asked_a, asked_b = _human_questions(paths["family_a"]), _human_questions(paths["family_b"])
    assert asked_a and asked_b and not asked_a & asked_b
    # Family B's training data asks only its own kind: count questions, in words family A never
    # uses ("objects", "picture").
    assert {"objects", "picture"} <= _words(asked_b) - _words(asked_a)
    for name, asked in (("a", asked_a), ("b", asked_b)):
        items = [
            item
            for split in families.SPLITS
            for item in read_eval_items(paths[f"family_{name}_{split}"])
        ]
        assert {item.category for item in items} == set(families.FAMILIES[name].kinds)
        # held-out items ask the family's own questions (phrasings seen in its training data)
        held = {item.question.replace(f"\n{SHORT_ANSWER_INSTRUCTION}", "") for item in items}
        assert held <= asked


def test_validation_and_test_items_are_other_pictures_with_balanced_answers(tmp_path):
    paths = families.write_task(tmp_path, samples=4, val_items=24, test_items=48)
    for name in families.FAMILIES:
        val = read_eval_items(paths[f"family_{name}_val"])
        test = read_eval_items(paths[f"family_{name}_test"])
        assert {i.split for i in val} == {"val"} and {i.split for i in test} == {"test"}
        assert not {i.image for i in val} & {i.image for i in test}

        def pixels(items):
            return {hashlib.sha256((tmp_path / i.image).read_bytes()).digest() for i in items}

        assert not pixels(val) & pixels(test)  # different drawings, not only other file names
        for items in (val, test):
            for kind in families.FAMILIES[name].kinds:
                answers = Counter(i.answer for i in items if i.category == kind)
                assert set(answers) == set(families.FAMILIES[name].options[kind])
                assert len(set(answers.values())) == 1  # every answer equally often: chance
            for item in items:  # the recorded scene gives the recorded answer
                assert item.options[ord(item.answer_letter) - ord("A")] == item.answer


def test_answers_follow_the_scene_and_position_questions_are_gone():
    """Family B asks counts only: its yes/no position questions were never learned (issue 29)."""
    scene = families.Scene(shape="circle", colour="red", cells=(0, 3))
    assert families.short_answer(scene, "count") == "two"
    assert families.short_answer(scene, "colour") == "red"
    with pytest.raises(ValueError, match="one of colour, shape, count, got 'position'"):
        families.short_answer(scene, "position")
    assert not any(
        "occupied" in text or "cell" in text for text in families.corpus() if "?" in text
    )


TINY = dict(hidden_size=16, samples=8, steps=2, batch_size=4, val_items=2, test_items=2)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_pretrain_trains_every_read_weight_and_the_cache_is_reused(tmp_path):
    from safetensors.torch import load_file

    from llava_moslora.builders.make_tiny import build_tokenizer, tiny_clip, tiny_llama3
    from llava_moslora.builders.pretrain import RECORD, PretrainSpec, corpus_texts, pretrain_tiny

    spec = PretrainSpec(**TINY)
    calls = []

    def score(model, tokenizer, image_processor, items):
        calls.append(Path(items).name)
        return {"overall": 0.5}

    out = tmp_path / "base"
    (tmp_path / "base.partial").mkdir()  # an interrupted build: cleared, not reused
    (tmp_path / "base.partial" / "junk").write_text("x")
    built = pretrain_tiny(out, spec, score=score, log=lambda _: None)
    assert not built.reused and not (tmp_path / "base.partial").exists()
    assert calls == ["family_a_test.json", "family_b_test.json"]
    assert built.record["spec"] == spec.key() and built.record["family_a_test"] == {"overall": 0.5}
    # make-tiny's layout, so a tiny config reads it as its base
    for path in ("llm/config.json", "llm/tokenizer.json", "clip/config.json", "data/family_b.json"):
        assert (out / path).is_file(), path

    # Every weight that gets a gradient moved from make-tiny's init of the same seed: the LLM,
    # the projector and the vision layers LLaVA reads (0-1; layer 2 and the post-layernorm sit
    # above visual_select_layer=-2 and get none, as in any LLaVA).
    tokenizer = build_tokenizer(corpus_texts(), vocab_size=512)
    fresh_llm = tiny_llama3(tokenizer, spec.seed, spec.hidden_size).state_dict()
    trained_llm = load_file(out / "llm" / "model.safetensors")
    unchanged = [k for k, v in trained_llm.items() if torch.equal(v, fresh_llm[k])]
    assert unchanged == []
    fresh_clip = tiny_clip(spec.seed, spec.hidden_size)[0].state_dict()
    trained_clip = load_file(out / "clip" / "model.safetensors")
    unchanged = {k for k, v in trained_clip.items() if torch.equal(v, fresh_clip[k])}
    assert unchanged and all("layers.2." in k or "post_layernorm" in k for k in unchanged)
    assert any("layers.0." in k for k in trained_clip if k not in unchanged)
    projector = torch.load(out / "projector" / "iter_0.pth", weights_only=True)["state_dict"]
    assert projector and all(k.startswith("projector.model.") for k in projector)

    # The same spec again: nothing retrained, rescored or rewritten.
    before = _mtimes(out)
    again = pretrain_tiny(out, spec, score=score, log=lambda _: None)
    assert again.reused and again.record == json.loads((out / RECORD).read_text())
    assert _mtimes(out) == before and len(calls) == 2

    # Another spec is refused: runs adapted from one base must not be mixed with another's.
    with pytest.raises(
        ValueError, match="pretrained with steps=2 but this call asks for steps=3. .* another DIR"
    ):
        pretrain_tiny(out, PretrainSpec(**{**TINY, "steps": 3}), log=lambda _: None)
    assert _mtimes(out) == before
    # A folder that is no base (a plain make-tiny folder) is never overwritten.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "llm").mkdir()
    with pytest.raises(ValueError, match="holds no pretrained.json: not a pretrained base"):
        pretrain_tiny(tmp_path / "plain", spec, log=lambda _: None)


def test_pretrain_spec_is_checked():
    from llava_moslora.builders.pretrain import PretrainSpec, pretrain_tiny

    with pytest.raises(ValueError, match="`steps` should be a positive integer, got 0"):
        pretrain_tiny("unused", PretrainSpec(steps=0))
    with pytest.raises(ValueError, match="`hidden_size` should be a multiple of 4"):
        pretrain_tiny("unused", PretrainSpec(hidden_size=18))


def test_make_tiny_pretrain_refuses_other_tasks(capsys):
    from llava_moslora.cli import main

    assert main(["make-tiny", "unused", "--pretrain", "--task", "compositional"]) == 2
    assert "`--pretrain` builds the tiny shapes LLaVA" in capsys.readouterr().err
