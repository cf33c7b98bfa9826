"""The vision-encoder layers that feed LLaVA's selected hidden state, and what PEFT adapts from the
configs' `layers_to_transform` on a 24-layer CLIP and on the tiny one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llava_moslora.builders.tiny import tiny_clip_vision
from llava_moslora.builders.vision_layers import layers_above, layers_feeding
from tests.factories import CLIP_LAYER_LINEARS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_layers_feeding_and_above_the_selected_hidden_state():
    # hidden_states of N layers: [0] embeddings, [i + 1] the output of layer i.
    assert layers_feeding(24, -2) == list(range(23)) and layers_above(24, -2) == [23]
    assert layers_feeding(3, -2) == [0, 1] and layers_above(3, -2) == [2]
    assert layers_feeding(24, -1) == list(range(24)) and layers_above(24, -1) == []
    assert layers_feeding(24, 12) == list(range(12))  # hidden_states[12]: layer 11's output
    assert layers_above(24, 12) == list(range(12, 24))
    assert layers_above(24, 0) == list(range(24))  # the embeddings: every layer runs unread


def test_bad_select_layers_are_refused():
    # PEFT reads an empty layers_to_transform as "every layer": the embeddings are refused.
    for embeddings in (0, -25):
        with pytest.raises(ValueError, match=r"reads the embeddings of a 24-layer encoder"):
            layers_feeding(24, embeddings)
    with pytest.raises(ValueError, match=r"\(from -25 to 24\) but the value passed is -26"):
        layers_feeding(24, -26)
    with pytest.raises(ValueError, match=r"`visual_select_layer` should be an integer .* '-2'"):
        layers_feeding(24, "-2")
    with pytest.raises(ValueError, match=r"`num_layers` should be a positive integer .* 0"):
        layers_above(0, -2)


def test_the_layer_counts_are_the_towers():
    from llava_moslora.builders.make_tiny import TINY_CLIP_LAYERS, tiny_clip
    from llava_moslora.builders.standin import CLIP_L_336

    # open_clip's own ViT-L/14-336 definition, read as a file (open_clip is not imported).
    spec = importlib.util.find_spec("open_clip")
    vit_l = Path(spec.origin).parent / "model_configs" / "ViT-L-14-336.json"
    assert json.loads(vit_l.read_text())["vision_cfg"]["layers"] == CLIP_L_336.layers == 24
    clip, _ = tiny_clip()
    assert clip.config.num_hidden_layers == TINY_CLIP_LAYERS == 3


def adapted_modules(config: str, clip, options: dict | None = None) -> set[str]:
    """The module names PEFT adapts in `clip` from `config`'s visual_encoder_lora dict."""
    from mmengine.config import Config
    from peft import get_peft_model
    from xtuner.registry import BUILDER

    cfg = Config.fromfile(str(CONFIGS / f"{config}.py"))
    cfg.merge_from_dict(options or {})
    model = get_peft_model(clip, BUILDER.build(cfg.model.visual_encoder_lora))
    return {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A")
    }


def expected(layers) -> set[str]:
    return {f"vision_model.encoder.layers.{i}.{m}" for i in layers for m in CLIP_LAYER_LINEARS}


def test_paper_config_adapts_clip_l_layers_0_to_22():
    """CLIP ViT-L/14-336's 24 layers (at toy widths: the names are what matter)."""
    assert adapted_modules("llama3_moslora", tiny_clip_vision(layers=24)) == expected(range(23))
    assert adapted_modules("llama3_lora", tiny_clip_vision(layers=24)) == expected(range(23))
    # The documented switch back to the paper's exact targets: every layer.
    paper = {"model.visual_encoder_lora.layers_to_transform": None}
    every_layer = adapted_modules("llama3_moslora", tiny_clip_vision(layers=24), paper)
    assert every_layer == expected(range(24))


def test_tiny_config_adapts_the_tiny_clips_layers_0_and_1():
    from llava_moslora.builders.make_tiny import tiny_clip

    assert adapted_modules("tiny_moslora", tiny_clip()[0]) == expected(range(2))
    paper = {"model.visual_encoder_lora.layers_to_transform": None}
    assert adapted_modules("tiny_moslora", tiny_clip()[0], paper) == expected(range(3))
