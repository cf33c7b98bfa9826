"""Hostile but fair inputs (issue 13, item 6): each is refused with one clear line naming the file
or field, what is wrong and the fix; never a traceback, never a lost input file.

CLI paths run `llava_moslora.cli.main([...])` in-process and check the exit code and that stderr
holds exactly one `error:` line and no traceback. Every test is fast: no training, no VLMEvalKit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

from llava_moslora.cli import main
from llava_moslora.data import synthetic
from llava_moslora.export.manifest import MANIFEST_NAME
from llava_moslora.moslora import load_adapter, moslora_config, save_adapter
from llava_moslora.moslora.safety import CorruptCheckpointError
from tests.factories import TINY_MOSLORA, make_mlp, make_tiny_llama

MLP_TARGETS = ["lin0", "lin1"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal before and after means nothing was lost."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_error_line(capsys) -> str:
    """The CLI's stderr: exactly one `error:` line and no traceback; returns it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- corrupt or truncated files ---------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"not a checkpoint at all\n" * 4, b"", "truncated"],
    ids=["garbage", "empty", "truncated"],
)
def test_export_of_a_corrupt_pth_says_corrupt_naming_the_file(tiny_env, tmp_path, capsys, content):
    ckpt = tmp_path / "iter_1.pth"
    if content == "truncated":
        torch.save({"state_dict": {"x": torch.ones(4096)}}, ckpt)
        content = ckpt.read_bytes()[:-2000]
    ckpt.write_bytes(content)
    out = tmp_path / "out"
    code = main(["export", str(ckpt), str(out), "--config", TINY_MOSLORA, "--to", "xtuner"])
    line = one_error_line(capsys)
    assert code == 1
    assert f"{ckpt} is not a readable torch checkpoint" in line
    assert "truncated or corrupt. Copy it again or use an earlier checkpoint" in line
    assert ckpt.read_bytes() == content and not out.exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{not json", "is not valid JSON"), ("[1, 2]", "should hold a JSON object but holds a list")],
)
def test_eval_refuses_a_manifest_that_is_not_a_json_object(tmp_path, capsys, text, problem):
    export = tmp_path / "export"
    export.mkdir()
    (export / MANIFEST_NAME).write_text(text)
    before = snapshot(export)
    work = tmp_path / "work"
    code = main(["eval", str(export), "--suite", "tiny", "--work-dir", str(work)])
    line = one_error_line(capsys)
    assert code == 2
    assert f"{export / MANIFEST_NAME} {problem}" in line
    assert "export the checkpoint again" in line
    assert snapshot(export) == before and not work.exists()


def saved_moslora_adapter(folder: Path) -> Path:
    model = get_peft_model(make_mlp(), moslora_config(r=4, target_modules=MLP_TARGETS))
    save_adapter(model, folder)
    return folder


def test_load_adapter_refuses_a_corrupt_moslora_config(tmp_path):
    adapter = saved_moslora_adapter(tmp_path / "adapter")
    options = adapter / "moslora_config.json"
    options.write_text('{"init": "kaiming", ')  # cut short
    before = snapshot(adapter)
    with pytest.raises(
        ValueError, match=r"moslora_config.json is not valid JSON .*save the adapter"
    ):
        load_adapter(make_mlp(), adapter)
    options.write_text('{"init": "kaiming", "mixer_rank": 3}')
    with pytest.raises(
        ValueError, match=r"moslora_config.json has unknown field\(s\) 'mixer_rank'"
    ):
        load_adapter(make_mlp(), adapter)
    options.write_text('{"init": "zero"}')
    with pytest.raises(ValueError, match=r"moslora_config.json: `mixer_init` should not be 'zero'"):
        load_adapter(make_mlp(), adapter)
    assert snapshot(adapter).keys() == before.keys()


def test_load_adapter_refuses_a_corrupt_safetensors_naming_it(tmp_path):
    adapter = saved_moslora_adapter(tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(adapter)
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"{weights} is not a readable safetensors file .*truncated or corrupt. Copy it again",
    ):
        load_adapter(make_mlp(), adapter)
    assert snapshot(adapter) == before


