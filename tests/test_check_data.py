"""`check_data`, `llava-moslora check-data` and the CheckedLLaVADataset training gate.

One synthetic set gets one fault of each kind, on known ids; every test asserts exactly which ids
each check finds, so a check that also flags good samples fails as surely as one that misses.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from llava_moslora.cli import main
from llava_moslora.data import synthetic
from llava_moslora.data.check import DataFileError, check_data, check_records, load_records

SAMPLES = 24
MAX_LENGTH = 128  # tiny tokenizer: the clean samples use < 80 tokens, the long prompt > 300
LONG_QUESTION = "What colour are the shapes? " * 60


def inject_faults(records: list[dict], image_dir: Path) -> list[dict]:
    by_id = {r["id"]: r for r in records}
    by_id["000001"]["image"] = "gone.png"
    png = image_dir / "000002.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (image_dir / "not_an_image.jpg").write_text("this is not a JPEG\n")
    by_id["000003"]["image"] = "not_an_image.jpg"
    by_id["000004"]["conversations"][0]["value"] += "\n<image>"
    first = by_id["000005"]["conversations"][0]
    first["value"] = first["value"].replace("<image>", "").strip()
    by_id["000006"]["conversations"][1]["value"] = "  "
    turns = by_id["000007"]["conversations"]
    by_id["000007"]["conversations"] = [turns[1], turns[0]]
    by_id["000008"]["conversations"][0]["value"] = "<image>\n" + LONG_QUESTION
    duplicate = dict(records[10], id="000009")  # entry #10: a good sample with a reused id
    bad_type = dict(records[12])
    bad_type["conversations"] = [{"from": "human", "value": 7}]
    text_only = {"id": "text-13", "conversations": records[13]["conversations"]}
    out = records[:10] + [duplicate, {"id": "000011"}, bad_type, text_only] + records[14:]
    return out


EXPECTED_IDS = {
    "malformed": ["000011", "000012"],
    "duplicate_id": ["000009"],
    "missing_image": ["000001"],
    "unreadable_image": ["000002", "000003"],
    "image_token_count": ["000004", "000005"],
    "image_token_without_image": ["text-13"],
    "empty_turn": ["000006"],
    "turn_order": ["000007"],
    "too_long": ["000008"],
}
BAD_INDICES = {1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13}


@pytest.fixture(scope="module")
def tokenizer():
    from llava_moslora.builders.make_tiny import build_tokenizer, chat_texts

    return build_tokenizer(chat_texts())


@pytest.fixture(scope="module")
def template_map_fn():
    from xtuner.dataset.map_fns import template_map_fn_factory
    from xtuner.utils import PROMPT_TEMPLATE

    return template_map_fn_factory(PROMPT_TEMPLATE.llama3_chat)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return synthetic.write_dataset(tmp_path_factory.mktemp("clean"), samples=SAMPLES, seed=1)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> Path:
    data = synthetic.write_dataset(tmp_path_factory.mktemp("faulty"), samples=SAMPLES, seed=1)
    records = inject_faults(json.loads(data.read_text()), data.parent / "images")
    data.write_text(json.dumps(records))
    return data


def found_ids(report) -> dict[str, list[str]]:
    return {kind: [f.id for f in found] for kind, found in report.findings.items() if found}


def test_clean_dataset_passes(clean, tokenizer, template_map_fn):
    report = check_data(
        clean,
        clean.parent / "images",
        tokenizer=tokenizer,
        max_length=MAX_LENGTH,
        template_map_fn=template_map_fn,
    )
    assert report.ok and report.total == SAMPLES and report.images_checked == SAMPLES
    assert report.images_decoded and report.lengths_checked
    assert report.summary() == f"all {SAMPLES} samples passed"


def test_every_fault_is_found_on_exactly_its_sample(faulty, tokenizer, template_map_fn):
    report = check_data(
        faulty,
        faulty.parent / "images",
        tokenizer=tokenizer,
        max_length=MAX_LENGTH,
        template_map_fn=template_map_fn,
        workers=4,
    )
    assert found_ids(report) == EXPECTED_IDS
    assert report.bad_indices == BAD_INDICES
    assert report.counts() == {kind: len(ids) for kind, ids in EXPECTED_IDS.items()}

    detail = {f.id: f.detail for found in report.findings.values() for f in found}
    assert detail["000001"].endswith("gone.png not found")
    assert "image file is truncated" in detail["000002"]
    assert "UnidentifiedImageError" in detail["000003"]
    assert detail["000004"] == "`<image>` appears 2x in human turns; expected once, in a human turn"
    assert detail["000005"].startswith("`<image>` appears 0x in human turns")
    assert detail["000006"] == "turn(s) [1] empty"
    assert detail["000007"] == "roles are: gpt human"
    assert detail["000008"] == f"0 answer tokens within {MAX_LENGTH}"
    assert detail["000009"] == "also entry #9"
    assert detail["000011"] == "no `conversations`"
    assert detail["000012"] == "turn 0 `value` should be a string, got int"

    summary = report.summary(first=1)
    assert summary.startswith(f"{len(BAD_INDICES)} of {SAMPLES} samples have errors:")
    assert "  unreadable_image: 2 (" in summary and "first ids: 000002, ..." in summary
    assert "OCR-VQA" in summary  # the missing-image fix names the known .gif/.png misnaming


def test_skip_decode_and_no_tokenizer_check_less(faulty):
    report = check_data(faulty, faulty.parent / "images", decode_images=False)
    expected = {k: v for k, v in EXPECTED_IDS.items() if k not in ("unreadable_image", "too_long")}
    assert found_ids(report) == expected
    assert not report.images_decoded and not report.lengths_checked


def test_missing_image_under_another_suffix_is_named(tmp_path):
    # LLaVA's OCR-VQA download: the JSON says .jpg, the file on disk is a GIF named .gif.
    data = synthetic.write_dataset(tmp_path, samples=2)
    records = json.loads(data.read_text())
    (tmp_path / "images/000001.png").rename(tmp_path / "images/000001.gif")
    report = check_records(records, tmp_path / "images", decode_images=False)
    (finding,) = report.findings["missing_image"]
    assert finding.id == "000001" and finding.detail.endswith("not found; found as 000001.gif")


def test_image_only_prompt_is_fine_and_int_ids_are_strings(clean):
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red circle."}]
    records = [
        {"id": 1, "image": "000000.png", "conversations": turns},
        {"id": "1", "image": "000001.png", "conversations": turns},  # XTuner makes 1 into "1"
    ]
    report = check_records(records, clean.parent / "images")
    assert found_ids(report) == {"duplicate_id": ["1"]}


def test_length_check_counts_what_xtuner_encodes(faulty, tokenizer, template_map_fn):
    """`answer_tokens_kept` is XTuner's own encoding, truncated where XTuner truncates."""
    import copy

    from xtuner.dataset.map_fns import llava_map_fn
    from xtuner.dataset.utils import encode_fn

    from llava_moslora.data.check import answer_tokens_kept

    record = json.loads(faulty.read_text())[0]  # a clean sample
    example = copy.deepcopy(record)
    example.update(llava_map_fn(example))
    example.update(template_map_fn(example))
    labels = encode_fn(example, tokenizer, 10**6, with_image_token=True)["labels"]
    answers = sum(label >= 0 for label in labels)
    assert answers > 0 and labels[-1] >= 0  # llama3_chat: the turn ends in <|eot_id|>, with loss

    def kept(max_length: int, image_tokens: int = 1) -> int:
        return answer_tokens_kept(
            record,
            tokenizer,
            max_length,
            dataset_map_fn=llava_map_fn,
            template_map_fn=template_map_fn,
            image_tokens=image_tokens,
        )

    assert kept(len(labels)) == answers
    assert kept(len(labels) - 1) == answers - 1
    # 16 image positions instead of XTuner's one placeholder take 15 more of the budget.
    assert kept(len(labels) + 15, image_tokens=16) == answers
    assert kept(len(labels) + 14, image_tokens=16) == answers - 1
    first_answer = next(i for i, label in enumerate(labels) if label >= 0)
    assert kept(first_answer) == 0 and kept(first_answer + 1) == 1


