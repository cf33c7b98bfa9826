"""Safe by construction (issues 13 and 23): checkpoints are data, exports never destroy inputs,
diverged or mislabelled adapters never pass, offline stays offline, stock tools read hf-llava
exports right; no allowed global reaches other objects, every file from outside (resume,
`pretrained_pth`, DeepSpeed folders, adapters) is read as data, and what export writes is finite.

Each test fails without its fix: the payload tests assert the payload's file is never written, the
overwrite tests that every file survives, the refusals pin their message.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_moslora.cli import main
from llava_moslora.export import MANIFEST_NAME, export, read_manifest
from llava_moslora.moslora import load_adapter, save_adapter
from llava_moslora.moslora.safety import (
    NonFiniteTensorError,
    UnsafeCheckpointError,
    safe_torch_load,
)
from llava_moslora.runs import CheckpointMismatchError, build_model, load_config
from llava_moslora.train.checkpoints import load_checkpoint_file, load_trained_state
from tests.factories import (
    FP32_ATOL,
    LLAMA_TARGETS,
    TINY_MOSLORA,
    llava_model_logits,
    make_tiny_llama,
    max_diff,
    randomise_trained_tensors,
    save_mmengine_checkpoint,
    trained_moslora,
)


class Payload:
    """A pickle that writes `marker` when it is unpickled: what a hostile checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


SYSTEM_GLOBAL = f"{os.system.__module__}.system"  # posix.system on Linux


# --- 1. checkpoints are data ------------------------------------------------------------------


def test_export_of_a_pth_with_a_payload_never_runs_it(tiny_env, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {"x": torch.ones(1)}, "meta": Payload(marker)}, evil)
    out = tmp_path / "out"
    code = main(["export", str(evil), str(out), "--config", TINY_MOSLORA, "--to", "xtuner"])
    err = capsys.readouterr().err
    assert code == 1
    assert not marker.exists() and not out.exists()
    assert f"{evil} asks to load `{SYSTEM_GLOBAL}`" in err
    assert (
        "Traceback" not in err and len([line for line in err.splitlines() if "error" in line]) == 1
    )


def test_deepspeed_folder_with_a_payload_never_runs_it(tmp_path):
    """zero_to_fp32 loads with weights_only=False itself: its loads go through the safe loader."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "work" / "iter_2.pth"
    folder.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"payload": Payload(marker)}, folder / name)
    with pytest.raises(
        UnsafeCheckpointError, match=rf"iter_2\.pth/.*asks to load `{SYSTEM_GLOBAL}`"
    ):
        load_trained_state(folder)
    assert not marker.exists()
    from deepspeed.utils import zero_to_fp32

    assert zero_to_fp32.torch is torch  # the swap is undone


def test_adapter_bin_with_a_payload_never_runs_it(tmp_path):
    marker = tmp_path / "pwned"
    _, peft_model = trained_moslora()
    save_adapter(peft_model, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    torch.save({"x": Payload(marker)}, tmp_path / "adapter" / "adapter_model.bin")
    base, _ = trained_moslora()
    with pytest.raises(UnsafeCheckpointError, match=r"adapter_model\.bin asks to load"):
        load_adapter(base, tmp_path / "adapter")
    assert not marker.exists()


def test_the_allow_list_covers_mmengine_and_deepspeed_bookkeeping_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from mmengine.config import ConfigDict
    from mmengine.logging import HistoryBuffer

    path = tmp_path / "ckpt.pth"
    scaler = DynamicLossScaler(2.0**16, 1000, 1, 1, False)
    buffer = HistoryBuffer()
    buffer.update(1.5)
    saved = {
        "state_dict": {"a": torch.ones(2)},
        "message_hub": {"log_scalars": {"loss": buffer}},
        "meta": {"cfg": ConfigDict(a=1)},
        "optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "ls": scaler},
    }
    torch.save(saved, path)
    loaded = load_checkpoint_file(path)
    assert loaded["message_hub"]["log_scalars"]["loss"].current() == 1.5
    # Allowed for that call only: a plain safe load of the same file refuses them.
    with pytest.raises(UnsafeCheckpointError, match="asks to load `"):
        safe_torch_load(path)


EVIL_MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("code from the export ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "llama"
"""


