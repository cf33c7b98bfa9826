"""`llava_moslora.runs`: the one way a trained run is loaded, and LLaVA's one image path.

The held-out evaluator used to load checkpoints its own, looser way (`load_state_dict(strict=False)`
and a check of missing adapter keys): a learned mixer under a frozen-mixer config or a diverged
checkpoint was scored without a word, a rank mismatch surfaced as torch's RuntimeError. Now it
loads through `runs.load_run`, so it refuses exactly what export refuses, with the same error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_moslora.eval.heldout import evaluate_run
from llava_moslora.moslora.safety import NonFiniteTensorError
from llava_moslora.runs import (
    CheckpointMismatchError,
    build_model,
    image_features,
    load_config,
    load_run,
    square_pixels,
)
from tests.factories import TINY_LORA, TINY_MOSLORA, llava_model_logits, save_mmengine_checkpoint

FROZEN_IDENTITY = {
    f"model.{tower}.{key}": value
    for tower in ("llm_lora", "visual_encoder_lora")
    for key, value in (("mixer_trainable", False), ("mixer_init", "identity"))
}


def heldout_items(tiny_env: Path) -> Path:
    return tiny_env / "data" / "heldout_eval.json"


# --- the held-out evaluator refuses what export refuses ---------------------------------------


def _lora_checkpoint(trained, tmp_path):
    """A stock-LoRA run's checkpoint: no mixers at all."""
    return save_mmengine_checkpoint(build_model(load_config(TINY_LORA)), tmp_path / "iter_1.pth")


def _diverged_checkpoint(trained, tmp_path):
    model, _, _ = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[next(k for k in state if "lora_mixer" in k)][0, 0] = float("inf")
    path = tmp_path / "iter_9.pth"
    torch.save({"state_dict": state}, path)
    return path


def _trained_checkpoint(trained, tmp_path):
    return trained[1]


@pytest.mark.parametrize(
    ("make_checkpoint", "cfg_options", "error", "match"),
    [
        pytest.param(
            _lora_checkpoint,
            None,
            CheckpointMismatchError,
            r"26 key\(s\) missing from the checkpoint:\n.*lora_mixer",
            id="lora-checkpoint-moslora-config",
        ),
        pytest.param(
            _trained_checkpoint,
            {"model.llm_lora.r": 16},
            CheckpointMismatchError,
            r"(?s)42 key\(s\) shape-mismatched:\n.*up_proj\.lora_A\.default\.weight: "
            r"checkpoint \(64, 64\) vs model \(16, 64\)",
            id="rank-mismatch",  # was torch's RuntimeError from load_state_dict
        ),
        pytest.param(
            _trained_checkpoint,
            FROZEN_IDENTITY,
            CheckpointMismatchError,
            r"frozen `mixer_init='identity'` mixer, but `llm\..*lora_mixer",
            id="learned-mixer-frozen-config",  # was scored as vanilla LoRA
        ),
        pytest.param(
            _diverged_checkpoint,
            None,
            NonFiniteTensorError,
            r"non-finite",
            id="diverged",  # was scored
        ),
    ],
)
def test_held_out_evaluator_refuses_what_export_refuses(
    trained, tiny_env, tmp_path, make_checkpoint, cfg_options, error, match
):
    checkpoint = make_checkpoint(trained, tmp_path)
    with pytest.raises(error, match=match):
        evaluate_run(TINY_MOSLORA, checkpoint, heldout_items(tiny_env), cfg_options)


