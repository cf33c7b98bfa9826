"""`make-tiny --verdict-steps`: the tiny base's stand-in for a pretrained projector and LLM
(builders/verdict.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llava_moslora.builders import verdict
from llava_moslora.data import synthetic


def test_verdict_conversations_say_the_picture_then_the_verdict():
    rng = random.Random(0)
    verdicts, kinds = [], set()
    for _ in range(200):
        scene = synthetic.random_scene(rng)
        turns = verdict.conversation(scene, rng)
        assert len(turns) == 2 * verdict.ROUNDS and turns[0]["value"].startswith("<image>\n")
        for question, reply in zip(turns[::2], turns[1::2], strict=True):
            seen, said = reply["value"].rsplit(" ", 1)
            if "cell of the grid" in question["value"]:  # position: the filled cells, then
                kinds.add("position")  # whether the asked one is among them
                assert seen == synthetic.filled_cells(scene)
                (cell,) = [
                    i for i, c in enumerate(synthetic.CELLS) if f" {c} cell" in question["value"]
                ]
                asked = cell in scene.cells
            else:
                kinds.add("word")
                assert seen in (scene.colour, scene.shape, synthetic.COUNT_WORDS[scene.count - 1])
                asked = f" {seen} " in question["value"]
            assert said == ("Yes" if asked else "No"), (scene, question, reply)
            verdicts.append(said)
    assert kinds == {"position", "word"}
    assert 0.45 < verdicts.count("Yes") / len(verdicts) < 0.55


def test_captions_describe_the_picture():
    rng = random.Random(0)
    for _ in range(50):
        scene = synthetic.random_scene(rng)
        (question, caption) = verdict.caption_conversation(scene, rng)
        assert question["value"] == f"<image>\n{verdict.CAPTION_PROMPT}"
        text = caption["value"]
        assert scene.colour in text and scene.noun in text
        assert text.endswith(f" in the {synthetic.filled_cells(scene)}.")
        assert (synthetic.COUNT_WORDS[scene.count - 1] in text) == (scene.count > 1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from llava_moslora.builders.make_tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny")
    make_tiny(out, samples=4, benchmark_rounds=("yes_no_read",))
    return out


def test_the_loss_is_on_the_verdict_only(tiny_dir):
    from transformers import AutoTokenizer, CLIPImageProcessor
    from xtuner.utils import IGNORE_INDEX

    from llava_moslora.builders.pretrain import Conversations

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llm")
    ids = verdict.verdict_token_ids(tokenizer)
    assert {tokenizer.decode([i]).strip() for i in ids} == {"Yes", "No"}
    data = tiny_dir / "data"
    path = synthetic.write_conversations(
        data / "v.json", data / "v_images", 6, random.Random(0), verdict.conversation, 56
    )
    processor = CLIPImageProcessor.from_pretrained(tiny_dir / "clip")
    whole = Conversations(path, tokenizer, processor)
    masked = Conversations(path, tokenizer, processor, learn=ids)
    for full, kept in zip(whole.encoded, masked.encoded, strict=True):
        learned = [t for t in kept["labels"] if t != IGNORE_INDEX]
        assert len(learned) == verdict.ROUNDS and set(learned) <= ids
        # the answers' other tokens (the picture's word, the end of turn) are learned without it
        assert len([t for t in full["labels"] if t != IGNORE_INDEX]) > 2 * verdict.ROUNDS
        assert kept["input_ids"] == full["input_ids"]


@pytest.mark.slow
def test_teach_verdict_aligns_the_projector_then_trains_the_llm_on_the_verdict(tmp_path):
    from safetensors.torch import load_file

    from llava_moslora.builders.make_tiny import make_tiny
    from llava_moslora.moslora.safety import safe_torch_load

    paths = make_tiny(tmp_path, samples=4, benchmark_rounds=("yes_no_read",))
    before = {name: load_file(tmp_path / name / "model.safetensors") for name in ("llm", "clip")}
    projector = safe_torch_load(paths["projector"])["state_dict"]
    record = verdict.teach_verdict(
        paths, steps=250, samples=64, caption_steps=60, log=lambda _: None
    )
    assert record["steps"] == 250 and record["caption_steps"] == 60
    # the captions are learned (from ~ln(768) = 6.6 at init) and the verdict goes from a guess
    # (ln 2 = 0.69, or worse at init) to below it: the comparison starts to form
    assert record["caption_loss_last"] < record["caption_loss_first"] / 2
    assert record["loss_last"] < 0.69 < record["loss_first"]
    after_llm = load_file(tmp_path / "llm" / "model.safetensors")
    assert all(not torch.equal(v, before["llm"][k]) for k, v in after_llm.items())
    after_clip = load_file(tmp_path / "clip" / "model.safetensors")
    assert all(torch.equal(v, before["clip"][k]) for k, v in after_clip.items())
    aligned = safe_torch_load(paths["projector"])["state_dict"]
    assert aligned.keys() == projector.keys()  # still what LLaVAModel(pretrained_pth=) reads
    assert all(not torch.equal(v, projector[k]) for k, v in aligned.items())
    for name in ("verdict", "captions"):
        assert len(json.loads((tmp_path / "data" / f"{name}.json").read_text())) == 64


def test_make_tiny_refuses_a_bad_verdict_steps(tmp_path, capsys):
    from llava_moslora.cli import main

    for steps in ("0", "-1"):
        assert main(["make-tiny", str(tmp_path / "a"), "--verdict-steps", steps]) == 2
        assert (
            f"`--verdict-steps` should be a positive integer but the value passed is {steps}"
            in (capsys.readouterr().err)
        )
    for other in (["--pretrain"], ["--task", "compositional"], ["--shape", "mid"]):
        assert main(["make-tiny", str(tmp_path / "a"), "--verdict-steps", "5", *other]) == 2
        assert "drop `--pretrain` / `--shape` / `--task`" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before anything is written