# --- report: garbage results files ------------------------------------------------------------


def write_run(folder: Path, benchmarks: dict) -> Path:
    folder.mkdir(parents=True)
    summary = {"run": folder.name, "benchmarks": benchmarks, "manifest": {}}
    (folder / "llava_moslora_results.json").write_text(json.dumps(summary))  # NaN as JSON NaN
    return folder


@pytest.mark.parametrize(
    ("name", "score"),
    [("MMBench_DEV_EN", math.nan), ("AI2D_TEST", 140.0), ("MME", 3000.0), ("SEEDBench_IMG", -1)],
)
def test_report_refuses_an_impossible_score_naming_run_and_benchmark(tmp_path, capsys, name, score):
    run = write_run(tmp_path / "run_a", {name: {"status": "scored", "score": score, "unit": "%"}})
    before = snapshot(run)
    out = tmp_path / "table"
    code = main(["report", str(run), "--out", str(out)])
    line = one_error_line(capsys)
    assert code == 2
    top = "2800" if name == "MME" else "100"
    assert f"{run / 'llava_moslora_results.json'}: the {name} score is {score!r}" in line
    assert f"should be a number from 0 to {top}" in line and f"or leave {run} out" in line
    assert snapshot(run) == before and not out.with_suffix(".md").exists()


def test_report_accepts_mme_up_to_2800(tmp_path, capsys):
    run = write_run(tmp_path / "run_a", {"MME": {"status": "scored", "score": 2800.0}})
    assert main(["report", str(run), "--out", str(tmp_path / "table")]) == 0
    assert "| 100.0 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{oops", "is not valid JSON"),
        ('"text"', "should hold a JSON object but holds a str"),
        ('{"run": "x"}', "has no `benchmarks` object"),
    ],
)
def test_report_refuses_a_results_file_that_is_not_a_results_object(
    tmp_path, capsys, text, problem
):
    run = tmp_path / "run_a"
    run.mkdir()
    (run / "llava_moslora_results.json").write_text(text)
    code = main(["report", str(run), "--out", str(tmp_path / "table")])
    line = one_error_line(capsys)
    assert code == 2 and f"{run / 'llava_moslora_results.json'} {problem}" in line
    assert (run / "llava_moslora_results.json").read_text() == text


# --- MoSLoRA options --------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -4, 2.5, True, "8"])
def test_r_must_be_a_positive_int(r):
    with pytest.raises(
        ValueError,
        match=rf"`r` should be a positive integer value but the value passed is {r!r}\. Use",
    ):
        moslora_config(r=r, target_modules=MLP_TARGETS)


@pytest.mark.parametrize("alpha", [0, -16, math.nan])
def test_lora_alpha_must_be_positive(alpha):
    with pytest.raises(
        ValueError,
        match=rf"`lora_alpha` should be a positive number but the value passed is {alpha}",
    ):
        moslora_config(r=4, lora_alpha=alpha, target_modules=MLP_TARGETS)


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.lin0 = nn.Linear(16, 16)


def test_a_target_moslora_cannot_wrap_is_refused_not_given_plain_lora():
    with pytest.raises(
        ValueError,
        match=r"`target_modules` matched `embed` \(Embedding\), but MoSLoRA wraps only nn.Linear "
        r"layers .*silently get plain LoRA. Leave it out of `target_modules`",
    ):
        get_peft_model(WithEmbedding(), moslora_config(r=4, target_modules=["embed", "lin0"]))
    # The linear layers alone still get MoSLoRA.
    peft_model = get_peft_model(WithEmbedding(), moslora_config(r=4, target_modules=["lin0"]))
    assert hasattr(peft_model.base_model.model.lin0, "lora_mixer")


# --- check-data -------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A 3-sample LLaVA JSON with its images/ folder."""
    return synthetic.write_dataset(tmp_path / "data", samples=3)


def check_data_cli(data: Path, images: Path) -> int:
    return main(["check-data", "--data", str(data), "--images", str(images), "--no-progress"])


