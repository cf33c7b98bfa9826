"""`llava-moslora export`: every format reproduces the trained LLaVAModel, checked in numbers.

The checkpoint is made the way mmengine saves one (`{"state_dict": LLaVAModel.state_dict()}`)
from the tiny LLaVA, with lora_B, the mixers and the projector randomised: at init B = 0 makes the
adapter a no-op, and an export that lost the adapter would then still "match". Each test first
relies on `trained` asserting that the adapted model differs from the base one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_moslora.export import FORMATS, MANIFEST_NAME, ExportManifest, export, read_manifest
from llava_moslora.runs import CheckpointMismatchError, build_model, load_config
from tests.factories import (
    FP32_ATOL,
    IMAGE_TOKEN_INDEX,
    QUESTION,
    TINY_LORA,
    TINY_MOSLORA,
    llava_model_logits,
    max_diff,
    randomise_trained_tensors,
    save_mmengine_checkpoint,
)
from tests.launchers import run_train
from tests.stock_interpreter import STOCK_READER


def xtuner_style_logits(llm, visual_encoder, projector, inputs, select_layer=-2):
    """LLaVAModel's forward on separately loaded parts, via XTuner's own splicing function."""
    from xtuner.model.utils import prepare_inputs_labels_for_multimodal

    with torch.no_grad():
        hidden = visual_encoder(inputs["pixel_values"], output_hidden_states=True).hidden_states
        features = projector(hidden[select_layer][:, 1:])
        data = prepare_inputs_labels_for_multimodal(
            llm=llm, input_ids=inputs["input_ids"], pixel_values=features
        )
        return llm(**data).logits.float()


# --- xtuner ----------------------------------------------------------------------------------


def test_xtuner_format_reloads_with_load_adapter_to_the_same_logits(trained, inputs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.model.modules import ProjectorModel

    from llava_moslora.moslora import load_adapter

    model, checkpoint, expected = trained
    out = tmp_path / "xtuner"
    export(checkpoint, TINY_MOSLORA, "xtuner", out, dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["llm_adapter", "visual_encoder_adapter", "projector", MANIFEST_NAME]
    )
    for adapter in ("llm_adapter", "visual_encoder_adapter"):
        assert (out / adapter / "moslora_config.json").is_file()
        saved = load_file(out / adapter / "adapter_model.safetensors")
        # LLM: 2 layers x 7 linears; ViT: 6 linears of layers 0-1, the ones LLaVA reads (of 3).
        assert sum("lora_mixer" in k for k in saved) == (14 if adapter == "llm_adapter" else 12)

    manifest = read_manifest(out)
    llm = load_adapter(AutoModelForCausalLM.from_pretrained(manifest.llm), out / "llm_adapter")
    vit = load_adapter(
        CLIPVisionModel.from_pretrained(manifest.visual_encoder), out / "visual_encoder_adapter"
    )
    projector = ProjectorModel.from_pretrained(out / "projector")
    got = xtuner_style_logits(llm, vit, projector, inputs)
    assert max_diff(got, expected) < FP32_ATOL  # measured 0 (same kernels, same order)


def test_default_dtype_writes_bfloat16_adapters_and_projector(trained, tmp_path):
    from safetensors.torch import load_file

    _, checkpoint, _ = trained
    out = tmp_path / "bf16"
    manifest = export(checkpoint, TINY_MOSLORA, "xtuner", out)
    assert manifest.dtype == "bfloat16"
    for file in ("llm_adapter/adapter_model.safetensors", "projector/model.safetensors"):
        assert {t.dtype for t in load_file(out / file).values()} == {torch.bfloat16}


# --- peft-folded and merged-xtuner, read by stock libraries only -----------------------------


@pytest.fixture(scope="module")
def stock_reads(trained, inputs, tmp_path_factory, stock_python):
    """{format: logits} for peft-folded and merged-xtuner exports, computed by STOCK_READER."""
    _, checkpoint, _ = trained
    work = tmp_path_factory.mktemp("stock")
    dirs = {}
    for fmt in ("peft-folded", "merged-xtuner"):
        dirs[fmt] = work / fmt
        export(checkpoint, TINY_MOSLORA, fmt, dirs[fmt], dtype="float32")
    torch.save({k: inputs[k] for k in ("input_ids", "pixel_values")}, work / "inputs.pt")
    stock_python(
        STOCK_READER, str(work / "inputs.pt"), str(work / "logits.pt"), *map(str, dirs.values())
    )
    logits = torch.load(work / "logits.pt")
    return {fmt: logits[str(d)] for fmt, d in dirs.items()}, dirs


def test_peft_folded_in_stock_peft_reproduces_the_model(trained, stock_reads):
    from safetensors.torch import load_file

    _, _, expected = trained
    logits, dirs = stock_reads
    for adapter in ("llm_adapter", "visual_encoder_adapter"):
        saved = load_file(dirs["peft-folded"] / adapter / "adapter_model.safetensors")
        assert not any("mixer" in k for k in saved)  # plain LoRA: nothing for PEFT to drop
        assert not (dirs["peft-folded"] / adapter / "moslora_config.json").exists()
    # B' = B·M folded in float32: (B M) A x vs B (M (A x)), summation order only. Measured 5.9e-6.
    assert max_diff(logits["peft-folded"], expected) < FP32_ATOL


def test_merged_xtuner_in_stock_transformers_reproduces_the_model(trained, stock_reads):
    _, _, expected = trained
    logits, dirs = stock_reads
    assert sorted(p.name for p in dirs["merged-xtuner"].iterdir()) == sorted(
        ["llm", "visual_encoder", "projector", MANIFEST_NAME]
    )
    assert (dirs["merged-xtuner"] / "llm" / "tokenizer.json").is_file()
    assert (dirs["merged-xtuner"] / "visual_encoder" / "preprocessor_config.json").is_file()
    # (W0 + ΔW) x vs W0 x + ΔW x in float32. Measured 5.8e-6.
    assert max_diff(logits["merged-xtuner"], expected) < FP32_ATOL


# --- hf-llava --------------------------------------------------------------------------------


def hf_inputs_and_logits(out: Path, inputs, dtype=torch.float32):
    """Load an hf-llava export with stock transformers; run the XTuner prompt through it."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out, torch_dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(out)
    batch = processor(images=inputs["image"], text=inputs["prompt"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()})
    return model, processor, batch, logits.logits.float()


