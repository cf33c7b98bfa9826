"""`llava-moslora make-tiny` + `xtuner train configs/tiny_moslora.py` on CPU, and the CPU shims."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from llava_moslora.data import prompts
from llava_moslora.data.items import OPTION_LETTERS, read_eval_items
from llava_moslora.train import cpu_shims
from llava_moslora.train.checkpoints import load_checkpoint_file
from tests.factories import REPO, vlmevalkit_mcq_prompts
from tests.launchers import assert_both_towers_have_mixers, run_train

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only shim")


@pytest.fixture(scope="module")
def tiny_dir(tiny_llava) -> Path:
    """`make-tiny`'s default 320 samples (the training run below, the image counts)."""
    return tiny_llava(samples=320)


# --- make-tiny ------------------------------------------------------------------------------


def test_tiny_tokenizer_has_the_llama3_chat_tokens(tiny_dir):
    from transformers import AutoTokenizer
    from xtuner.utils import PROMPT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llm")
    template = PROMPT_TEMPLATE.llama3_chat
    chat = (
        template.INSTRUCTION.format(input="How many shapes are there?") + "Two." + template.SUFFIX
    )
    ids = tokenizer.encode(chat)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert tokenizer.decode(ids[1:]) == chat  # byte-level: every string round-trips
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token_id == 0