def test_an_untrained_run_is_the_start_point_and_scores(tiny_env, tmp_path):
    """No checkpoint: adapters at init (B = 0) and the config's `pretrained_pth` projector."""
    from llava_moslora.train.checkpoints import load_trained_state

    cfg, model = load_run(TINY_MOSLORA)
    start = load_trained_state(cfg.model.pretrained_pth)
    built = model.state_dict()
    assert start and all(torch.equal(built[key], value) for key, value in start.items())
    lora_b = [value for key, value in built.items() if "lora_B" in key]
    assert lora_b and all(not value.any() for value in lora_b)
    assert not model.training  # no LoRA dropout while scoring

    # Four of the held-out items, their images where the items' folder says.
    source = heldout_items(tiny_env)
    (tmp_path / "items.json").write_text(json.dumps(json.loads(source.read_text())[:4]))
    (tmp_path / "heldout_images").symlink_to(source.parent / "heldout_images")
    result = evaluate_run(TINY_MOSLORA, items=tmp_path / "items.json")
    assert 0 <= result["overall"] <= 1 and set(result) > {"overall"}


def test_scoring_several_sets_on_one_model_equals_scoring_each_alone(tiny_env, tmp_path):
    """`score_sets` (the ablation: new family, then the old one) loads the model once; scoring the
    first set leaves nothing behind that changes the second's log-likelihoods."""
    from llava_moslora.eval.heldout import score_run, score_sets

    source = heldout_items(tiny_env)
    every = json.loads(source.read_text())
    (tmp_path / "heldout_images").symlink_to(source.parent / "heldout_images")
    (tmp_path / "a.json").write_text(json.dumps(every[:3]))
    (tmp_path / "b.json").write_text(json.dumps(every[3:6]))
    together = score_sets(TINY_MOSLORA, None, [tmp_path / "a.json", tmp_path / "b.json"])
    alone = [score_run(TINY_MOSLORA, items=tmp_path / name) for name in ("a.json", "b.json")]
    assert [s.items for s in together] == [s.items for s in alone]
    assert [s.log_likelihoods for s in together] == [s.log_likelihoods for s in alone]
    assert together[0].items != together[1].items


# --- the one image path ------------------------------------------------------------------------


def test_image_features_are_what_the_trained_model_computes(trained, inputs):
    """Equal to the inline path the evaluators and the planner each wrote, bit for bit, and the
    image tokens LLaVAModel's own forward splices in: same logits."""
    from xtuner.model.utils import prepare_inputs_labels_for_multimodal

    model, _, logits = trained
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        features = image_features(model, pixels)
        with model.visual_encoder.disable_adapter():
            without_vit_adapter = image_features(model, pixels)
        # The ViT adapter changes the features: the equalities below include it.
        assert (features - without_vit_adapter).abs().max() > 1e-3
        hidden = model.visual_encoder(
            pixels.to(model.visual_encoder.dtype), output_hidden_states=True
        ).hidden_states
        inline = model.projector(hidden[model.visual_select_layer][:, 1:])
        assert features.shape == (1, 16, model.llm.config.hidden_size)  # 4 x 4 patches, CLS gone
        assert torch.equal(features, inline)

        data = prepare_inputs_labels_for_multimodal(
            llm=model.llm, input_ids=inputs["input_ids"], pixel_values=features
        )
        spliced = model.llm(**data).logits.float()
    assert torch.equal(spliced, logits)
    assert torch.equal(llava_model_logits(model, inputs), logits)  # the model was not changed


def test_square_pixels_pad_with_the_processor_mean(tiny_env):
    """A wide image is padded top and bottom with the mean colour (0 once normalised), not
    centre-cropped by CLIP's processor."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(tiny_env / "clip")
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    pixels = square_pixels(wide, processor)  # (1, 3, H, W)
    cropped = processor.preprocess(wide, return_tensors="pt")["pixel_values"]
    assert pixels.shape == cropped.shape
    mean = torch.tensor(processor.image_mean).view(3, 1)
    std = torch.tensor(processor.image_std).view(3, 1)
    red = (torch.tensor([1.0, 0.0, 0.0]).view(3, 1) - mean) / std
    # int(mean x 255) / 255: the padding is the mean up to one 8-bit step.
    assert pixels[0, :, 0].abs().max() < 1 / 255 / min(processor.image_std)
    assert pixels[0, :, pixels.shape[2] // 2].sub(red).abs().max() < 1e-2
    assert cropped[0, :, 0].sub(red).abs().max() < 1e-2  # without the padding: red everywhere