def aligned(xtuner_ids: torch.Tensor, image_token_id: int, patches: int) -> torch.Tensor:
    """XTuner's ids with its one IMAGE_TOKEN_INDEX expanded to `patches` HF image tokens."""
    ids = []
    for token in xtuner_ids[0].tolist():
        ids += [image_token_id] * patches if token == IMAGE_TOKEN_INDEX else [token]
    return torch.tensor([ids])


def test_hf_llava_gives_the_training_models_logits(trained, inputs, tmp_path):
    _, checkpoint, expected = trained
    out = tmp_path / "hf"
    export(checkpoint, TINY_MOSLORA, "hf-llava", out, dtype="float32")
    model, processor, batch, logits = hf_inputs_and_logits(out, inputs)

    config = model.config
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "gelu" and config.image_seq_length == 16
    assert processor.tokenizer.convert_ids_to_tokens(config.image_token_index) == "<image>"
    # Alignment: the processor expands <image> into 16 tokens exactly where XTuner splices its 16
    # features in place of the one -200 id, and preprocesses the (square) image identically.
    assert torch.equal(
        batch["input_ids"], aligned(inputs["input_ids"], config.image_token_index, 16)
    )
    assert torch.equal(batch["pixel_values"], inputs["pixel_values"])
    # The embedding sequences are then the same, so every position is comparable; the vocabulary
    # grew by the <image> token, a column the training model does not have.
    vocab = expected.shape[-1]
    assert logits.shape[:2] == expected.shape[:2] and logits.shape[-1] == vocab + 1
    is_text = batch["input_ids"][0] != config.image_token_index
    assert is_text.sum() == inputs["input_ids"].shape[1] - 1
    # float32, same weights: merged (W0 + ΔW) x vs W0 x + ΔW x, summation order only.
    # Measured 5.1e-6 on the text positions, 5.8e-6 over all.
    assert max_diff(logits[0, is_text, :vocab], expected[0, is_text]) < FP32_ATOL
    assert max_diff(logits[..., :vocab], expected) < FP32_ATOL

    # The saved chat template lays a message out as XTuner's llama3_chat prompt does.
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == inputs["prompt"]
    assert read_manifest(out).llm is None and read_manifest(out).visual_encoder is None


