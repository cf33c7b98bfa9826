"""Shape-true stand-ins (`make-tiny --shape`): the paper's widths, the paper configs unchanged but for paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_moslora.builders import standin
from llava_moslora.builders.internlm2 import InternLM2Config, write_remote_code
from tests.factories import assert_one_step_trains

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_cli_shape_names_match_the_module():
    from llava_moslora.cli import STANDIN_NAMES

    assert tuple(standin.STANDINS) == STANDIN_NAMES


@pytest.mark.parametrize(
    ("shape", "params"),
    [
        # The published parameter counts of the full-depth models (hub safetensors metadata).
        (standin.LLAMA3_8B, 8_030_261_248),
        (standin.INTERNLM2_7B, 7_737_708_544),
        (standin.STANDINS["vicuna-7b"].llm, 6_738_415_616),  # lmsys/vicuna-7b-v1.5
        (standin.STANDINS["qwen2.5-7b"].llm, 7_615_616_512),  # Qwen/Qwen2.5-7B-Instruct
    ],
)
def test_full_depth_configs_have_the_real_models_parameter_counts(shape, params):
    with torch.device("meta"):
        model = standin.build_llm(standin.llm_config(shape, shape.layers))
    assert sum(p.numel() for p in model.parameters()) == params


def test_clip_shape_is_vit_l_14_336():
    from transformers import CLIPVisionModel

    vision = standin.CLIP_L_336
    assert vision.image_tokens == 576
    with torch.device("meta"):
        clip = CLIPVisionModel(standin.clip_config(vision, vision.layers))
    assert (
        sum(p.numel() for p in clip.parameters()) == 303_507_456
    )  # openai/clip-vit-large-patch14-336


def test_unknown_shape_and_bad_depth_are_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"`shape` should be one of llama3-8b, vicuna-7b, .* 'gpt5'"
    ):
        standin.make_standin(tmp_path, "gpt5")
    with pytest.raises(ValueError, match="`llm_layers` should be a positive integer .* 0"):
        standin.make_standin(tmp_path, "mid", llm_layers=0)


def test_internlm2_stand_in_loads_as_remote_code_with_internlm2_names_and_generates(tmp_path):
    """A folder with our remote-code shim loads through AutoModelForCausalLM as the hub model does."""
    from transformers import AutoModelForCausalLM

    config = InternLM2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config.auto_map = dict(standin.llm_config(standin.INTERNLM2_7B, 1).auto_map)
    torch.manual_seed(0)
    standin.build_llm(config, torch.float32).save_pretrained(tmp_path)
    write_remote_code(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(model).__name__ == "InternLM2ForCausalLM"
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"wqkv", "wo", "w1", "w2", "w3", "output", "tok_embeddings"} <= names
    # wqkv: (4 query heads + 2 x 2 KV heads) x head_dim 16
    assert model.model.layers[0].attention.wqkv.weight.shape == ((4 + 2 * 2) * 16, 64)

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and out.logits.shape == (1, 6, 64)
    # The KV cache gives the same next-token logits as a full recompute.
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[:, -1]
        cached = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=cached.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 9)


def test_path_overrides_touch_only_paths(tmp_path):
    paths = standin.standin_paths(tmp_path)
    paths["images"].mkdir(parents=True)
    (paths["images"] / "000000.png").write_bytes(b"")
    overrides = standin.path_overrides(CONFIGS / "llama3_moslora.py", paths)
    # Each value is a stand-in path, each key a place the paper config names a model, data or URL.
    assert set(overrides.values()) <= {str(p) for p in paths.values()} | {
        str(paths["images"] / "000000.png")
    }
    assert overrides["model.llm.pretrained_model_name_or_path"] == str(paths["llm"])
    assert overrides["tokenizer.pretrained_model_name_or_path"] == str(paths["llm"])
    assert overrides["train_dataloader.dataset.tokenizer.pretrained_model_name_or_path"] == str(
        paths["llm"]
    )
    assert overrides["custom_hooks.1.evaluation_images"].endswith("000000.png")
    assert overrides["model.pretrained_pth"] == str(paths["projector"])
    assert not any(k.startswith(("optim_wrapper", "param_scheduler")) for k in overrides)
    internlm2 = standin.path_overrides(CONFIGS / "internlm2_qmoslora.py", paths)
    assert internlm2["model.llm.pretrained_model_name_or_path"] == str(paths["llm"])


@pytest.fixture(scope="module")
def llama3_8b_standin(tmp_path_factory):
    """1 LLM layer, 1 ViT layer at LLaMA-3-8B / CLIP-L widths: 2.5 GB on disk, ~45 s on 2 CPUs."""
    out = tmp_path_factory.mktemp("llama3_8b")
    return standin.make_standin(out, "llama3-8b", llm_layers=1, vit_layers=1, samples=2)


@pytest.mark.slow
def test_llama3_8b_stand_in_has_the_real_widths_and_trains_through_the_paper_config(
    llama3_8b_standin,
):
    """The paper config with path overrides only builds on it; one step at a short length trains.

    The step runs at max_length 64 (a sequence-length override, not a path: a full 2048-position
    step in float32 on 2 CPU cores takes minutes; the GPU check runs the full length). The data
    itself is checked at the paper's length: 1472 text tokens + 576 image tokens.
    """
    from mmengine.config import Config
    from safetensors import safe_open
    from xtuner.registry import BUILDER

    from llava_moslora.train import cpu_shims

    paths = llama3_8b_standin
    with safe_open(paths["llm"] / "model.safetensors", "pt") as f:
        names = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
        dtypes = {f.get_slice(k).get_dtype() for k in names}
    assert dtypes == {"BF16"}
    assert shapes["model.embed_tokens.weight"] == (128256, 4096)
    assert shapes["lm_head.weight"] == (128256, 4096)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (8 * 128, 4096)  # 8 KV heads
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 14336)
    assert "model.layers.1.mlp.down_proj.weight" not in shapes
    projector = torch.load(paths["projector"], weights_only=True)["state_dict"]
    assert projector["projector.model.0.weight"].shape == (4096, 1024)
    assert projector["projector.model.2.weight"].shape == (4096, 4096)

    cpu_shims.apply()  # what the tiny configs install when parsed; GPU runs need none
    cfg = Config.fromfile(str(CONFIGS / "llama3_moslora.py"))
    overrides = standin.path_overrides(CONFIGS / "llama3_moslora.py", paths)
    cfg.merge_from_dict(overrides)
    dataset = BUILDER.build(cfg.train_dataloader.dataset)
    assert [len(dataset[i]["input_ids"]) for i in range(2)] == [1472, 1472]  # + 576 = 2048
    assert dataset[0]["pixel_values"].shape == (3, 336, 336)

    llava = BUILDER.build(cfg.model).train()
    assert llava.visual_encoder.config.hidden_size == 1024
    assert llava.visual_encoder.config.image_size == 336
    adapted = [m for m in llava.modules() if hasattr(m, "lora_mixer") and "default" in m.lora_mixer]
    assert len(adapted) == 7 + 6  # every paper target of the 1 LLM layer and the 1 ViT layer
    assert {tuple(m.lora_mixer["default"].weight.shape) for m in adapted} == {(64, 64)}

    cfg.train_dataloader.dataset.max_length = 64
    short = BUILDER.build(cfg.train_dataloader.dataset)
    assert_one_step_trains(llava, short[0], adapted[0].lora_mixer["default"].weight)
    assert json.loads((paths["llm"].parent / "standin.json").read_text())["llm_layers"] == 1