def test_check_data_refuses_an_empty_dataset(tmp_path, capsys):
    for name, text in (("empty.json", "[]"), ("empty.jsonl", "\n\n")):
        data = tmp_path / name
        data.write_text(text)
        assert check_data_cli(data, tmp_path) == 1
        line = one_error_line(capsys)
        assert f"`data_path` {str(data)!r} holds no samples: there is nothing to train on" in line
        assert data.read_text() == text


def test_check_data_reports_image_paths_outside_the_folder_as_their_own_kind(
    dataset, tmp_path, capsys
):
    records = json.loads(dataset.read_text())
    outside = tmp_path / "secret.png"
    outside.write_bytes((dataset.parent / "images" / "000000.png").read_bytes())
    records[0]["image"] = "../../secret.png"  # exists, but outside --images
    records[1]["image"] = str(outside)  # absolute
    dataset.write_text(json.dumps(records))
    before = snapshot(tmp_path)
    assert check_data_cli(dataset, dataset.parent / "images") == 1
    out = capsys.readouterr().out
    assert "image_outside_folder: 2 (the `image` path leads outside the image folder" in out
    assert "'../../secret.png' resolves to" in out and "missing_image" not in out
    assert snapshot(tmp_path) == before


def test_check_data_says_once_that_images_is_not_a_folder(dataset, tmp_path, capsys):
    not_a_folder = tmp_path / "images.zip"
    not_a_folder.write_bytes(b"PK")
    assert check_data_cli(dataset, not_a_folder) == 1
    line = one_error_line(capsys)  # one line, not one per sample
    assert f"`image_folder` (`--images`) {str(not_a_folder)!r} is not a folder" in line
    assert "3 distinct image path(s)" in line and "Pass the folder the `image` paths" in line


def test_check_data_names_the_broken_line_of_a_jsonl(dataset, tmp_path, capsys):
    records = json.loads(dataset.read_text())
    lines = [json.dumps(r) for r in records]
    lines.insert(1, "")  # blank lines count: the error names the file's own line number
    lines[2] = lines[2][:-5]  # line 3 cut short
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert check_data_cli(data, dataset.parent / "images") == 1
    line = one_error_line(capsys)
    assert f"`data_path` {str(data)!r} is not valid JSON at line 3: " in line
    assert "re-download or repair it" in line


# --- eval --run-name, make-tiny --samples -----------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "."])
def test_eval_run_name_stays_inside_the_work_dir(tmp_path, capsys, name):
    work = tmp_path / "work"
    args = ["--suite", "tiny", "--work-dir", str(work), "--run-name", name]
    code = main(["eval", str(tmp_path / "export"), *args])
    line = one_error_line(capsys)
    assert code == 2
    assert "`--run-name` should be a plain folder name inside `--work-dir`" in line
    assert f"the value passed is {name!r}: no path separators" in line
    assert not work.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_make_tiny_refuses_zero_samples_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["make-tiny", str(out), "--samples", "0"]) == 2
    line = one_error_line(capsys)
    assert "`samples` (`--samples`) should be a positive integer but the value passed is 0" in line
    assert not out.exists()


# --- ablate -----------------------------------------------------------------------------------


def write_config(path: Path, lr: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"lr = {lr}\nmodel = dict(r=8, targets=['q_proj', 'v_proj'])\n")
    return path


def finished_run(work: Path, config: Path):
    from llava_moslora.ablate.runner import plan, settings

    (run,) = plan(work, ["lora"], [0])
    run.dir.mkdir(parents=True)
    record = {"score": 50.0, "unit": "% held-out", "details": {"overall": 0.5}}
    record.update(variant="lora", seed=0, checkpoint="x", **settings(config, [], "heldout"))
    run.result_path.write_text(json.dumps(record))
    return run