def test_tokenizing_in_processes_finds_the_same(clean, tokenizer, template_map_fn):
    # 1,200 samples: three chunks of 512, so two worker processes really split the work.
    records = json.loads(clean.read_text())
    many = [dict(records[i % SAMPLES], id=f"s{i}") for i in range(1200)]
    many[777] = dict(
        many[777],
        conversations=[
            {"from": "human", "value": "<image>\n" + LONG_QUESTION},
            {"from": "gpt", "value": "Red."},
        ],
    )
    kwargs = dict(
        tokenizer=tokenizer,
        max_length=MAX_LENGTH,
        template_map_fn=template_map_fn,
        decode_images=False,
    )
    serial = check_records(many, clean.parent / "images", tokenize_workers=1, **kwargs)
    forked = check_records(many, clean.parent / "images", tokenize_workers=2, **kwargs)
    assert found_ids(serial) == found_ids(forked) == {"too_long": ["s777"]}


def test_argument_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"`tokenizer` and `max_length` go together"):
        check_records([], tmp_path, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"`image_tokens` should be a positive integer, got 0"):
        check_records([], tmp_path, image_tokens=0)
    with pytest.raises(DataFileError, match=r"should end in .json or .jsonl"):
        load_records(tmp_path / "data.csv")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "1", ')
    with pytest.raises(DataFileError, match=r"is not valid JSON: .*re-download or repair it"):
        load_records(broken)
    broken.write_text('{"id": "1"}')
    with pytest.raises(DataFileError, match=r"should hold a JSON list of samples, got a dict"):
        load_records(broken)