def test_hf_llava_refuses_a_backbone_llava_cannot_hold():
    from torch import nn

    from llava_moslora.export.hf_llava import build_hf_llava

    with pytest.raises(
        ValueError,
        match="needs an LLM whose architecture transformers itself ships .* Linear.*--to merged-xtuner",
    ):
        build_hf_llava(
            nn.Linear(2, 2),
            None,
            None,
            None,
            None,
            visual_select_layer=-2,
            prompt_template=None,
            pad_image_to_square=True,
        )


# --- QMoSLoRA ---------------------------------------------------------------------------------


def test_qmoslora_exports_to_hf_llava_merged_into_a_dequantized_base(tiny_env, inputs, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    cfg = load_config(TINY_MOSLORA)
    # configs/internlm2_qmoslora.py's quantization on the tiny LLaMA, float32 compute on CPU.
    cfg.model.llm.update(
        torch_dtype=torch.float32,
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["lm_head", "down_proj"],  # 224 wide: see tiny_qmoslora.py
        ),
    )
    model = build_model(cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.llm.modules())
    randomise_trained_tensors(model)
    expected = llava_model_logits(model, inputs)
    checkpoint = save_mmengine_checkpoint(model, tmp_path / "iter_1.pth")

    manifest = export(checkpoint, cfg, "hf-llava", tmp_path / "fp32", dtype="float32")
    assert manifest.quantized_base and manifest.config == cfg.filename
    _, _, batch, logits = hf_inputs_and_logits(tmp_path / "fp32", inputs)
    vocab = expected.shape[-1]
    # CPU bnb 4-bit dequantizes W0 to float32 and multiplies: the dequantized copy + ΔW is the
    # same weight, up to float32 rounding of W0 + ΔW. Measured 8.9e-6.
    assert max_diff(logits[..., :vocab], expected) < FP32_ATOL

    export(checkpoint, cfg, "hf-llava", tmp_path / "bf16")  # the default dtype
    _, _, _, logits_bf16 = hf_inputs_and_logits(tmp_path / "bf16", inputs, torch.bfloat16)
    # bfloat16 keeps 8 mantissa bits: relative rounding 2^-9 per weight and activation, through
    # 2 LLM + 3 CLIP layers: allow 5 % of the largest logit. Measured 0.10 (9e-6 in float32).
    scale = expected.abs().max().item()
    assert max_diff(logits_bf16[..., :vocab], expected) < 0.05 * scale


# --- checkpoints that do not fit the config ---------------------------------------------------