def test_ablate_identifies_a_setting_by_config_content_not_file_name(tmp_path, capsys):
    config = write_config(tmp_path / "a" / "setting.py", lr=1e-3)
    work = tmp_path / "ablation"
    run = finished_run(work, config)
    before = run.result_path.read_text()
    base = ["ablate", "--variants", "lora", "--seeds", "1", "--work-dir", str(work), "--config"]

    # Same name, other content (edited between two runs of one work dir): refused.
    edited = write_config(tmp_path / "b" / "setting.py", lr=2e-3)
    assert main([*base, str(edited)]) == 1
    line = one_error_line(capsys)
    assert (
        f"{run.result_path} was made with `--config` 'setting.py' (resolved content sha256" in line
    )
    assert "another config content" in line and "their own `--work-dir`" in line
    # Another name, same content: the same setting, resumed.
    renamed = write_config(tmp_path / "c" / "renamed.py", lr=1e-3)
    assert main([*base, str(renamed)]) == 0
    assert run.result_path.read_text() == before


def test_ablate_refuses_a_config_it_cannot_read_before_anything_runs(tmp_path, capsys):
    config = tmp_path / "broken.py"
    config.write_text("lr = (1e-3\n")  # unclosed parenthesis
    work = tmp_path / "ablation"
    args = ["--variants", "lora", "--seeds", "1", "--work-dir", str(work)]
    assert main(["ablate", "--config", str(config), *args]) == 1
    line = one_error_line(capsys)
    assert f"`--config` {str(config)!r} cannot be read as an XTuner config (" in line
    assert config.read_text() == "lr = (1e-3\n" and not work.exists()


def test_ablate_logs_the_half_finished_run_folder_it_deletes(tmp_path):
    from llava_moslora.ablate.runner import plan, train

    config = write_config(tmp_path / "setting.py", lr=1e-3)
    (run,) = plan(tmp_path / "ablation", ["lora"], [0])
    (run.train_dir).mkdir(parents=True)
    (run.dir / "train.log").write_text("killed half-way\n")
    logged: list[str] = []
    with pytest.raises(RuntimeError, match="training lora seed 0 failed"):
        train(run, config, launcher="true", log=logged.append)  # a launcher that trains nothing
    assert logged[0] == (
        f"[lora seed 0] deleting {run.dir}: a half-finished run (no trained.json), trained again "
        "from scratch"
    )


def test_eval_names_a_corrupt_safetensors_in_the_export(tmp_path, capsys):
    from llava_moslora.export.manifest import ExportManifest, write_manifest

    export = tmp_path / "export"
    make_tiny_llama().save_pretrained(export / "llm")
    weights = export / "llm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # a copy cut short
    manifest = ExportManifest(
        format="merged-xtuner", llm=None, visual_encoder=None, prompt_template=None, system="",
        visual_select_layer=-2, pad_image_to_square=True, adapter_kind="moslora", mixer={},
        quantized_base=False, dtype="float32", config="tiny.py", checkpoint="iter_1.pth",
        seed=0, trust_remote_code=False,
    )  # fmt: skip
    write_manifest(export, manifest)
    before = snapshot(export)
    args = ["--suite", "tiny", "--work-dir", str(tmp_path / "work"), "--data-root", str(tmp_path)]
    code = main(["eval", str(export), *args, "--create-data-root"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2
    assert f"{weights} is not a readable safetensors file (" in line
    assert "truncated or corrupt. Copy it again, or export the checkpoint again." in line
    assert snapshot(export) == before


# --- train: refused before XTuner starts (issue 23, items 3 and 5) ---------------------------


def train_cli(*args: str) -> int:
    return main(["train", TINY_MOSLORA, *args])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("model.llm_lora.r=0", "`r` should be a positive integer value but the value passed is 0"),
        ("model.llm_lora.r=-1", "`r` should be a positive integer value but the value passed is -1"),
        ("model.llm_lora.r=2.5", "`r` should be a positive integer value but the value passed is 2.5"),
        ("model.llm_lora.lora_alpha=0", "`lora_alpha` should be a positive number but the value passed is 0"),
        ("model.visual_encoder_lora.lora_dropout=1.5", "`lora_dropout` should be a probability in [0, 1) but the value passed is 1.5"),
        ("model.llm_lora.mixer_init=bogus", "`mixer_init` should be one of kaiming, orthogonal, identity, normal, butterfly but the value passed is 'bogus'"),
        ("model.llm_lora.target_modules=[qproj]", "`model.llm_lora.target_modules` {'qproj'} matches no layer of"),
        ("model.llm_lora.target_modules=[embed_tokens,q_proj]", "`target_modules` matched `model.embed_tokens` (Embedding), but MoSLoRA wraps only nn.Linear"),
    ],
    ids=["r0", "r-1", "r2.5", "alpha0", "dropout1.5", "mixer_init", "unknown_target", "embedding_target"],
)  # fmt: skip
def test_train_refuses_a_bad_adapter_option_in_one_line_before_xtuner_starts(
    tiny_env, tmp_path, capsys, no_training, option, message
):
    work = tmp_path / "work"
    code = train_cli("--work-dir", str(work), "--cfg-options", option)
    line = one_error_line(capsys)
    assert code == 2 and not no_training
    assert line.startswith("error: training refused: `model.") and message in line
    assert not work.exists()