# --- the training gate ------------------------------------------------------------------------


@pytest.fixture
def dataset_kwargs(tokenizer, template_map_fn, monkeypatch):
    import xtuner.dataset.llava as llava
    from transformers import CLIPImageProcessor
    from xtuner.dataset.map_fns import llava_map_fn

    # LLaVADataset tokenizes with 32 `datasets` processes; in-process is faster for 24 samples.
    monkeypatch.setattr(
        llava, "process_hf_dataset", functools.partial(llava.process_hf_dataset, map_num_proc=1)
    )
    return dict(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
        ),
        tokenizer=tokenizer,
        dataset_map_fn=llava_map_fn,
        template_map_fn=template_map_fn,
        max_length=MAX_LENGTH,
        pad_image_to_square=True,
    )


def test_dataset_refuses_bad_data(faulty, dataset_kwargs):
    from llava_moslora.data.dataset import BadSamplesError, CheckedLLaVADataset

    with pytest.raises(BadSamplesError) as raised:
        CheckedLLaVADataset(
            data_path=str(faulty), image_folder=str(faulty.parent / "images"), **dataset_kwargs
        )
    message = str(raised.value)
    assert message.startswith(f"`data_path` '{faulty}' with `image_folder`")
    assert f"{len(BAD_INDICES)} of {SAMPLES} samples have errors:" in message
    assert "  missing_image: 1 (" in message and "first ids: 000001" in message
    assert "  too_long: 1 (" in message
    assert f'set `on_bad_samples="drop"` in llava_dataset to train on the {SAMPLES - 12} good' in (
        message
    )


def test_dataset_drops_exactly_the_bad_samples(faulty, dataset_kwargs):
    from llava_moslora.data.dataset import CheckedLLaVADataset

    dataset = CheckedLLaVADataset(
        data_path=str(faulty),
        image_folder=str(faulty.parent / "images"),
        on_bad_samples="drop",
        **dataset_kwargs,
    )
    records = json.loads(faulty.read_text())
    good_ids = [r["id"] for i, r in enumerate(records) if i not in BAD_INDICES]
    assert len(dataset) == SAMPLES - len(BAD_INDICES)
    assert list(dataset.text_data["id"]) == good_ids
    assert dataset.dropped_ids == ["000001", "000002", "000003", "000004", "000005", "000006"] + [
        "000007",
        "000008",
        "000009",
        "000011",
        "000012",
        "text-13",
    ]
    item = dataset[0]  # the kept samples really load: image decoded and preprocessed
    assert tuple(item["pixel_values"].shape) == (3, 56, 56)