def test_eval_runs_code_from_an_export_only_with_the_flag(trained, tmp_path):
    from llava_moslora.cli import build_parser
    from llava_moslora.eval.model import LLaVAMoSLoRA

    _, checkpoint, _ = trained
    out = tmp_path / "out"
    export(checkpoint, TINY_MOSLORA, "merged-xtuner", out, dtype="float32")
    assert read_manifest(out).trust_remote_code  # the config's flag (XTuner's recipes set it)
    marker = tmp_path / "pwned"
    (out / "llm" / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    config = json.loads((out / "llm" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (out / "llm" / "config.json").write_text(json.dumps(config))
    LLaVAMoSLoRA(out, device="cpu")  # LLaMA's own transformers code, not the folder's
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the flag lets the folder's code run (then it fails)
        LLaVAMoSLoRA(out, device="cpu", trust_remote_code=True)
    assert marker.exists()

    args = build_parser().parse_args(["eval", str(out), "--trust-remote-code"])
    assert args.trust_remote_code is True
    assert build_parser().parse_args(["eval", str(out)]).trust_remote_code is False


# --- 2. exports never destroy inputs ----------------------------------------------------------


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_overwrite_refuses_an_out_that_holds_the_checkpoint(trained, tmp_path):
    _, checkpoint, _ = trained
    out = tmp_path / "work"
    out.mkdir()
    inside = out / "iter_1.pth"
    inside.write_bytes(checkpoint.read_bytes())
    (out / MANIFEST_NAME).write_text("{}")  # even if it looked like an export
    before = all_files(out)
    with pytest.raises(FileExistsError, match=r"contains the export's own input .*iter_1\.pth"):
        export(inside, TINY_MOSLORA, "xtuner", out, overwrite=True)
    assert all_files(out) == before


def test_overwrite_replaces_only_the_earlier_exports_files(trained, tmp_path):
    _, checkpoint, _ = trained
    out = tmp_path / "out"
    first = export(checkpoint, TINY_MOSLORA, "xtuner", out, dtype="float32")
    assert "projector/model.safetensors" in first.files and MANIFEST_NAME not in first.files
    assert sorted(first.files) == sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )
    (out / "notes.txt").write_text("mine")
    (out / "eval_results").mkdir()
    (out / "eval_results" / "r.json").write_text("{}")
    before = all_files(out)
    with pytest.raises(
        FileExistsError, match=r"2 file\(s\) the earlier export did not write: eval_results/r\.json"
    ):
        export(checkpoint, TINY_MOSLORA, "xtuner", out, dtype="float32", overwrite=True)
    assert all_files(out) == before
    # Without the user's files the overwrite goes ahead, and leaves no hidden folder behind.
    (out / "notes.txt").unlink()
    (out / "eval_results" / "r.json").unlink()
    (out / "eval_results").rmdir()
    export(checkpoint, TINY_MOSLORA, "peft-folded", out, dtype="float32", overwrite=True)
    assert read_manifest(out).format == "peft-folded"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_swap_keeps_the_old_export_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    from llava_moslora.export import out_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    staging = out_dir.make_staging(out)
    (staging / "a.txt").write_text("new")
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the new export cannot be moved in (an interrupt, a full disk)
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(out_dir.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        out_dir.move_into_place(staging, out)
    old = f".out.old-{os.getpid()}"
    # Rename old aside, rename new in (failed), rename old back: nothing was deleted on the way.
    assert calls == [("out", old), (staging.name, "out"), (old, "out")]
    assert all_files(out) == {"a.txt": b"old"}

    monkeypatch.setattr(out_dir.os, "replace", real_replace)
    out_dir.move_into_place(staging, out)
    assert all_files(out) == {"a.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_partial_folders_are_cleaned_when_ours_and_named_otherwise(tmp_path, caplog):
    from llava_moslora.export import out_dir

    out = tmp_path / "out"
    pid = dead_pid()
    ours = tmp_path / f".out.partial-{pid}"
    ours.mkdir()
    (ours / out_dir.MARKER_NAME).write_text(f"{pid} {socket.gethostname()}\n")
    (ours / "model.safetensors").write_text("half")
    old = tmp_path / f".out.old-{pid}"  # killed between the two renames: OUT is missing
    old.mkdir()
    (old / out_dir.MARKER_NAME).write_text(f"{pid} {socket.gethostname()}\n")
    (old / MANIFEST_NAME).write_text("{}")
    unmarked = tmp_path / ".out.partial-12345"
    unmarked.mkdir()
    (unmarked / "precious.txt").write_text("not an export's")
    other_pid = dead_pid()
    remote = tmp_path / f".out.partial-{other_pid}"  # another machine's export, shared disk
    remote.mkdir()
    (remote / out_dir.MARKER_NAME).write_text(f"{other_pid} another-host\n")
    with caplog.at_level("WARNING", logger="llava_moslora.export"):
        out_dir.clean_stale(out)
    assert not ours.exists()
    assert (out / MANIFEST_NAME).is_file() and not (out / out_dir.MARKER_NAME).exists()
    assert (unmarked / "precious.txt").read_text() == "not an export's"
    assert f"{unmarked} looks like an unfinished export's folder" in caplog.text
    assert remote.is_dir() and f"{remote} looks like an unfinished export's folder" in caplog.text
    assert f"restored the earlier export {out}" in caplog.text


# --- 3. non-finite or mislabelled adapters never pass ------------------------------------------


@pytest.fixture(scope="module")
def diverged(trained, tmp_path_factory):
    """The trained checkpoint with one mixer set to inf, as a diverged run saves it."""
    model, _, _ = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if "lora_mixer" in k)
    state[key][0, 0] = float("inf")
    path = tmp_path_factory.mktemp("diverged") / "iter_9.pth"
    torch.save({"state_dict": state, "meta": {"seed": 0}}, path)
    return path, key


@pytest.mark.parametrize("fmt", ["xtuner", "peft-folded", "hf-llava", "merged-xtuner"])
def test_every_export_format_refuses_a_non_finite_checkpoint(diverged, tmp_path, fmt):
    path, key = diverged
    with pytest.raises(NonFiniteTensorError, match=rf"{path}: 1 tensor.*non-finite.*`{key}`"):
        export(path, TINY_MOSLORA, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_adapter_refuses_a_non_finite_mixer_naming_key_and_file(tmp_path, bad):
    _, peft_model = trained_moslora()
    save_adapter(peft_model, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if "lora_mixer" in k)
    tensors[key][0, 0] = bad
    save_file(tensors, str(file))
    base, _ = trained_moslora()
    with pytest.raises(NonFiniteTensorError, match=rf"{file}: .*non-finite.*`{key}`"):
        load_adapter(base, tmp_path)


@pytest.mark.parametrize(
    ("fmt", "file", "part"),
    [
        ("xtuner", "llm_adapter/adapter_model.safetensors", "lora_B"),
        ("merged-xtuner", "llm/model.safetensors", "q_proj.weight"),
    ],
)
def test_eval_refuses_an_export_with_non_finite_weights(trained, tmp_path, fmt, file, part):
    from llava_moslora.eval.model import LLaVAMoSLoRA

    _, checkpoint, _ = trained
    out = tmp_path / "out"
    export(checkpoint, TINY_MOSLORA, fmt, out, dtype="float32")
    tensors = load_file(out / file)
    key = next(k for k in tensors if part in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(out / file), metadata={"format": "pt"})
    # The adapter is refused as its file is read; merged weights once loaded, naming the folder.
    source = out / file if fmt == "xtuner" else out
    with pytest.raises(NonFiniteTensorError, match=rf"{source}: .*non-finite.*`{key}`"):
        LLaVAMoSLoRA(out, device="cpu")


def test_eval_cli_exits_non_zero_on_a_non_finite_adapter_instead_of_scoring_it(
    trained, tmp_path, capsys
):
    _, checkpoint, _ = trained
    out = tmp_path / "out"
    export(checkpoint, TINY_MOSLORA, "xtuner", out, dtype="float32")
    file = out / "llm_adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if "lora_mixer" in k)
    tensors[key].fill_(float("inf"))
    save_file(tensors, str(file), metadata={"format": "pt"})
    code = main(
        ["eval", str(out), "--suite", "tiny", "--datasets", "TinyShapes_MMBench_EN", "--limit", "2"]
        + ["--data-root", str(tmp_path / "bench"), "--create-data-root"]
        + ["--work-dir", str(tmp_path / "eval")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {file}: ") and "non-finite" in err
    assert not list((tmp_path / "eval").rglob("*.xlsx"))  # nothing was scored


FROZEN = {
    "model.llm_lora.mixer_trainable": False,
    "model.visual_encoder_lora.mixer_trainable": False,
}


@pytest.mark.parametrize("init", ["identity", "butterfly"])
def test_a_frozen_mixer_config_refuses_a_learned_mixer(trained, tmp_path, init):
    _, checkpoint, _ = trained  # its mixers were learned (Kaiming, then moved)
    options = {
        **FROZEN,
        "model.llm_lora.mixer_init": init,
        "model.visual_encoder_lora.mixer_init": init,
    }
    with pytest.raises(
        CheckpointMismatchError,
        match=rf"frozen `mixer_init='{init}'` mixer, but `llm\..*lora_mixer",
    ):
        export(checkpoint, TINY_MOSLORA, "xtuner", tmp_path / "out", cfg_options=options)


def test_a_frozen_mixer_checkpoint_exports_under_its_own_config(tiny_env, tmp_path):
    options = {**FROZEN, "model.llm_lora.mixer_init": "butterfly"}
    model = build_model(load_config(TINY_MOSLORA, options))
    randomise_trained_tensors(model)  # B and projector: the frozen mixer is a buffer, unchanged
    checkpoint = save_mmengine_checkpoint(model, tmp_path / "iter_1.pth")
    manifest = export(checkpoint, TINY_MOSLORA, "xtuner", tmp_path / "out", cfg_options=options)
    assert manifest.mixer["llm"]["init"] == "butterfly"


def test_an_adapter_without_its_moslora_config_never_loads_a_frozen_mixer_as_trainable(tmp_path):
    from llava_moslora.moslora import moslora_config

    config = moslora_config(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, mixer_init="identity",
        mixer_trainable=False,
    )  # fmt: skip
    import peft

    save_adapter(peft.get_peft_model(make_tiny_llama(), config), tmp_path)
    (tmp_path / "moslora_config.json").unlink()
    with pytest.raises(ValueError, match="no moslora_config.json, so whether the mixer is learned"):
        load_adapter(make_tiny_llama(), tmp_path, is_trainable=True)
    load_adapter(make_tiny_llama(), tmp_path)  # inference: nothing is trained


# --- 4. offline means offline -----------------------------------------------------------------


@pytest.mark.parametrize(
    "missing", ["projector/model.safetensors", "llm_adapter/adapter_model.safetensors"]
)
def test_an_export_missing_a_file_says_so_and_never_reaches_the_hub(
    trained, tmp_path, missing, monkeypatch
):
    from llava_moslora.eval.model import LLaVAMoSLoRA

    _, checkpoint, _ = trained
    out = tmp_path / "out"
    export(checkpoint, TINY_MOSLORA, "xtuner", out, dtype="float32")
    (out / missing).unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a hub fallback would try the network
    with pytest.raises(FileNotFoundError, match=rf"export incomplete: {out / missing} missing"):
        LLaVAMoSLoRA(out, device="cpu")


def test_load_adapter_without_weights_never_reaches_the_hub(tmp_path):
    _, peft_model = trained_moslora()
    save_adapter(peft_model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    base, _ = trained_moslora()
    with pytest.raises(
        FileNotFoundError, match=r"adapter incomplete: .*adapter_model\.safetensors missing"
    ):
        load_adapter(base, tmp_path)


# --- 5. stock tools read exports correctly ----------------------------------------------------

# Runs in `stock_python`, which never imports llava_moslora: only transformers reads the export.
STOCK_SCRIPT = """
import sys
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

export_dir, image_path, prompt, result = sys.argv[1:]
model = LlavaForConditionalGeneration.from_pretrained(export_dir, torch_dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(export_dir)
batch = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
assert not [name for name in sys.modules if name.startswith("llava_moslora")]
torch.save({"logits": logits, "pixel_values": batch["pixel_values"], "generated": generated}, result)
"""


def test_stock_transformers_answers_a_non_square_image_like_the_training_model(
    trained, inputs, tiny_dir, tmp_path, stock_python
):
    from PIL import Image
    from transformers import CLIPImageProcessor
    from xtuner.dataset.utils import expand2square

    model, checkpoint, _ = trained
    out = tmp_path / "hf"
    export(checkpoint, TINY_MOSLORA, "hf-llava", out, dtype="float32")

    # A non-square image: the scene and, beside it, its mirror image (twice as wide as high).
    scene = inputs["image"]
    wide = Image.new("RGB", (2 * scene.width, scene.height))
    wide.paste(scene, (0, 0))
    wide.paste(scene.transpose(Image.FLIP_LEFT_RIGHT), (scene.width, 0))
    image_path = tmp_path / "wide.png"
    wide.save(image_path)

    clip = CLIPImageProcessor.from_pretrained(tiny_dir / "clip")
    mean = tuple(int(x * 255) for x in clip.image_mean)
    padded = clip(expand2square(wide, mean), return_tensors="pt")["pixel_values"]  # training's
    cropped = clip(wide, return_tensors="pt")["pixel_values"]  # a plain CLIP processor's
    expected = llava_model_logits(model, {"input_ids": inputs["input_ids"], "pixel_values": padded})
    as_cropped = llava_model_logits(
        model, {"input_ids": inputs["input_ids"], "pixel_values": cropped}
    )
    assert max_diff(as_cropped, expected) > 1e-3  # cropping would change the answer's logits

    result = tmp_path / "stock.pt"
    stock_python(STOCK_SCRIPT, str(out), str(image_path), inputs["prompt"], str(result))
    stock = torch.load(result, weights_only=True)
    assert torch.equal(stock["pixel_values"], padded)  # the pad colour and offset are training's
    vocab = expected.shape[-1]  # the export's vocabulary grew by the <image> token
    # float32, same weights: merged (W0 + ΔW) x vs W0 x + ΔW x, summation order only.
    assert max_diff(stock["logits"][..., :vocab], expected) < FP32_ATOL
    assert stock["generated"].shape[1] > stock["logits"].shape[1]  # generate(**processor(...)) ran
    assert json.loads((out / "tokenizer_config.json").read_text())["model_input_names"] == [
        "input_ids",
        "attention_mask",
    ]


def test_check_data_with_a_hub_tokenizer_and_no_network_fails_fast_in_one_line(
    tiny_dir, monkeypatch, capsys
):
    import time

    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network
    data = tiny_dir / "data"
    start = time.monotonic()
    code = main(
        ["check-data", "--data", str(data / "tiny_llava.json"), "--images", str(data / "images")]
        + ["--tokenizer", "someorg/not-cached-tokenizer", "--max-length", "100"]
    )
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 30
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "`--tokenizer` 'someorg/not-cached-tokenizer' is not a local folder nor in the" in err


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-pickle"])
def test_safe_loader_refuses_a_payload_in_either_torch_format(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    path = tmp_path / "x.pth"
    torch.save({"x": Payload(marker)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeCheckpointError, match=rf"{path} asks to load `{SYSTEM_GLOBAL}`"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_named_as_corrupt(trained, tmp_path):
    from llava_moslora.moslora.safety import CorruptCheckpointError

    _, checkpoint, _ = trained
    path = tmp_path / "iter_1.pth"
    path.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match=rf"{path} is not a readable torch checkpoint"):
        load_checkpoint_file(path)


# --- 4. no global reaches other objects; every file from outside is read as data (issue 23) ----


def _pickle_str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _getattr_of(memo: int, name: str) -> bytes:
    """Opcodes pushing getattr(memo[memo], name); getattr itself is memo[0]."""
    return pickle.BINGET + b"\x00" + pickle.BINGET + bytes([memo]) + _pickle_str(name) + b"\x86R"


def getattr_gadget(marker: Path) -> bytes:
    """Pickle opcodes that, with `builtins.getattr` and HistoryBuffer allowed, write `marker`.

    getattr(getattr, "__self__") is the builtins module; its __dict__ gets `len = eval` (the real
    len kept as `_len`); HistoryBuffer(code, []) calls len(code), so `code` runs: it puts len back
    and writes the marker. It leaves its objects on the stack, under the real checkpoint's.
    """
    code = (
        "(__import__('builtins').__setattr__('len', __import__('builtins')._len), "
        f"open({str(marker)!r}, 'w').write('code from the checkpoint ran'), 0)[-1]"
    )
    ops = pickle.PROTO + b"\x02" + pickle.GLOBAL + b"builtins\ngetattr\n" + pickle.BINPUT + b"\x00"
    ops += pickle.BINGET + b"\x00" + _pickle_str("__self__") + b"\x86R" + pickle.BINPUT + b"\x01"
    ops += _getattr_of(1, "__dict__")
    ops += _pickle_str("_len") + _getattr_of(1, "len") + pickle.SETITEM
    ops += _pickle_str("len") + _getattr_of(1, "eval") + pickle.SETITEM
    ops += pickle.GLOBAL + b"mmengine.logging.history_buffer\nHistoryBuffer\n"
    return ops + _pickle_str(code) + pickle.EMPTY_LIST + b"\x86R"


def with_getattr_gadget(source: Path, path: Path, marker: Path) -> Path:
    """`source`, a torch zip checkpoint, copied to `path` with `getattr_gadget` prepended to its
    data.pkl: the rest of the file is the real checkpoint, so a loader that runs it succeeds."""
    out = io.BytesIO()
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = getattr_gadget(marker) + data
            new.writestr(info, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return path


def assert_one_refusal(err: str, path: Path, refused: str = "builtins.getattr(") -> None:
    assert f"{path} asks to load `{refused}" in err, err[-3000:]
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err[-3000:]


@pytest.fixture
def gadget(trained, tmp_path) -> tuple[Path, Path]:
    """(the trained iter_1.pth with `getattr_gadget` in it, the marker it would write)."""
    marker = tmp_path / "pwned"
    return with_getattr_gadget(trained[1], tmp_path / "evil" / "iter_1.pth", marker), marker


def test_the_gadget_is_refused_by_the_checkpoint_loader_that_allows_history_buffers(gadget):
    evil, marker = gadget
    with pytest.raises(UnsafeCheckpointError, match=r"asks to load `builtins\.getattr\(<function"):
        load_checkpoint_file(evil)
    assert not marker.exists()
    # The gadget's own check: the same file, every global it names allowed, runs it.
    assert torch.load(evil, weights_only=False)["meta"]["seed"] == 7 and marker.exists()


def test_the_allow_list_holds_classes_and_a_getattr_for_history_buffer_statistics_only():
    import builtins

    from mmengine.logging import HistoryBuffer

    from llava_moslora.train.checkpoints import checkpoint_globals, history_buffer_statistic

    listed = [item[0] if isinstance(item, tuple) else item for item in checkpoint_globals()]
    assert builtins.getattr not in listed and history_buffer_statistic in listed
    assert history_buffer_statistic(HistoryBuffer, "mean") is HistoryBuffer.mean
    for owner, name in [
        (HistoryBuffer, "__init__"),
        (builtins.getattr, "__self__"),
        (os, "system"),
    ]:
        with pytest.raises(pickle.UnpicklingError, match=r"GLOBAL builtins\.getattr\(<"):
            history_buffer_statistic(owner, name)


class Opaque:
    pass


def test_a_process_wide_allow_list_does_not_widen_the_safe_loader(tmp_path):
    """What another library (or an old config) registers with torch is not honoured here."""
    path = tmp_path / "x.pth"
    torch.save({"x": Opaque()}, path)
    with torch.serialization.safe_globals([Opaque]):
        assert isinstance(torch.load(path)["x"], Opaque)
        with pytest.raises(UnsafeCheckpointError, match=r"asks to load `tests\..*Opaque`"):
            safe_torch_load(path)


def test_the_gadget_is_refused_when_torch_is_forced_to_load_weights_only(gadget, monkeypatch):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes torch refuse a private unpickler module: the loader
    then uses torch's own, and still reads mmengine checkpoints and refuses the gadget."""
    from mmengine.logging import HistoryBuffer

    evil, marker = gadget
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match=r"asks to load `builtins\.getattr\(<function"):
        load_checkpoint_file(evil)
    assert not marker.exists()
    buffer = HistoryBuffer()
    buffer.update(2.5)
    torch.save({"message_hub": {"loss": buffer}}, evil)
    assert load_checkpoint_file(evil)["message_hub"]["loss"].mean() == 2.5


def test_export_refuses_a_getattr_gadget_checkpoint(gadget, tmp_path, capsys):
    evil, marker = gadget
    out = tmp_path / "out"
    code = main(["export", str(evil), str(out), "--config", TINY_MOSLORA, "--to", "xtuner"])
    assert code == 1 and not marker.exists() and not out.exists()
    assert_one_refusal(capsys.readouterr().err, evil)


def test_eval_compositional_refuses_a_getattr_gadget_checkpoint(gadget, capsys):
    evil, marker = gadget
    code = main(["eval-compositional", TINY_MOSLORA, "--checkpoint", str(evil)])
    assert code == 1 and not marker.exists()
    assert_one_refusal(capsys.readouterr().err, evil)


def deepspeed_folder(folder: Path, model_states: dict) -> Path:
    """A ZeRO-2 iter_N.pth/ folder of one rank, as zero_to_fp32 reads it: the optimizer states
    (read first) are valid, the model states are `model_states`."""
    folder.mkdir(parents=True)
    optim = {
        "zero_stage": 2,
        "partition_count": 1,
        "single_partition_of_fp32_groups": [torch.ones(4)],
    }
    torch.save(
        {"optimizer_state_dict": optim}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    torch.save(model_states, folder / "mp_rank_00_model_states.pt")
    return folder


def test_export_refuses_a_deepspeed_folder_with_a_getattr_gadget(tiny_env, tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = deepspeed_folder(tmp_path / "work" / "iter_2.pth", {"meta": {"seed": 0}})
    states = folder / "mp_rank_00_model_states.pt"
    with_getattr_gadget(states, states, marker)
    out = tmp_path / "out"
    code = main(["export", str(folder), str(out), "--config", TINY_MOSLORA, "--to", "xtuner"])
    assert code == 1 and not marker.exists() and not out.exists()
    assert_one_refusal(capsys.readouterr().err, states)


def test_two_threads_loading_deepspeed_folders_never_run_a_payload(tmp_path, monkeypatch):
    """Thread A is mid-way through a folder when B starts one, and A finishes first. A loader that
    swaps zero_to_fp32's `torch` and restores it when done hands B the real torch.load (weights_only
    False) for its next file, and leaves A's swap behind when B restores. Forced, not by chance:
    each thread's first file waits for the other's (up to a few seconds, then goes on alone)."""
    from deepspeed.utils import zero_to_fp32

    from llava_moslora.train import checkpoints

    marker = tmp_path / "pwned"
    folders = {
        name: deepspeed_folder(tmp_path / name / "iter_2.pth", {"payload": Payload(marker)})
        for name in "AB"
    }
    a_loading, b_loading, a_done = (threading.Event() for _ in range(3))
    loaded = set()
    real_load = checkpoints.safe_torch_load

    def interleaved_load(*args, **kwargs):
        name = threading.current_thread().name
        if name not in loaded:
            loaded.add(name)
            mine, other = (a_loading, b_loading) if name == "A" else (b_loading, a_done)
            mine.set()
            other.wait(timeout=5)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "safe_torch_load", interleaved_load)
    errors = {}

    def load(name: str) -> None:
        try:
            load_trained_state(folders[name])
        except Exception as error:  # noqa: BLE001 - collected, asserted below
            errors[name] = error
        finally:
            if name == "A":
                a_done.set()

    threads = {name: threading.Thread(target=load, args=(name,), name=name) for name in "AB"}
    threads["A"].start()
    assert a_loading.wait(timeout=60)
    threads["B"].start()
    for thread in threads.values():
        thread.join(timeout=120)
    assert not marker.exists()
    assert zero_to_fp32.torch is torch  # DeepSpeed's module is as DeepSpeed made it
    for name in "AB":
        assert isinstance(errors.get(name), UnsafeCheckpointError), errors
        assert f"{folders[name]}/mp_rank_00_model_states.pt asks to load" in str(errors[name])


def test_resume_under_deepspeed_reads_its_files_as_data(tmp_path):
    """`--resume` with `--deepspeed`: mmengine has DeepSpeed's engine read the folder, through
    its checkpoint engine (`torch.load(weights_only=False)` as DeepSpeed ships it)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from llava_moslora.train import compat

    compat.apply()
    marker = tmp_path / "pwned"
    clean = tmp_path / "clean.pt"
    torch.save({"module": {"w": torch.ones(2)}}, clean)
    evil = with_getattr_gadget(clean, tmp_path / "mp_rank_00_model_states.pt", marker)
    assert torch.equal(TorchCheckpointEngine().load(str(clean))["module"]["w"], torch.ones(2))
    with pytest.raises(UnsafeCheckpointError, match=rf"{evil} asks to load `builtins\.getattr\("):
        TorchCheckpointEngine().load(str(evil), map_location="cpu")
    assert not marker.exists()


def test_load_adapter_refuses_a_getattr_gadget_after_a_config_was_parsed(tiny_env, tmp_path):
    from tests.factories import read_config

    read_config("tiny_moslora")  # what once registered getattr with torch for the whole process
    marker = tmp_path / "pwned"
    _, peft_model = trained_moslora()
    save_adapter(peft_model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    clean = tmp_path / "adapter_model.bin"
    torch.save(load_file(weights), clean)
    weights.unlink()
    evil = with_getattr_gadget(clean, tmp_path / "adapter" / "adapter_model.bin", marker)
    base, _ = trained_moslora()
    # Adapters allow no global at all: torch names the builtin without its module.
    with pytest.raises(UnsafeCheckpointError, match=rf"{evil} asks to load `getattr`"):
        load_adapter(base, tmp_path / "adapter")
    assert not marker.exists()


@pytest.fixture(params=["getattr-gadget", "reduce-payload"])
def evil_projector(request, tiny_dir, tmp_path) -> tuple[Path, Path, str]:
    """(a pretrained_pth: the tiny projector with a payload, its marker, the global refused)."""
    marker = tmp_path / "pwned"
    projector = tiny_dir / "projector" / "iter_0.pth"
    evil = tmp_path / "evil" / "iter_0.pth"
    if request.param == "getattr-gadget":
        return with_getattr_gadget(projector, evil, marker), marker, "builtins.getattr("
    evil.parent.mkdir()
    saved = torch.load(projector, weights_only=True)
    torch.save({**saved, "meta": {"note": Payload(marker)}}, evil)
    return evil, marker, SYSTEM_GLOBAL


def test_eval_compositional_refuses_a_pretrained_pth_with_a_payload(
    tiny_env, evil_projector, capsys
):
    """Without --checkpoint the run before training is scored: XTuner reads `pretrained_pth`."""
    evil, marker, refused = evil_projector
    code = main(
        ["eval-compositional", TINY_MOSLORA, "--cfg-options", f"model.pretrained_pth={evil}"]
    )
    assert code == 1 and not marker.exists()
    assert_one_refusal(capsys.readouterr().err, evil, refused)


def train_refusing(tiny_dir: Path, work: Path, *args: str) -> str:
    """`llava-moslora train configs/tiny_moslora.py ARGS` into `work`; its stderr, once it has
    exited with the refusal's code (2) and written no checkpoint."""
    from tests.launchers import run_train

    before = set(work.glob("iter_*.pth"))
    run = run_train("tiny_moslora", tiny_dir, work, *args, launcher="llava-moslora", check=False)
    assert run.returncode == 2, (run.stdout + run.stderr)[-3000:]
    assert "error: training refused: " in run.stderr
    assert set(work.glob("iter_*.pth")) == before
    return run.stderr


@pytest.mark.slow
def test_train_refuses_to_resume_from_a_getattr_gadget(gadget, tiny_dir, tmp_path):
    """XTuner reads the `--resume` checkpoint for its seed, then mmengine to restore the run."""
    _, marker = gadget
    evil = with_getattr_gadget(gadget[0], tmp_path / "work" / "iter_1.pth", marker)
    err = train_refusing(tiny_dir, tmp_path / "work", "--resume", str(evil))
    assert not marker.exists()
    assert_one_refusal(err, evil)


@pytest.mark.slow
def test_train_refuses_a_pretrained_pth_with_a_payload(evil_projector, tiny_dir, tmp_path):
    """XTuner's LLaVAModel reads `pretrained_pth` while the model is built."""
    evil, marker, refused = evil_projector
    err = train_refusing(
        tiny_dir, tmp_path / "work", "--cfg-options", f"model.pretrained_pth={evil}"
    )
    assert not marker.exists()
    assert_one_refusal(err, evil, refused)


# --- 5. what is written is checked (issue 23) --------------------------------------------------


@pytest.fixture(scope="module")
def huge_mixer(trained, tmp_path_factory):
    """The trained checkpoint with one LLM mixer at 1e6 everywhere: finite in float32, and in
    every format beyond float16's 65504 (the mixer itself, B·M folded, W0 + s·B·M·A merged)."""
    model, _, _ = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if "lora_mixer" in k and k.startswith("llm."))
    state[key] = torch.full_like(state[key], 1e6)
    path = tmp_path_factory.mktemp("huge") / "iter_9.pth"
    torch.save({"state_dict": state, "meta": {"seed": 0}}, path)
    return path


@pytest.mark.parametrize("fmt", ["xtuner", "peft-folded", "hf-llava", "merged-xtuner"])
def test_every_export_format_refuses_to_write_inf_after_the_float16_cast(huge_mixer, tmp_path, fmt):
    out = tmp_path / "out"
    with pytest.raises(
        NonFiniteTensorError,
        match=rf"^{out}/\S+\.safetensors: \d+ tensor\(s\) hold non-finite .* e\.g\. `\S+`.*"
        r"overflowed when cast to or merged in float16 .*`--dtype bfloat16`.*Nothing was written",
    ):
        export(huge_mixer, TINY_MOSLORA, fmt, out, dtype="float16")
    assert not out.exists() and not list(tmp_path.glob(".*"))  # nor a staging folder left


def test_the_huge_mixer_exports_in_bfloat16(huge_mixer, tmp_path):
    export(huge_mixer, TINY_MOSLORA, "xtuner", tmp_path / "out", dtype="bfloat16")
    written = load_file(tmp_path / "out" / "llm_adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in written.values())