def test_train_refuses_an_adapter_rank_written_as_a_string(tiny_env):
    from llava_moslora.train.preflight import TrainInputError, check_adapters
    from tests.factories import read_config

    cfg = read_config("tiny_moslora")
    cfg.model.llm_lora.r = "8"  # a config file that quotes its rank
    with pytest.raises(TrainInputError, match=r"`model.llm_lora`: `r` should be a positive integer value but the value passed is '8'\. Use"):  # fmt: skip
        check_adapters(cfg)


def test_train_names_the_line_of_a_config_with_a_syntax_error(tmp_path, capsys, no_training):
    config = tmp_path / "broken.py"
    config.write_text("lr = 1e-3\nmodel = dict(r=8\n")
    assert main(["train", str(config), "--work-dir", str(tmp_path / "work")]) == 2
    line = one_error_line(capsys)
    assert f"`config` {config} has a syntax error at line 2" in line and "Fix the file" in line
    assert not no_training and config.read_text() == "lr = 1e-3\nmodel = dict(r=8\n"


def test_train_refuses_cfg_options_without_an_equals_sign(tiny_env, tmp_path, capsys, no_training):
    assert train_cli("--work-dir", str(tmp_path / "w"), "--cfg-options", "model.llm_lora.r") == 2
    line = one_error_line(capsys)
    assert (
        "`--cfg-options` items should be KEY=VALUE but the value passed is 'model.llm_lora.r'"
        in line
    )
    assert not no_training


@pytest.mark.parametrize(
    ("name", "value", "span"),
    [("NPROC_PER_NODE", "abc", "of at least 1"), ("NNODES", "0", "of at least 1"),
     ("NODE_RANK", "-1", "from 0 to 0"), ("PORT", "70000", "from 1 to 65535")],
)  # fmt: skip
def test_train_refuses_a_bad_launcher_environment_variable(
    tiny_env, tmp_path, capsys, monkeypatch, no_training, name, value, span
):
    monkeypatch.setenv(name, value)
    assert train_cli("--work-dir", str(tmp_path / "w")) == 2
    line = one_error_line(capsys)
    assert f"environment variable `{name}` should be an integer {span} but is {value!r}" in line
    assert "or unset it" in line and not no_training


def test_train_says_in_one_line_that_a_hub_id_cannot_be_reached_without_hf_hub_offline(
    tiny_env, tmp_path, capsys, monkeypatch, no_training
):
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    hub_id = "meta-llama/Meta-Llama-3-8B-Instruct"
    key = "model.llm.pretrained_model_name_or_path"
    assert train_cli("--work-dir", str(tmp_path / "w"), "--cfg-options", f"{key}={hub_id}") == 2
    line = one_error_line(capsys)
    assert f"`{key}` {hub_id!r} is not a local folder nor in the Hugging Face cache" in line
    assert f"huggingface-cli download {hub_id}" in line and not no_training