def test_dataset_passes_clean_data_and_rejects_unknown_mode(clean, dataset_kwargs):
    from llava_moslora.data.dataset import CheckedLLaVADataset

    dataset = CheckedLLaVADataset(
        data_path=str(clean), image_folder=str(clean.parent / "images"), **dataset_kwargs
    )
    assert len(dataset) == SAMPLES and dataset.data_report.ok and dataset.dropped_ids == []
    with pytest.raises(ValueError, match=r"`on_bad_samples` should be one of \('error', 'drop'\)"):
        CheckedLLaVADataset(
            data_path=str(clean), image_folder="x", on_bad_samples="skip", **dataset_kwargs
        )


def test_dataset_checks_on_rank_0_and_shares_the_result(faulty, dataset_kwargs, tmp_path):
    import torch.distributed as dist

    from llava_moslora.data.dataset import BadSamplesError, CheckedLLaVADataset

    paths = dict(data_path=str(faulty), image_folder=str(faulty.parent / "images"))
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        with pytest.raises(BadSamplesError, match=r"12 of 24 samples have errors"):
            CheckedLLaVADataset(**paths, **dataset_kwargs)  # the error crosses the broadcast
        dataset = CheckedLLaVADataset(**paths, on_bad_samples="drop", **dataset_kwargs)
        assert len(dataset) == SAMPLES - len(BAD_INDICES)
    finally:
        dist.destroy_process_group()


def test_base_config_uses_the_gate():
    from mmengine.config import Config

    from llava_moslora.data.dataset import CheckedLLaVADataset

    root = Path(__file__).resolve().parent.parent / "configs"
    for name in ("llama3_moslora", "tiny_moslora"):
        dataset = Config.fromfile(str(root / f"{name}.py")).train_dataloader.dataset
        assert dataset.type is CheckedLLaVADataset and dataset.on_bad_samples == "error"


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_check_data(faulty, clean, tokenizer, tmp_path, capsys):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    args = ["--tokenizer", str(tokenizer_dir), "--max-length", str(MAX_LENGTH), "--no-progress"]

    assert main(["check-data", "--data", str(clean), "--images", str(clean.parent / "images")]) == 0
    out = capsys.readouterr().out
    assert f"checked {SAMPLES} samples, {SAMPLES} distinct images (images decoded" in out
    assert out.rstrip().endswith(f"all {SAMPLES} samples passed")

    images = str(faulty.parent / "images")
    assert main(["check-data", "--data", str(faulty), "--images", images, *args]) == 1
    out = capsys.readouterr().out
    assert "lengths checked" in out and " samples/s)" in out
    for kind, ids in EXPECTED_IDS.items():
        assert f"  {kind}: {len(ids)} (" in out
        assert f"first ids: {', '.join(ids)}\n" in out

    skip = ["--skip-image-decode", "--no-progress"]
    assert main(["check-data", "--data", str(faulty), "--images", images, *skip]) == 1
    out = capsys.readouterr().out
    assert "images found (not decoded)" in out and "unreadable_image" not in out

    assert main(["check-data", "--data", str(faulty), "--images", images, *args[:2]]) == 2
    assert "`--tokenizer` and `--max-length` go together" in capsys.readouterr().err
    bad_template = [*args, "--template", "nope"]
    assert main(["check-data", "--data", str(faulty), "--images", images, *bad_template]) == 2
    assert "`--template` should be one of" in capsys.readouterr().err
    assert main(["check-data", "--data", str(tmp_path / "no.json"), "--images", images]) == 1
    assert "does not exist" in capsys.readouterr().err