def test_lora_checkpoint_with_a_moslora_config_names_the_missing_mixers(tiny_env, tmp_path):
    lora_model = build_model(load_config(TINY_LORA))
    checkpoint = save_mmengine_checkpoint(lora_model, tmp_path / "iter_1.pth")
    # The mixers of the LLM's 2 x 7 linears and the ViT's 2 x 6 (layers 0-1: those LLaVA reads).
    with pytest.raises(
        CheckpointMismatchError, match=r"26 key\(s\) missing from the checkpoint:\n.*lora_mixer"
    ):
        export(checkpoint, TINY_MOSLORA, "xtuner", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rank_mismatch_names_the_shape_mismatched_keys(trained, tmp_path):
    _, checkpoint, _ = trained
    with pytest.raises(
        CheckpointMismatchError,
        match=r"(?s)42 key\(s\) shape-mismatched:\n.*up_proj\.lora_A\.default\.weight: "
        r"checkpoint \(64, 64\) vs model \(16, 64\)",
    ):
        export(
            checkpoint,
            TINY_MOSLORA,
            "xtuner",
            tmp_path / "out",
            cfg_options={"model.llm_lora.r": 16},
        )


# --- the command line, the output folder, the manifest ---------------------------------------


def test_cli_refuses_a_non_empty_folder_unless_overwrite(trained, tmp_path, capsys):
    from llava_moslora.cli import main

    _, checkpoint, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", str(checkpoint), "--config", TINY_MOSLORA, "--to", "xtuner", str(out)]
    assert main(args) == 1
    assert "`OUT`" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match=r"is not empty\. Pass `--overwrite`"):
        export(checkpoint, TINY_MOSLORA, "xtuner", out)
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export(checkpoint, TINY_MOSLORA, "xtuner", out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # nothing of the user's was touched

    fresh = tmp_path / "fresh"
    assert main([*args[:-1], str(fresh), "--dtype", "float32"]) == 0
    assert read_manifest(fresh).format == "xtuner"
    assert main([*args[:-2], "peft-folded", str(fresh), "--overwrite"]) == 0  # replaces it
    assert read_manifest(fresh).format == "peft-folded" and read_manifest(fresh).dtype == "bfloat16"
    assert not (fresh / "llm_adapter" / "moslora_config.json").exists()  # no stale files


def test_bad_format_and_dtype_name_the_allowed_values(trained, tmp_path):
    _, checkpoint, _ = trained
    with pytest.raises(ValueError, match=r"`--to` should be one of xtuner, .* 'onnx'"):
        export(checkpoint, TINY_MOSLORA, "onnx", tmp_path / "a")
    with pytest.raises(ValueError, match=r"`--dtype` should be one of bfloat16, .* 'fp8'"):
        export(checkpoint, TINY_MOSLORA, "xtuner", tmp_path / "a", dtype="fp8")
    with pytest.raises(FileNotFoundError, match="`CKPT`"):
        export(tmp_path / "iter_9.pth", TINY_MOSLORA, "xtuner", tmp_path / "a")


def test_manifest_contents(trained, tmp_path, tiny_env):
    _, checkpoint, _ = trained
    out = tmp_path / "out"
    export(checkpoint, TINY_MOSLORA, "peft-folded", out)
    data = json.loads((out / MANIFEST_NAME).read_text())
    mixer = {"init": "kaiming", "trainable": None, "init_only": False}
    assert data == {
        "format": "peft-folded",
        "llm": f"{tiny_env}/llm",
        "visual_encoder": f"{tiny_env}/clip",
        "prompt_template": "llama3_chat",
        "system": "",
        "visual_select_layer": -2,
        "pad_image_to_square": True,
        "adapter_kind": "moslora",
        "mixer": {"llm": mixer, "visual_encoder": mixer},
        "quantized_base": False,
        "dtype": "bfloat16",
        "config": TINY_MOSLORA,
        "checkpoint": str(checkpoint),
        "seed": 7,  # the config's randomness.seed is None: the checkpoint's meta (mmengine's)
        "trust_remote_code": True,  # as XTuner's LLaVA recipes set it for the LLM
        # every file the export wrote, for `--overwrite` and for evaluators to check
        "files": [
            "llm_adapter/adapter_config.json",
            "llm_adapter/adapter_model.safetensors",
            "projector/config.json",
            "projector/configuration_projector.py",
            "projector/model.safetensors",
            "projector/modeling_projector.py",
            "visual_encoder_adapter/adapter_config.json",
            "visual_encoder_adapter/adapter_model.safetensors",
        ],
    }
    manifest = read_manifest(out)
    assert isinstance(manifest, ExportManifest) and manifest.adapter_kind_of("llm") == "moslora"
    assert not manifest.merged and set(FORMATS) >= {manifest.format}


def test_read_manifest_rejects_an_unknown_format_and_missing_fields(tmp_path):
    good = {
        "format": "xtuner",
        "llm": "a",
        "visual_encoder": "b",
        "prompt_template": "llama3_chat",
        "system": "",
        "visual_select_layer": -2,
        "pad_image_to_square": True,
        "adapter_kind": {"llm": "moslora", "visual_encoder": "lora"},
        "mixer": {"llm": None, "visual_encoder": None},
        "quantized_base": False,
        "dtype": "bfloat16",
        "config": "c.py",
        "checkpoint": "iter_1.pth",
        "seed": None,
        "trust_remote_code": False,
        "added_by_a_newer_exporter": 1,
    }
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(good))
    assert read_manifest(tmp_path).adapter_kind_of("visual_encoder") == "lora"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**good, "format": "onnx"}))
    with pytest.raises(ValueError, match=r"`format` should be one of xtuner, .* 'onnx'"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(
        json.dumps({k: v for k, v in good.items() if k != "seed"})
    )
    with pytest.raises(ValueError, match="lacks the field.*`seed`"):
        read_manifest(tmp_path)


# --- a real DeepSpeed checkpoint folder -------------------------------------------------------


def xtuner_train_deepspeed(tiny_dir: Path, work_dir: Path) -> Path:
    """Two iterations of `xtuner train configs/tiny_moslora.py --deepspeed deepspeed_zero2`.

    XTuner's tools/train.py is run directly: `xtuner train` would only re-launch it in a second
    Python process, paying the ~30 s of torch/DeepSpeed/XTuner imports twice.
    """
    from llava_moslora.train.checkpoints import last_checkpoint

    options = [
        "train_cfg.max_epochs=None",
        "train_cfg.max_iters=2",
        "param_scheduler.0.end=0.05",  # 2 of the 40 iterations of an epoch of 160 samples / batch 4
        "param_scheduler.1.begin=0.05",
        "model.use_activation_checkpointing=False",  # no recomputation: faster on CPU
        "custom_hooks.1.max_new_tokens=1",  # the chat hook's sample generations
    ]
    deepspeed = ["--deepspeed", "deepspeed_zero2", "--cfg-options", *options]
    run_train("tiny_moslora", tiny_dir, work_dir, *deepspeed, launcher="tools")
    return last_checkpoint(work_dir)


@pytest.mark.slow
def test_deepspeed_checkpoint_folder_exports(tiny_env, inputs, tmp_path):
    """A real ZeRO-2 iter_N.pth/ folder exports, and reloads to the model it was read into."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.model.modules import ProjectorModel

    from llava_moslora.moslora import load_adapter
    from llava_moslora.runs import load_checkpoint

    checkpoint = xtuner_train_deepspeed(tiny_env, tmp_path / "work")
    assert checkpoint.is_dir() and checkpoint.name == "iter_2.pth"

    model = build_model(load_config(TINY_MOSLORA))
    state = load_checkpoint(model, checkpoint)
    assert all(t.dtype == torch.float32 for t in state.values())  # DeepSpeed's fp32 master copy
    assert max(state[k].abs().max() for k in state if "lora_B" in k) > 0  # it trained: B left 0
    expected = llava_model_logits(model, inputs)
    out = tmp_path / "out"
    manifest = export(checkpoint, TINY_MOSLORA, "xtuner", out, dtype="float32")
    assert manifest.seed == 0  # `--seed 0`, from the DeepSpeed folder's client state

    llm = load_adapter(AutoModelForCausalLM.from_pretrained(manifest.llm), out / "llm_adapter")
    vit = load_adapter(
        CLIPVisionModel.from_pretrained(manifest.visual_encoder), out / "visual_encoder_adapter"
    )
    projector = ProjectorModel.from_pretrained(out / "projector")
    assert max_diff(xtuner_style_logits(llm, vit, projector, inputs), expected) < FP32_ATOL