def test_a_changed_visual_select_layer_adapts_the_vit_layers_that_feed_it(
    tiny_env, tmp_path, no_training
):
    from llava_moslora.runs import load_config

    # the tiny CLIP's 3 layers: -2 reads layer 1's output (adapt 0-1), -1 reads layer 2's (0-2)
    assert load_config(TINY_MOSLORA).model.visual_encoder_lora.layers_to_transform == [0, 1]
    for key in ("model.visual_select_layer", "visual_select_layer"):
        cfg = load_config(TINY_MOSLORA, {key: -1})
        assert cfg.model.visual_select_layer == -1
        assert cfg.model.visual_encoder_lora.layers_to_transform == [0, 1, 2]
    # layers the user names stay as named
    chosen = {"model.visual_select_layer": -1, "model.visual_encoder_lora.layers_to_transform": [1]}
    assert load_config(TINY_MOSLORA, chosen).model.visual_encoder_lora.layers_to_transform == [1]
    # `train` hands XTuner the derived layers with the override
    assert (
        train_cli(
            "--work-dir", str(tmp_path / "w"), "--cfg-options", "model.visual_select_layer=-1"
        )
        == 0
    )
    (command,) = no_training
    assert command[-2:] == [
        "--cfg-options",
        "model.visual_encoder_lora.layers_to_transform=[0,1,2]",
    ]


# --- one work dir, one run --------------------------------------------------------------------