def test_tiny_projector_matches_what_llava_model_loads(tiny_dir):
    from transformers import AutoConfig
    from xtuner.model.modules import ProjectorConfig, ProjectorModel
    from xtuner.model.utils import guess_load_checkpoint

    state = guess_load_checkpoint(str(tiny_dir / "projector" / "iter_0.pth"))
    llm, vit = (
        AutoConfig.from_pretrained(tiny_dir / "llm"),
        AutoConfig.from_pretrained(tiny_dir / "clip"),
    )
    projector = ProjectorModel(
        ProjectorConfig(
            visual_hidden_size=vit.hidden_size, llm_hidden_size=llm.hidden_size, depth=2
        )
    )
    # LLaVAModel loads pretrained_pth with strict=False: check the keys and shapes really match.
    expected = {f"projector.{k}": v.shape for k, v in projector.state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == expected


def test_synthetic_data_is_deterministic_and_answers_depend_on_the_image(tmp_path):
    from llava_moslora.data import synthetic

    first = synthetic.write_dataset(tmp_path / "a", samples=40, seed=3).read_text()
    assert first == synthetic.write_dataset(tmp_path / "b", samples=40, seed=3).read_text()
    assert (tmp_path / "a/images/000007.png").read_bytes() == (
        tmp_path / "b/images/000007.png"
    ).read_bytes()

    records = json.loads(first)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
    assert all("<image>" not in t["value"] for r in records for t in r["conversations"][1:])


def _format_of(prompt: str) -> str:
    """The round format of a training prompt: mcq, yes_no, short or free (free-form)."""

    if prompt.split("\n")[-1] in prompts.MCQ_INSTRUCTION.values():
        return "mcq"
    if prompts.YES_NO_SUFFIX in prompt:
        return "yes_no"
    return "short" if prompt.endswith(prompts.SHORT_ANSWER_INSTRUCTION) else "free"


@pytest.mark.parametrize("rounds", [("short", "short"), ("mcq", "yes_no"), ()])
def test_benchmark_rounds_set_each_conversations_formats(tmp_path, rounds):
    """make-tiny --benchmark-rounds: every conversation gets exactly those benchmark rounds (the
    ablation's data: two short-answer rounds) besides its one or two free-form ones."""
    from collections import Counter

    from llava_moslora.data import synthetic

    path = synthetic.write_dataset(tmp_path, samples=30, seed=2, benchmark_rounds=rounds)
    for record in json.loads(path.read_text()):
        formats = Counter(_format_of(turn["value"]) for turn in record["conversations"][::2])
        assert 1 <= formats.pop("free") <= 2
        assert formats == Counter(rounds)
    default = synthetic.write_dataset(tmp_path / "default", samples=30, seed=2)
    for record in json.loads(default.read_text()):
        formats = Counter(_format_of(turn["value"]) for turn in record["conversations"][::2])
        assert formats.pop("free") >= 1 and formats == Counter(synthetic.BENCHMARK_ROUNDS)


def test_bad_benchmark_rounds_are_refused_before_anything_is_written(tmp_path):
    from llava_moslora.builders.make_tiny import make_tiny
    from llava_moslora.cli import main
    from llava_moslora.data import synthetic

    expected = r"`benchmark_rounds` \(make-tiny --benchmark-rounds\) should be formats from mcq"
    with pytest.raises(ValueError, match=expected + r".*\('short', 'vqa'\)"):
        make_tiny(tmp_path / "tiny", benchmark_rounds=("short", "vqa"))
    with pytest.raises(ValueError, match=expected + r".*'short'"):
        synthetic.write_dataset(tmp_path / "data", benchmark_rounds="short")  # not a tuple
    assert main(["make-tiny", str(tmp_path / "cli"), "--benchmark-rounds", "short,mcqs"]) == 2
    assert not any(tmp_path.iterdir())


def test_held_out_items_are_balanced_true_to_their_image_and_new_pictures(tiny_dir, tmp_path):
    """make-tiny writes the ablation's held-out set: answers balanced (chance = 1/options), each
    answer what the scene gives, and pictures that are not training pictures."""
    from collections import Counter

    from llava_moslora.data import synthetic

    items = read_eval_items(tiny_dir / "data" / synthetic.HELDOUT_JSON)
    assert len(items) == 144
    by_kind = Counter(item.category for item in items)
    assert by_kind == {"colour": 48, "shape": 48, "count": 48}
    answers = Counter((item.category, item.answer) for item in items)
    for item in items:
        # every option equally often: a model that ignores the image scores exactly chance
        assert answers[item.category, item.answer] == 48 // len(item.options)
        objects = item.scene
        scene = synthetic.Scene(
            objects[0].shape, objects[0].colour, tuple(obj.cell for obj in objects)
        )
        assert item.answer == synthetic.short_answer(scene, item.category)
        assert item.options[OPTION_LETTERS.index(item.answer_letter)] == item.answer
        assert item.question.endswith(prompts.SHORT_ANSWER_INSTRUCTION)
    training = {p.read_bytes() for p in (tiny_dir / "data" / "images").glob("*.png")}
    held_out = [(tiny_dir / "data" / item.image).read_bytes() for item in items]
    assert not training.intersection(held_out)
    # same seed, same items; the set does not depend on how much training data was drawn
    again = synthetic.write_heldout(tmp_path, seed=0).read_text()
    assert again == (tiny_dir / "data" / synthetic.HELDOUT_JSON).read_text()
    with pytest.raises(ValueError, match="`items` should be an integer >= 3"):
        synthetic.write_heldout(tmp_path, items=2)


def test_held_out_items_also_make_a_vlmevalkit_multiple_choice_tsv(tiny_dir, tmp_path, monkeypatch):
    """The same 144 items for VLMEvalKit: its MCQ columns, the bare question (VLMEvalKit's prompt
    adds the options and its own instruction), the answer letter pointing at the answer."""
    import base64

    pd = pytest.importorskip("pandas")
    from llava_moslora.data import synthetic

    items = read_eval_items(tiny_dir / "data" / synthetic.HELDOUT_JSON)
    frame = pd.read_csv(tiny_dir / "data" / synthetic.HELDOUT_TSV, sep="\t")
    assert list(frame.columns) == [
        "index", "image", "question", "A", "B", "C", "D", "answer", "category", "l2-category",
        "split",
    ]  # fmt: skip
    assert len(frame) == len(items)
    for (_, row), item in zip(frame.iterrows(), items, strict=True):
        assert row["index"] == item.index and row["category"] == item.category
        assert row["question"] == item.question.split("\n")[0]
        assert prompts.SHORT_ANSWER_INSTRUCTION not in row["question"]
        assert str(row[row["answer"]]) == item.answer
        png = (tiny_dir / "data" / item.image).read_bytes()
        assert base64.b64decode(row["image"]) == png
    asked = vlmevalkit_mcq_prompts(tiny_dir / "data" / synthetic.HELDOUT_TSV, tmp_path, monkeypatch)
    for prompt, item in zip(asked, items, strict=True):
        assert prompt.startswith(f"Question: {item.question.split(chr(10))[0]}\nOptions:\n")
        assert ("\nD. " in prompt) == (item.category != "shape")  # three shapes: no empty "D."


def test_ablation_config_trains_projector_and_vit_adapters_at_a_twentieth_of_the_rate(
    tiny_dir, monkeypatch
):
    """configs/tiny_ablation.py: the optimizer mmengine builds from it gives every trainable
    parameter the rate its tower should have (a key that matched nothing would leave all at lr)."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from xtuner.registry import BUILDER

    monkeypatch.setenv("LLAVA_MOSLORA_TINY_DIR", str(tiny_dir))  # read when the config is parsed
    cfg = Config.fromfile(str(REPO / "configs" / "tiny_ablation.py"))
    model = BUILDER.build(cfg.model)
    rate_of = {}
    for group in build_optim_wrapper(model, cfg.optim_wrapper).optimizer.param_groups:
        for param in group["params"]:
            rate_of[id(param)] = group["lr"]
    rates: dict[str, set[float]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            rates.setdefault(name.split(".")[0], set()).add(round(rate_of[id(param)], 12))
    assert rates == {"llm": {2e-3}, "visual_encoder": {1e-4}, "projector": {1e-4}}
    assert cfg.model.llm_lora.r == 8 and cfg.model.visual_encoder_lora.r == 8
    assert Path(cfg.heldout_eval_path).is_file()


def _rounds(samples: int = 1500, seed: int = 0, benchmark_rounds: tuple[str, ...] | None = None):
    """(scene, prompt, reply) for every round of `samples` conversations, without drawing."""
    import random

    from llava_moslora.data import synthetic

    rng = random.Random(seed)
    rounds = synthetic.BENCHMARK_ROUNDS if benchmark_rounds is None else benchmark_rounds
    for _ in range(samples):
        scene = synthetic.random_scene(rng)
        turns = synthetic.conversation(scene, rng, benchmark_rounds=rounds)
        for question, reply in zip(turns[::2], turns[1::2], strict=True):
            yield scene, question["value"].removeprefix("<image>\n"), reply["value"]


def test_synthetic_answers_depend_on_the_image():
    replies_to = {}
    for _, prompt, reply in _rounds():
        replies_to.setdefault(prompt, []).append(reply)
    asked_often = {p: r for p, r in replies_to.items() if len(r) >= 5}
    assert len(asked_often) > 100
    assert all(len(set(r)) > 1 for r in asked_often.values())  # the text alone can't answer


def _mcq_parts(prompt: str):
    """(language, kind, {letter: option text}) of a multiple-choice prompt, else None."""
    from llava_moslora.data import synthetic

    lines = prompt.split("\n")
    for lang, instruction in prompts.MCQ_INSTRUCTION.items():
        if lines[-1] == instruction:
            (kind,) = [k for k, q in synthetic.MCQ_QUESTIONS.items() if q[lang] == lines[0]]
            options = dict(line.split(". ", 1) for line in lines[1:-1])
            return lang, kind, options
    return None


def test_eval_model_picks_the_training_language_of_every_mcq_question():
    """The eval model picks the MCQ instruction from the row's text (`prompts.language_of`); the
    training data picks it by language: they agree on every question and option set."""
    from llava_moslora.data import synthetic

    for lang in synthetic.LANGUAGES:
        for kind, question in synthetic.MCQ_QUESTIONS.items():
            texts = list(synthetic.OPTION_TEXTS[lang][kind].values())
            assert prompts.language_of("".join([question[lang], *texts])) == lang, (lang, kind)


def test_synthetic_mcq_letter_points_at_the_right_option():
    from llava_moslora.data import synthetic

    seen, letters = set(), {}
    for scene, prompt, reply in _rounds():
        parts = _mcq_parts(prompt)
        if parts is None:
            continue
        lang, kind, options = parts
        assert list(options) == list(OPTION_LETTERS[: len(options)]), prompt
        assert len(options) == min(len(synthetic.OPTION_TEXTS[lang][kind]), 4)
        right = synthetic.OPTION_TEXTS[lang][kind][synthetic.mcq_truth(scene, kind)]
        assert options[reply] == right, (scene, prompt, reply)
        assert sum(text == right for text in options.values()) == 1
        seen.add((lang, kind))
        letters.setdefault(len(options), []).append(reply)
    # Every kind in both languages; with n options the right letter is each of the first n about
    # equally often (no positional shortcut).
    assert seen == {(lang, kind) for lang in ("en", "cn") for kind in synthetic.MCQ_QUESTIONS}
    assert sorted(letters) == [2, 3, 4]
    for n, replies in letters.items():
        shares = [replies.count(x) / len(replies) for x in "ABCD"[:n]]
        assert all(abs(share - 1 / n) < 0.08 for share in shares), (n, shares)


def test_mcq_text_answers_are_the_option_text_vlmevalkit_maps_to_the_right_letter():
    """The quickstart's multiple-choice rounds (`mcq_text`) answer with the option's text; what
    VLMEvalKit's exact matching makes of that text must be the right option's letter, for every
    kind, language and option (an option text inside another would break it)."""
    from vlmeval.utils.matching_util import can_infer

    from llava_moslora.data import synthetic

    seen = set()
    for scene, prompt, reply in _rounds(samples=600, benchmark_rounds=("mcq_text", "mcq_text")):
        parts = _mcq_parts(prompt)
        if parts is None:
            continue
        lang, kind, options = parts
        right = synthetic.OPTION_TEXTS[lang][kind][synthetic.mcq_truth(scene, kind)]
        assert reply == right, (scene, prompt, reply)
        (letter,) = [k for k, text in options.items() if text == right]
        assert can_infer(reply, dict(options)) == letter, (prompt, reply)
        seen.add((lang, kind))
    assert seen == {(lang, kind) for lang in ("en", "cn") for kind in synthetic.MCQ_QUESTIONS}
    for lang, kinds in synthetic.OPTION_TEXTS.items():  # every option, against all the others
        for kind, texts in kinds.items():
            choices = dict(zip(OPTION_LETTERS, list(texts.values())[:4], strict=False))
            for letter, text in choices.items():
                assert can_infer(text, dict(choices)) == letter, (lang, kind, text)


def _holds(scene, kind: str, value: str) -> bool:
    """Whether a yes/no question of `kind` about `value` is true of `scene`."""
    from llava_moslora.data import synthetic

    if kind == "color":
        return value == scene.colour
    if kind == "count":
        return value == synthetic.COUNT_WORDS[scene.count - 1]
    if kind == "existence":
        return value == scene.shape
    return synthetic.CELLS.index(value) in scene.cells  # position


@pytest.mark.parametrize("yes_no", ["yes_no", "yes_no_read"])
def test_synthetic_yes_no_and_short_answers_agree_with_the_scene(yes_no):
    """Each yes/no answer is the question's truth; `yes_no_read` says the picture's word first
    ("blue No"; the filled cells for position questions), and VLMEvalKit's MME scoring reads its
    verdict."""
    import re

    from vlmeval.dataset.utils.yorn import YOrN_Extraction

    from llava_moslora.data import synthetic

    yes_no_tail = prompts.YES_NO_SUFFIX + "\n" + prompts.SHORT_ANSWER_INSTRUCTION
    patterns = {
        kind: re.compile(re.escape(ask).replace(r"\{\}", "(.+)") + "\n")
        for kind, ask in synthetic.YES_NO_QUESTIONS.items()
    }
    seen_word = {
        "color": lambda scene: scene.colour,
        "count": lambda scene: synthetic.COUNT_WORDS[scene.count - 1],
        "existence": lambda scene: scene.shape,
        "position": synthetic.filled_cells,
    }
    yes_no_verdicts, kinds = [], set()
    rounds = ("mcq", "mcq", yes_no, yes_no, "short")
    for scene, prompt, reply in _rounds(benchmark_rounds=rounds):
        if prompt.endswith(yes_no_tail):
            ((kind, value),) = [
                (k, m.group(1)) for k, p in patterns.items() if (m := p.match(prompt))
            ]
            verdict = "Yes" if _holds(scene, kind, value) else "No"
            read = yes_no == "yes_no_read"
            expected = f"{seen_word[kind](scene)} {verdict}" if read else verdict
            assert reply == expected, (scene, prompt, reply)
            assert YOrN_Extraction(reply) == verdict, reply
            yes_no_verdicts.append(verdict)
            kinds.add(kind)
        elif prompt.endswith("\n" + prompts.SHORT_ANSWER_INSTRUCTION):
            question = prompt.split("\n")[0]
            (kind,) = [k for k, qs in synthetic.QUESTIONS.items() if question in qs]
            expected = {
                "colour": scene.colour,
                "shape": scene.shape,
                "count": synthetic.COUNT_WORDS[scene.count - 1],
            }[kind]
            assert reply == expected, (scene, prompt, reply)
    assert kinds == set(synthetic.YES_NO_QUESTIONS)
    assert 0.45 < yes_no_verdicts.count("Yes") / len(yes_no_verdicts) < 0.55  # "always Yes": half


def test_yes_no_read_asks_what_yes_no_asks():
    """The two yes/no formats draw the same scenes, questions and verdicts from the same seed:
    only the answer's text differs, so switching format changes nothing else of the data."""
    plain = list(_rounds(samples=300, benchmark_rounds=("yes_no", "short")))
    read = list(_rounds(samples=300, benchmark_rounds=("yes_no_read", "short")))
    assert [(s, p) for s, p, _ in plain] == [(s, p) for s, p, _ in read]
    assert [r.split()[-1] for _, _, r in plain] == [r.split()[-1] for _, _, r in read]
    assert sum(a != b for (_, _, a), (_, _, b) in zip(plain, read, strict=True)) > 100


def test_benchmark_images_are_not_training_images(tiny_dir, tmp_path):
    import base64
    import io

    import pandas as pd
    from PIL import Image

    from llava_moslora.eval.tiny_bench import image_key, write_tiny_bench

    write_tiny_bench(tmp_path)
    bench = {
        image_key(Image.open(io.BytesIO(base64.b64decode(b64))))
        for tsv in tmp_path.glob("*.tsv")
        for b64 in pd.read_csv(tsv, sep="\t")["image"]
        if len(str(b64)) > 64  # the others name the row holding the image
    }
    train = {image_key(Image.open(p)) for p in (tiny_dir / "data" / "images").glob("*.png")}
    assert len(bench) > 20 and len(train) == 320
    assert not bench & train


def _bench_prompts(lmu_data: Path) -> list[str]:
    """The text of every tiny benchmark question, laid out as the eval model lays it out."""
    import pandas as pd

    from llava_moslora.eval.benchmarks import TINY, TINY_TYPE

    laid_out = []
    for name in TINY:
        for row in pd.read_csv(lmu_data / f"{name}.tsv", sep="\t").to_dict("records"):
            if TINY_TYPE[name] == "MCQ":
                options = {x: row[x] for x in OPTION_LETTERS if x in row and not pd.isna(row[x])}
                lang = "cn" if name.endswith("_CN") else "en"
                laid_out.append(prompts.mcq_prompt(row["question"], options, lang))
            else:
                laid_out.append(prompts.short_answer_prompt(row["question"]))
    return laid_out


def test_every_benchmark_prompt_is_a_training_prompt_in_whole_tokens_seen_in_training(
    tiny_dir, tmp_path
):
    from transformers import AutoTokenizer

    from llava_moslora.eval.tiny_bench import write_tiny_bench

    write_tiny_bench(tmp_path)
    bench = _bench_prompts(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llm")
    records = json.loads((tiny_dir / "data" / "tiny_llava.json").read_text())
    train_prompts = {
        t["value"].removeprefix("<image>\n")
        for r in records
        for t in r["conversations"]
        if t["from"] == "human"
    }
    train_ids = {
        i
        for r in records
        for t in r["conversations"]
        for i in tokenizer.encode(t["value"].replace("<image>", ""), add_special_tokens=False)
    }
    # Yes/no and short-answer prompts verbatim; MCQ ones differ from training only in options.
    plain = [p for p in bench if "\nA. " not in p]
    assert len(plain) > 20 and set(plain) <= train_prompts
    for prompt in bench:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        assert tokenizer.decode(ids) == prompt
        pieces = [tokenizer.decode([i]) for i in ids]
        assert "\ufffd" not in "".join(pieces), pieces  # no word left as loose UTF-8 bytes
        assert set(ids) <= train_ids, set(ids) - train_ids  # no embedding training never read


# --- CPU shims --------------------------------------------------------------------------------


@needs_no_cuda
def test_shim_cpu_is_bf16_supported(monkeypatch):
    from xtuner.utils.device import get_torch_device

    monkeypatch.delattr(torch.cpu, "is_bf16_supported", raising=False)
    with pytest.raises(AttributeError, match="is_bf16_supported"):
        get_torch_device().is_bf16_supported()
    cpu_shims.cpu_is_bf16_supported()
    assert get_torch_device().is_bf16_supported() is False


@needs_no_cuda
def test_shim_cuda_set_device_without_cuda(monkeypatch):
    def unpatched(device):
        raise RuntimeError("Found no NVIDIA driver on your system.")

    monkeypatch.setattr(torch.cuda, "set_device", unpatched)
    cpu_shims.cuda_set_device_without_cuda()
    torch.cuda.set_device(0)  # what mmengine's init_dist does under torchrun: now a no-op
    cpu_shims.cuda_set_device_without_cuda()  # idempotent: wraps once
    assert torch.cuda.set_device.__wrapped__ is unpatched


@needs_no_cuda
def test_shim_llava_dataset_map_processes(monkeypatch):
    import xtuner.dataset.llava as llava

    calls = []
    monkeypatch.setattr(llava, "process_hf_dataset", lambda **kwargs: calls.append(kwargs))
    cpu_shims.llava_dataset_map_processes()
    llava.process_hf_dataset(max_length=8)
    llava.process_hf_dataset(max_length=8, map_num_proc=5)
    assert calls == [
        {"max_length": 8, "map_num_proc": min(32, os.cpu_count() or 1)},
        {"max_length": 8, "map_num_proc": 5},  # an explicit choice is kept
    ]


@needs_no_cuda
@pytest.mark.slow  # imports DeepSpeed (~30 s) and JIT-builds its CPU comm op on first use
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is not None, reason="MPI is installed")
def test_shim_deepspeed_single_process_group(monkeypatch):
    from deepspeed.comm import comm

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # Start unpatched (a config parsed earlier in this session may have applied the shims).
    unpatched = getattr(comm.mpi_discovery, "__wrapped__", comm.mpi_discovery)
    monkeypatch.setattr(comm, "mpi_discovery", unpatched)  # restored afterwards
    monkeypatch.setattr(comm, "cdb", None)
    assert not torch.distributed.is_initialized()
    with pytest.raises(ModuleNotFoundError, match="mpi4py"):
        comm.init_distributed(dist_backend="gloo")  # what `deepspeed.initialize` does unpatched

    cpu_shims.deepspeed_single_process_group()
    cpu_shims.deepspeed_single_process_group()  # idempotent: wraps once
    assert comm.mpi_discovery.__wrapped__ is unpatched
    try:
        comm.init_distributed(dist_backend="gloo")
        assert comm.is_initialized() and (comm.get_world_size(), comm.get_rank()) == (1, 0)
    finally:
        torch.distributed.destroy_process_group()


@needs_no_cuda
@pytest.mark.slow  # imports DeepSpeed (~30 s)
def test_shim_deepspeed_fp32_on_cpu_wraps_xtuners_strategy_once(monkeypatch):
    from xtuner.engine._strategy import deepspeed as xtuner_deepspeed

    strategy = xtuner_deepspeed.DeepSpeedStrategy
    unpatched = getattr(strategy.__init__, "__wrapped__", strategy.__init__)
    monkeypatch.setattr(strategy, "__init__", unpatched)  # restored afterwards
    cpu_shims.deepspeed_fp32_on_cpu()
    cpu_shims.deepspeed_fp32_on_cpu()  # idempotent: wraps once
    assert strategy.__init__.__wrapped__ is unpatched
    # (mmengine registers DeepSpeed's optimizers in every DeepSpeedStrategy.__init__ and refuses
    # to do it twice: one strategy per process; the branches are tested below, without it.)


@pytest.mark.parametrize("cpu_has_fp16", [False, True], ids=["cpu_without_fp16", "cpu_with_fp16"])
def test_shim_deepspeed_fp32_on_cpu_turns_fp16_off_only_where_unsupported(
    monkeypatch, cpu_has_fp16
):
    """Both branches on any CPU: DeepSpeed's CPU accelerator runs fp16 only on AVX512-FP16/AMX
    CPUs, so its answer is forced here, and the config XTuner's preset gives is checked."""
    from xtuner.configs import cfgs_name_path
    from xtuner.tools.utils import auto_dtype_of_deepspeed_config

    monkeypatch.setattr(torch.cpu, "is_bf16_supported", lambda **_: False, raising=False)
    preset = json.loads(Path(cfgs_name_path["deepspeed_zero2"]).read_text())
    config = auto_dtype_of_deepspeed_config(preset)  # what `xtuner train --deepspeed` does
    assert config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False

    monkeypatch.setattr(cpu_shims, "deepspeed_supports_fp16", lambda: cpu_has_fp16)
    seen = {}

    def original(self, *args, config=None, **kwargs):
        seen["config"] = config

    cpu_shims.fp32_where_fp16_unsupported(original)(object(), config=config)
    if cpu_has_fp16:
        assert seen["config"] is config  # left as XTuner made it: this CPU trains in fp16
    else:
        assert seen["config"]["fp16"] == {"enabled": False, "initial_scale_power": 16}
        assert {k: v for k, v in seen["config"].items() if k != "fp16"} == {
            k: v for k, v in config.items() if k != "fp16"
        }  # nothing else changed
    assert config["fp16"]["enabled"] is True  # the caller's dict is left alone


@needs_no_cuda
@pytest.mark.parametrize("cpu_has_avx512bf16", [False, True], ids=["cpu_without", "cpu_with"])
def test_shim_bnb_standard_4bit_layout_on_cpu(monkeypatch, cpu_has_avx512bf16):
    """Both branches on any CPU (the capability is forced): unshimmed, bitsandbytes repacks a
    `Linear4bit` weight at its first eval forward without grad exactly where the CPU has
    AVX512-BF16, which a ZeRO-3 checkpoint save then cannot undo; shimmed, it never does."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import modules

    def layer_after_eval_forward() -> torch.nn.Module:
        torch.manual_seed(0)
        layer = bnb.nn.Linear4bit(128, 128, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to("cpu").eval()  # quantizes
        with torch.no_grad():
            layer(torch.randn(2, 128))  # what EvaluateChatHook does before training
        return layer

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: cpu_has_avx512bf16)
    repacked = layer_after_eval_forward()
    assert bool(getattr(repacked.weight.quant_state, "packing_format_for_cpu", False)) is (
        cpu_has_avx512bf16
    )

    cpu_shims.bnb_standard_4bit_layout_on_cpu()
    cpu_shims.bnb_standard_4bit_layout_on_cpu()  # idempotent
    assert modules.has_avx512bf16._cpu_shim is True
    standard = layer_after_eval_forward()
    assert standard.support_avx512bf16_for_cpu is False
    assert not getattr(standard.weight.quant_state, "packing_format_for_cpu", False)
    assert standard.weight.dtype == torch.uint8 and standard.weight.shape == (128 * 128 // 2, 1)


# --- xtuner train -----------------------------------------------------------------------------


@pytest.mark.slow
def test_xtuner_train_tiny_moslora(tiny_dir, tmp_path):
    work_dir = tmp_path / "work"
    run_train("tiny_moslora", tiny_dir, work_dir)  # checks that it trained

    (scalars,) = work_dir.glob("*/vis_data/scalars.json")
    losses = [
        row["loss"] for row in map(json.loads, scalars.read_text().splitlines()) if "loss" in row
    ]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses  # ~6.0 -> ~1.7 measured

    checkpoint = Path((work_dir / "last_checkpoint").read_text().strip())
    state = load_checkpoint_file(checkpoint)["state_dict"]  # read as data: no code runs
    assert_both_towers_have_mixers(state)
    mixers = {k: v for k, v in state.items() if "lora_mixer" in k}

    # The mixers were learned: they moved between the last two checkpoints.
    earlier = sorted(work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))[-2]
    before = load_checkpoint_file(earlier)["state_dict"]
    moved = {k for k in mixers if not torch.equal(before[k], mixers[k])}
    assert moved == set(mixers)  # every mixer of both towers learns