@pytest.fixture
def other_process():
    """A live process that is not this one (its PID holds a lock in the tests)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process.pid
    process.kill()
    process.wait()


def test_a_second_training_into_a_work_dir_in_use_is_refused(
    tiny_env, tmp_path, capsys, no_training, other_process
):
    import socket

    work = tmp_path / "work"
    work.mkdir()
    lock = work / ".llava_moslora_train.lock"
    lock.write_text(f"{other_process} {socket.gethostname()}\n")
    assert train_cli("--work-dir", str(work)) == 2
    line = one_error_line(capsys)
    assert f"`--work-dir` {work} is in use by a training: PID {other_process} on" in line
    assert "Wait for it to finish, or pass another `--work-dir`" in line
    assert not no_training and lock.read_text().split()[0] == str(other_process)


def test_a_training_into_a_work_dir_holding_another_runs_checkpoints_needs_resume(
    tiny_env, tmp_path, capsys, no_training
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "iter_40.pth").write_bytes(b"run A's checkpoint")
    (work / "last_checkpoint").write_text(str(work / "iter_40.pth"))
    before = snapshot(work)
    assert train_cli("--work-dir", str(work)) == 2
    line = one_error_line(capsys)
    assert (
        f"`--work-dir` {work} holds another run's checkpoints (iter_40.pth, last_checkpoint)"
        in line
    )
    assert "Pass `--resume` to continue that run, or another `--work-dir`" in line
    assert not no_training and snapshot(work) == before
    # resuming it is that run's own business: it starts, and the lock is gone afterwards
    assert train_cli("--work-dir", str(work), "--resume", str(work / "iter_40.pth")) == 0
    assert len(no_training) == 1 and snapshot(work) == before


def test_a_lock_left_by_a_training_that_died_is_reclaimed_with_a_message(tmp_path):
    import socket
    import subprocess
    import sys

    from llava_moslora.train.work_dir import LOCK_NAME, acquire, release

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = tmp_path / "work"
    work.mkdir()
    (work / LOCK_NAME).write_text(f"{dead.pid} {socket.gethostname()}\n")
    said: list[str] = []
    lock = acquire(work, said.append)
    assert said == [
        f"note: {lock} named training PID {dead.pid} on {socket.gethostname()}, which has "
        "ended: lock reclaimed"
    ]
    assert lock.read_text().split()[0] == str(os.getpid())
    release(lock)
    assert not lock.exists()


# --- folders: literal names, never overwrite what was not ours --------------------------------


def test_stale_cleanup_of_an_out_named_like_a_glob_leaves_other_exports_alone(tmp_path):
    import socket
    import subprocess
    import sys

    from llava_moslora.export.out_dir import MARKER_NAME, clean_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # A killed export into `exp1` left its earlier export aside, to be restored into exp1.
    saved = tmp_path / f".exp1.old-{dead.pid}"
    saved.mkdir()
    (saved / MARKER_NAME).write_text(f"{dead.pid} {socket.gethostname()}\n")
    (saved / "adapter.safetensors").write_bytes(b"exp1's earlier export")
    before = snapshot(saved)
    clean_stale(tmp_path / "exp[1]")  # `[1]` as a glob matches `1`
    assert snapshot(saved) == before and not (tmp_path / "exp[1]").exists()
    clean_stale(tmp_path / "exp1")  # its own export puts it back
    assert (tmp_path / "exp1" / "adapter.safetensors").read_bytes() == b"exp1's earlier export"


def test_make_tiny_refuses_to_overwrite_the_users_files_naming_them(tmp_path, capsys):
    out = tmp_path / "tiny"
    (out / "llm").mkdir(parents=True)
    (out / "llm" / "config.json").write_text('{"mine": true}')
    assert main(["make-tiny", str(out), "--samples", "2"]) == 2
    line = one_error_line(capsys)
    assert f"`DIR` {out} holds llm/config.json, which make-tiny did not write" in line
    assert "Choose another DIR, or pass `--overwrite`" in line
    assert snapshot(out) == {"llm/config.json": b'{"mine": true}'}
    # its own earlier output is rewritten without a flag
    (out / "llm" / "config.json").unlink()
    assert main(["make-tiny", str(out), "--samples", "2"]) == 0
    assert main(["make-tiny", str(out), "--samples", "2"]) == 0
    listed = json.loads((out / "make_tiny_files.json").read_text())["files"]
    assert "llm/config.json" in listed and "data/tiny_llava.json" in listed


# --- small data, ablate's setting ---------------------------------------------------------------


def test_the_warmup_of_a_small_dataset_is_at_least_one_step(tiny_env):
    from mmengine.registry import PARAM_SCHEDULERS

    from tests.factories import read_config

    cfg = read_config("tiny_moslora")  # warm-up 3 % of 2 epochs
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    for epoch_length, warmup_end in ((4, 1), (16, 1), (40, 2)):  # 16, 64 and 160 samples
        warmup, main_phase = (
            PARAM_SCHEDULERS.build(
                dict(scheduler), default_args=dict(optimizer=optimizer, epoch_length=epoch_length)
            )
            for scheduler in cfg.param_scheduler
        )
        assert (warmup.begin, warmup.end) == (0, warmup_end)
        assert (main_phase.begin, main_phase.end) == (warmup_end, 2 * epoch_length)


@pytest.mark.slow
def test_a_dataset_of_16_samples_trains(tiny_llava, tmp_path):
    from tests.launchers import run_train

    work = tmp_path / "work"
    run = run_train("tiny_moslora", tiny_llava(samples=16), work, launcher="llava-moslora")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "iter_8.pth").exists()  # 4 steps an epoch x 2 epochs


def test_ablate_identifies_a_setting_by_its_data_not_how_its_path_is_spelled(tmp_path, monkeypatch):
    from llava_moslora.ablate.runner import config_sha256

    data = tmp_path / "data" / "train.json"
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "0.png").write_bytes(b"an image")
    data.write_text('[{"id": 1}]')
    monkeypatch.chdir(tmp_path)

    def setting(path: str) -> str:
        config = tmp_path / "setting.py"
        folder = str(Path(path).parent)
        config.write_text(
            f"lr = 1e-3\ndata_dir = {folder!r}\ndata_path = {path!r}\n"
            f"image_folder = {folder + '/images'!r}\n"
        )
        return config_sha256(config)

    spelled = {setting(p) for p in (str(data), "data/train.json", "./data/../data/train.json")}
    assert len(spelled) == 1
    # what else lies in a folder that holds the config's folders is not the setting
    (tmp_path / "data" / "ablation").mkdir()
    (tmp_path / "data" / "ablation" / "result.json").write_text("{}")
    assert setting(str(data)) in spelled
    (tmp_path / "data" / "images" / "0.png").write_bytes(b"another image")  # regenerated
    assert setting(str(data)) not in spelled
    (tmp_path / "data" / "images" / "0.png").write_bytes(b"an image")
    assert setting(str(data)) in spelled
    data.write_text('[{"id": 2}]')  # regenerated under the same path
    assert setting(str(data)) not in spelled
