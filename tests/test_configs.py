"""The XTuner configs: the paper's numbers live in llama3_moslora.py, the tiny ones inherit them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mmengine.config import Config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"}
VIT_TARGETS = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def load(name: str) -> Config:
    return Config.fromfile(str(CONFIGS / f"{name}.py"))


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """{"model.llm_lora.r": "64", "param_scheduler[1].end": "1", ...}, leaves as strings."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, (list, tuple)) and any(isinstance(v, dict) for v in obj):
        out = {}
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: str(obj)}


@pytest.fixture(scope="module")
def paper() -> Config:
    return load("llama3_moslora")


def test_paper_config_has_table_8_numbers(paper):
    from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
    from torch.optim import AdamW
    from xtuner.model import LLaVAModel
    from xtuner.utils import PROMPT_TEMPLATE

    from llava_moslora.moslora import moslora_config

    model = paper.model
    assert model.type is LLaVAModel
    assert model.freeze_llm and model.freeze_visual_encoder  # both towers adapted, not tuned
    assert model.llm.pretrained_model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert model.visual_encoder.pretrained_model_name_or_path == "openai/clip-vit-large-patch14-336"
    assert model.pretrained_pth.endswith("iter_2181.pth")  # XTuner's pretrained projector

    llm, vit = model.llm_lora, model.visual_encoder_lora
    assert llm.type is moslora_config and vit.type is moslora_config
    assert (llm.r, llm.lora_alpha, llm.lora_dropout) == (64, 128, 0.05)
    assert (vit.r, vit.lora_alpha, vit.lora_dropout) == (64, 16, 0.05)
    assert set(llm.target_modules) == LLM_TARGETS
    assert set(vit.target_modules) == VIT_TARGETS
    # ... in CLIP-L's layers 0-22: LLaVA reads layer 22's output (visual_select_layer=-2), so
    # layer 23 runs unread and adapters there would never learn (the paper adapts it anyway).
    assert model.visual_select_layer == -2
    assert vit.layers_to_transform == list(range(23))

    loader = paper.train_dataloader
    assert loader.batch_size == 8
    assert paper.optim_wrapper.accumulative_counts == 2
    assert loader.sampler.per_device_batch_size == 16
    assert paper.optim_wrapper.type is AmpOptimWrapper
    optimizer = paper.optim_wrapper.optimizer
    assert optimizer.type is AdamW
    assert (optimizer.lr, optimizer.weight_decay) == (2e-5, 0)
    assert paper.optim_wrapper.clip_grad.max_norm == 1
    warmup, cosine = paper.param_scheduler
    assert issubclass(warmup.type, LinearLR) and (warmup.begin, warmup.end) == (0, 0.03)
    assert issubclass(cosine.type, CosineAnnealingLR) and (cosine.begin, cosine.end) == (0.03, 1)
    assert cosine.eta_min == 0
    assert paper.train_cfg.max_epochs == 1

    dataset = loader.dataset
    assert dataset.max_length == 2048 - (336 // 14) ** 2 == 1472
    assert dataset.pad_image_to_square is True
    assert dataset.template_map_fn.template == PROMPT_TEMPLATE.llama3_chat
    assert dataset.data_path.endswith("llava_v1_5_mix665k.json")
    assert dataset.image_folder.endswith("llava_images")
    # One tokenizer and one image processor everywhere (lazy configs copy dicts, so check).
    assert (
        dataset.tokenizer.pretrained_model_name_or_path == model.llm.pretrained_model_name_or_path
    )
    for hook in paper.custom_hooks:
        assert hook.tokenizer == dataset.tokenizer


def test_paper_adapter_dicts_build_moslora_configs(paper):
    from peft import LoraConfig
    from xtuner.registry import BUILDER

    from llava_moslora.moslora import mixer_options_of

    for adapter in (paper.model.llm_lora, paper.model.visual_encoder_lora):
        config = BUILDER.build(adapter)
        assert isinstance(config, LoraConfig)
        options = mixer_options_of(config)
        assert options.init == "kaiming" and options.learnable and not options.init_only


# What the tiny configs must inherit unchanged: the method and the shape of the recipe. The ViT's
# adapted layers follow its depth (CLIP-L's 0-22 of 24, the tiny CLIP's 0-1 of 3): checked below.
RECIPE_KEYS = (
    r"model\.(type|freeze_llm|freeze_visual_encoder|llm\.type|visual_encoder\.type)$",
    r"model\.visual_select_layer$",
    r"model\.(llm|visual_encoder)_lora\.(?!type$|layers_to_transform$)",
    r"train_dataloader\.(collate_fn|sampler\.type|sampler\.length_property)",
    r"train_dataloader\.dataset\.(type|dataset_map_fn|template_map_fn|pad_image_to_square)",
    r"optim_wrapper\.(optimizer\.(type|betas|weight_decay)|clip_grad|accumulative_counts)",
    r"param_scheduler\[\d\]\.(type|start_factor|eta_min|by_epoch|convert_to_iter_based)",
)


def test_tiny_config_inherits_the_recipe_and_reads_only_local_files():
    paper, tiny = flatten(load("llama3_moslora").to_dict()), flatten(load("tiny_moslora").to_dict())
    recipe = [key for key in paper if any(re.match(p, key) for p in RECIPE_KEYS)]
    assert len(recipe) > 20
    assert {key: tiny.get(key) for key in recipe} == {key: paper[key] for key in recipe}
    assert tiny["optim_wrapper.type"] == "mmengine.optim.OptimWrapper"  # Amp refuses CPU

    hub_or_url = [(k, v) for k, v in tiny.items() if re.search(r"meta-llama|openai/|://", v)]
    assert not hub_or_url  # DESIGN invariant 6: the offline default reads local files only


def test_tiny_lora_differs_from_tiny_moslora_only_in_the_adapter_type():
    moslora, lora = flatten(load("tiny_moslora").to_dict()), flatten(load("tiny_lora").to_dict())
    differing = {k for k in moslora.keys() | lora.keys() if moslora.get(k) != lora.get(k)}
    assert differing == {"model.llm_lora.type", "model.visual_encoder_lora.type"}
    assert lora["model.llm_lora.type"] == "peft.LoraConfig"


# Every runnable config in configs/, and what it must differ in from the config it inherits.
VARIANTS = {
    "llama3_lora": ("llama3_moslora", {"model.llm_lora.type", "model.visual_encoder_lora.type"}),
    "internlm2_qlora": (
        "internlm2_qmoslora",
        {"model.llm_lora.type", "model.visual_encoder_lora.type"},
    ),
    "llama3_ts_mixing": (
        "llama3_moslora",
        {
            f"model.{t}_lora.{k}"
            for t in ("llm", "visual_encoder")
            for k in ("mixer_init", "mixer_trainable")
        },
    ),
    "llama3_moslora_orthogonal": (
        "llama3_moslora",
        {"model.llm_lora.mixer_init", "model.visual_encoder_lora.mixer_init"},
    ),
    "llama3_init_only": (
        "llama3_moslora",
        {"model.llm_lora.init_only", "model.visual_encoder_lora.init_only"},
    ),
    "llama3_dora": (
        "llama3_moslora",
        {f"model.{t}_lora.{k}" for t in ("llm", "visual_encoder") for k in ("type", "use_dora")},
    ),
    # the official repository's recipe: its lr, and no mixer on the vision tower
    "internlm2_qmoslora_official": (
        "internlm2_qmoslora",
        {"lr", "optim_wrapper.optimizer.lr", "model.visual_encoder_lora.type"},
    ),
    "tiny_lora": ("tiny_moslora", {"model.llm_lora.type", "model.visual_encoder_lora.type"}),
    "tiny_quickstart_lora": (
        "tiny_quickstart_moslora",
        {"model.llm_lora.type", "model.visual_encoder_lora.type"},
    ),
    # rank 8 of 64 (the paper's scales kept) and the mixer diagnostics hook; nothing else
    "tiny_ablation": (
        "tiny_quickstart_moslora",
        {"llm_rank", "llm_alpha", "visual_encoder_rank", "visual_encoder_alpha"}
        | {f"model.{t}_lora.{k}" for t in ("llm", "visual_encoder") for k in ("r", "lora_alpha")}
        | {"diagnostics_interval", "custom_hooks[1].type", "custom_hooks[1].interval"}
        # 3 epochs of its 4,000 images, where the main job trains 5 of 2,000
        | {"max_epochs", "train_cfg.max_epochs", "param_scheduler[0].end"}
        | {"param_scheduler[1].begin", "param_scheduler[1].end"},
    ),
    # the pretrained base's family B data, its val / test / old-family items and 1 epoch
    "tiny_ablation_pretrained": (
        "tiny_ablation",
        {"heldout_eval_path", "heldout_val_path", "forgetting_eval_path", "evaluation_images"}
        | {"max_epochs", "train_cfg.max_epochs", "param_scheduler[0].end"}
        | {"param_scheduler[1].begin", "param_scheduler[1].end"}
        | {
            f"{where}{k}"
            for where in ("", "llava_dataset.", "train_dataloader.dataset.")
            for k in ("data_path", "image_folder")
        },
    ),
    "tiny_qlora": ("tiny_qmoslora", {"model.llm_lora.type", "model.visual_encoder_lora.type"}),
    "tiny_compositional_lora": (
        "tiny_compositional_moslora",
        {"model.llm_lora.type", "model.visual_encoder_lora.type"},
    ),
    # The 4-bit LLM: the NF4 dict of _base_/nf4_quantization.py (also kept at top level) + dtype.
    "tiny_qmoslora": (
        "tiny_moslora",
        {"model.llm.torch_dtype"}
        | {
            f"{where}quantization_config.{k}"
            for where in ("", "model.llm.")
            for k in (
                "type",
                "load_in_4bit",
                "load_in_8bit",
                "llm_int8_threshold",
                "llm_int8_has_fp16_weight",
                "bnb_4bit_compute_dtype",
                "bnb_4bit_use_double_quant",
                "bnb_4bit_quant_type",
                "llm_int8_skip_modules",
            )
        },
    ),
}


def test_every_config_is_checked_here():
    runnable = {p.stem for p in CONFIGS.glob("*.py")}
    # tiny_compositional_moslora changes the data, ranks and schedule of tiny_moslora; it is run
    # end to end by tests/test_compositional.py and tests/test_ablate.py.
    # tiny_quickstart_moslora (the main job's) changes the rates and schedule of tiny_moslora;
    # tests/test_train_tiny.py builds its optimizer (tiny_ablation's, which inherits them).
    # vicuna_moslora and qwen2_moslora change only the backbone of llama3_moslora; each trains a
    # step and exports in tests/test_backbones.py.
    roots = {
        "llama3_moslora",
        "vicuna_moslora",
        "qwen2_moslora",
        "internlm2_qmoslora",
        "tiny_moslora",
        "tiny_compositional_moslora",
        "tiny_quickstart_moslora",
    }
    assert runnable == set(VARIANTS) | roots


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_vit_adapters_sit_in_the_layers_that_feed_the_selected_hidden_state(name):
    """LLaVA reads the second-to-last layer's output: of CLIP-L's 24 layers 0-22 feed it, of the
    tiny CLIP's 3 layers 0-1. Layers above it get no gradient, so no config adapts them."""
    cfg = load(name)
    assert cfg.model.visual_select_layer == -2
    feeding = 2 if name.startswith("tiny") else 23
    assert cfg.model.visual_encoder_lora.layers_to_transform == list(range(feeding))


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_no_loop_variable_is_left_as_a_config_key(name):
    """A `for hook in custom_hooks:` at a config's top level leaves `hook` as a key of it and of
    every child (a second copy of one hook that `--cfg-options` would not reach)."""
    assert not {"hook", "key", "value", "item", "name", "i"} & set(load(name).keys())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_overrides_only_what_it_names(name):
    parent_name, keys = VARIANTS[name]
    parent, child = flatten(load(parent_name).to_dict()), flatten(load(name).to_dict())
    assert {k for k in parent.keys() | child.keys() if parent.get(k) != child.get(k)} == keys


def test_internlm2_qmoslora_has_table_8_numbers():
    import torch
    from xtuner.utils import PROMPT_TEMPLATE

    from llava_moslora.moslora import moslora_config

    cfg = load("internlm2_qmoslora")
    llm, vit = cfg.model.llm_lora, cfg.model.visual_encoder_lora
    assert llm.type is moslora_config and vit.type is moslora_config
    assert (llm.r, llm.lora_alpha, vit.r, vit.lora_alpha) == (512, 256, 64, 16)
    assert set(llm.target_modules) == {
        "wqkv",
        "wo",
        "w1",
        "w2",
        "w3",
    }  # InternLM2's q,k,v,o,gate,up,down
    quant = cfg.model.llm.quantization_config
    assert (
        quant.load_in_4bit
        and quant.bnb_4bit_quant_type == "nf4"
        and quant.bnb_4bit_use_double_quant
    )
    assert quant.bnb_4bit_compute_dtype == torch.float16
    assert cfg.train_dataloader.batch_size == 16 and cfg.optim_wrapper.accumulative_counts == 1
    assert cfg.train_dataloader.sampler.per_device_batch_size == 16
    assert cfg.optim_wrapper.optimizer.lr == 2e-5  # the paper's Table 8, not XTuner's QLoRA 2e-4
    assert (
        cfg.model.pretrained_pth.endswith("iter_2181.pth")
        and "internlm2" in cfg.model.pretrained_pth
    )
    dataset = cfg.train_dataloader.dataset
    assert dataset.template_map_fn.template == PROMPT_TEMPLATE.internlm2_chat
    assert dataset.tokenizer.pretrained_model_name_or_path == "internlm/internlm2-chat-7b"
    for hook in cfg.custom_hooks:
        assert hook.tokenizer == dataset.tokenizer
        assert (
            hook.get("prompt_template", dataset.template_map_fn.template)
            == PROMPT_TEMPLATE.internlm2_chat
        )


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    from llava_moslora.builders.make_tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"), samples=4)


def build_with_tiny_towers(cfg: Config, tiny_paths):
    """`cfg`'s LLaVAModel with only the 8B towers swapped for local tiny ones."""
    import torch
    from xtuner.registry import BUILDER

    from llava_moslora.train import cpu_shims

    cpu_shims.apply()  # what the tiny configs install when parsed; GPU configs need none
    model = cfg.model
    model.llm.pretrained_model_name_or_path = str(tiny_paths["llm"])
    model.visual_encoder.pretrained_model_name_or_path = str(tiny_paths["clip"])
    model.pretrained_pth = str(tiny_paths["projector"])
    quantized = "quantization_config" in model.llm
    if quantized:
        # The stand-in is a LLaMA, so InternLM2's module names become LLaMA's; 4-bit on CPU
        # computes in float32 (bitsandbytes' CPU kernels).
        model.llm_lora.target_modules = sorted(LLM_TARGETS)
        model.llm.torch_dtype = torch.float32
        model.llm.quantization_config.bnb_4bit_compute_dtype = torch.float32
        # The stand-in's MLP is 224 wide: see tiny_qmoslora.py (not a thing real models need).
        model.llm.quantization_config.llm_int8_skip_modules = ["lm_head", "down_proj"]
    return BUILDER.build(model)


@pytest.mark.parametrize(
    "name", ["llama3_moslora", "internlm2_qmoslora", "vicuna_moslora", "qwen2_moslora"]
)
def test_paper_config_builds_with_tiny_stand_ins(name, tiny_paths):
    """The real config's model dict, with only the 8B towers swapped for local tiny ones."""
    from llava_moslora.moslora.layers import MoSLoRALinear

    cfg = load(name)
    quantized = "quantization_config" in cfg.model.llm
    llava = build_with_tiny_towers(cfg, tiny_paths)

    def adapted(tower):
        return [
            m for m in tower.modules() if hasattr(m, "lora_mixer") and "default" in m.lora_mixer
        ]

    llm_layers, vit_layers = adapted(llava.llm), adapted(llava.visual_encoder)
    assert len(llm_layers) == 7 * llava.llm.config.num_hidden_layers
    # The config adapts CLIP-L's layers 0-22, which include all 3 of the stand-in's (its last one
    # then runs unread: the start-of-run summary names it).
    assert len(vit_layers) == 6 * llava.visual_encoder.config.num_hidden_layers
    assert {m.r["default"] for m in llm_layers} == {cfg.model.llm_lora.r}
    assert {m.r["default"] for m in vit_layers} == {64}
    assert all(type(m) is MoSLoRALinear for m in vit_layers)
    if quantized:
        from llava_moslora.moslora.layers_bnb import MoSLoRALinear4bit

        four_bit = [m for m in llm_layers if isinstance(m, MoSLoRALinear4bit)]
        assert len(four_bit) == 6 * llava.llm.config.num_hidden_layers  # all but down_proj
        assert all(type(m) is MoSLoRALinear for m in llm_layers if m not in four_bit)
        assert four_bit[0].lora_mixer["default"].weight.shape == (512, 512)
    else:
        assert all(type(m) is MoSLoRALinear for m in llm_layers)
    state = llava.state_dict()
    assert sum("lora_mixer" in k for k in state) == len(llm_layers) + len(vit_layers)


def test_official_internlm2_recipe_builds_mixers_on_the_llm_only(tiny_paths):
    """internlm2_qmoslora_official: QMoSLoRA r512 on the 4-bit LLM, plain LoRA on CLIP, lr 2e-4."""
    from peft.tuners.lora import Linear as LoraLinear

    from llava_moslora.moslora.layers_bnb import MoSLoRALinear4bit

    cfg = load("internlm2_qmoslora_official")
    assert cfg.optim_wrapper.optimizer.lr == 2e-4 and load("internlm2_qmoslora").lr == 2e-5
    llava = build_with_tiny_towers(cfg, tiny_paths)
    llm_mixers = [m for m in llava.llm.modules() if isinstance(m, MoSLoRALinear4bit)]
    assert len(llm_mixers) == 6 * llava.llm.config.num_hidden_layers  # all but down_proj
    assert llm_mixers[0].lora_mixer["default"].weight.shape == (512, 512)
    vit = [m for m in llava.visual_encoder.modules() if hasattr(m, "lora_A")]
    assert len(vit) == 6 * llava.visual_encoder.config.num_hidden_layers
    assert all(type(m) is LoraLinear and not hasattr(m, "lora_mixer") for m in vit)
    assert {m.r["default"] for m in vit} == {64}
    assert not any("lora_mixer" in k for k in llava.visual_encoder.state_dict())


@pytest.mark.parametrize(
    "name", ["llama3_moslora", "internlm2_qmoslora", "internlm2_qmoslora_official", "tiny_moslora"]
)
def test_runs_print_the_adapter_summary_at_start(name):
    from llava_moslora.train.summary import AdapterSummaryHook

    assert load(name).default_hooks.adapter_summary.type is AdapterSummaryHook


def invariant_violations(cfg: Config) -> list[str]:
    """What in `cfg` disagrees with what it is derived from (a config copies dicts on
    inheritance, so a value set in one place and not in its copies drifts silently)."""
    found = []
    warmup, cosine = cfg.param_scheduler
    epochs = cfg.train_cfg.max_epochs
    if cfg.get("max_epochs") != epochs:
        found.append(f"train_cfg.max_epochs {epochs} != max_epochs {cfg.get('max_epochs')}")
    ends = (warmup.begin, warmup.end, cosine.begin, cosine.end)
    expected = (0, cfg.warmup_ratio * epochs, cfg.warmup_ratio * epochs, epochs)
    if ends != pytest.approx(expected):
        found.append(f"scheduler (begin, end, begin, end) {ends} != {expected}")
    loader, accumulate = cfg.train_dataloader, cfg.optim_wrapper.get("accumulative_counts", 1)
    if loader.batch_size != cfg.batch_size:
        found.append(f"train_dataloader.batch_size {loader.batch_size} != batch_size")
    per_device = loader.sampler.get("per_device_batch_size")
    if per_device is not None and per_device != loader.batch_size * accumulate:
        found.append(f"sampler.per_device_batch_size {per_device} != batch x {accumulate}")
    dataset = loader.dataset
    copies = {
        "tokenizer": (cfg.model.llm.pretrained_model_name_or_path,
                      cfg.tokenizer.pretrained_model_name_or_path),
        "image processor": (cfg.model.visual_encoder.pretrained_model_name_or_path,
                            cfg.image_processor.pretrained_model_name_or_path),
        "dataset tokenizer": (dataset.tokenizer, cfg.tokenizer),
        "dataset image processor": (dataset.image_processor, cfg.image_processor),
        "data_path": (dataset.data_path, cfg.data_path),
        "image_folder": (dataset.image_folder, cfg.image_folder),
        "max_length": (dataset.max_length, cfg.max_length),
    }  # fmt: skip
    for hook in cfg.custom_hooks:
        if "tokenizer" in hook:
            copies[f"{hook.type.__name__} tokenizer"] = (hook.tokenizer, cfg.tokenizer)
    found += [f"{name}: {a!r} != {b!r}" for name, (a, b) in copies.items() if a != b]
    return found


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_derived_values_agree_with_what_they_derive_from(name):
    """Scheduler ends = the epoch count, sampler batch = dataloader batch x accumulation, and every
    copy of a path (tokenizer, image processor, data, hooks) the same, in every config."""
    assert invariant_violations(load(name)) == []


def test_the_invariant_check_finds_a_copy_left_behind():
    cfg = load("tiny_moslora")
    cfg.train_cfg.max_epochs = 5  # an override that forgot the scheduler and max_epochs
    cfg.train_dataloader.sampler.per_device_batch_size = 3
    cfg.train_dataloader.dataset.data_path = "elsewhere.json"
    found = invariant_violations(cfg)
    assert len(found) == 4, found
    assert found[0].startswith("train_cfg.max_epochs 5 != max_epochs 2")
    assert found[1].startswith("scheduler (begin, end, begin, end) (0, 0.06, 0.06, 2) != (0, ")
    assert found[2] == "sampler.per_device_batch_size 3 != batch x 2"
    assert found[3].startswith("data_path: 'elsewhere.json' != ")


def schedule_config(**knobs) -> dict:
    """A config namespace as the bases leave it: knobs, and the dicts computed from them."""
    cfg = dict(max_epochs=1, warmup_ratio=0.03, batch_size=8, accumulative_counts=2) | knobs
    cfg.update(
        param_scheduler=[dict(type="LinearLR", begin=0, end=0.03), dict(begin=0.03, end=1)],
        train_cfg=dict(max_epochs=1),
        train_dataloader=dict(batch_size=8, sampler=dict(per_device_batch_size=16)),
        optim_wrapper=dict(accumulative_counts=2),
    )
    return cfg


def test_derive_schedule_sets_the_scheduler_ends_and_the_batch_from_the_knobs():
    from llava_moslora.train.schedule import derive_schedule

    cfg = schedule_config(max_epochs=3, warmup_ratio=0.1, batch_size=4, accumulative_counts=5)
    derive_schedule(cfg)
    warmup, main = cfg["param_scheduler"]
    assert (warmup["begin"], warmup["end"], main["begin"], main["end"]) == (0, 0.1 * 3, 0.1 * 3, 3)
    assert warmup["type"] == "LinearLR"  # the rest of each dict is kept
    assert cfg["train_cfg"] == dict(max_epochs=3)
    assert cfg["train_dataloader"] == dict(batch_size=4, sampler=dict(per_device_batch_size=20))
    assert cfg["optim_wrapper"] == dict(accumulative_counts=5)

    # a sampler that takes no per-device batch (mmengine's DefaultSampler) is left as it is
    cfg = schedule_config(batch_size=2)
    cfg["train_dataloader"]["sampler"] = dict(type="DefaultSampler", shuffle=True)
    derive_schedule(cfg)
    assert cfg["train_dataloader"] == dict(
        batch_size=2, sampler=dict(type="DefaultSampler", shuffle=True)
    )


def test_derive_schedule_on_a_config_with_its_own_values_changes_nothing():
    """The helper computes what the bases compute: on the paper config it is a no-op."""
    from llava_moslora.train.schedule import derive_schedule

    cfg = load("llama3_moslora")
    before = flatten(cfg.to_dict())
    derive_schedule(cfg)
    assert flatten(cfg.to_dict()) == before


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        (dict(max_epochs=0), r"`max_epochs` should be a positive number but the value passed is 0"),
        (
            dict(batch_size=2.5),
            r"`batch_size` should be a positive integer but the value passed is 2\.5",
        ),
        (
            dict(accumulative_counts=True),
            r"`accumulative_counts` should be a positive integer .* is True",
        ),
        (dict(warmup_ratio=1), r"`warmup_ratio` should be a fraction of the run in \[0, 1\)"),
    ],
)
def test_derive_schedule_refuses_bad_knobs(knobs, message):
    from llava_moslora.train.schedule import derive_schedule

    with pytest.raises(ValueError, match=message):
        derive_schedule(schedule_config(**knobs))


def test_derive_schedule_refuses_a_schedule_it_does_not_know_and_a_missing_name():
    from llava_moslora.train.schedule import derive_schedule

    cfg = schedule_config()
    cfg["param_scheduler"].append(dict(begin=1, end=2))
    with pytest.raises(ValueError, match=r"\[warm-up, main phase\] pair but has 3 entries"):
        derive_schedule(cfg)
    cfg = schedule_config()
    del cfg["warmup_ratio"], cfg["train_cfg"]
    with pytest.raises(ValueError, match=r"\['warmup_ratio', 'train_cfg'\] are not set; call it"):
        derive_schedule(cfg)


DERIVE_CALL = (
    '__import__("llava_moslora.train.schedule", fromlist=["derive_schedule"])'
    ".derive_schedule(globals())\n"
)


@pytest.mark.parametrize("calls_derive", [True, False])
def test_a_child_config_that_sets_only_its_knobs_gets_consistent_values(tmp_path, calls_derive):
    """A child of tiny_moslora (read through `read_base`, as XTuner reads it) that states only
    max_epochs, batch_size and accumulative_counts: with the one call every derived value follows
    them and nothing else changes; without it the inherited copies keep the old numbers."""
    import shutil

    shutil.copytree(CONFIGS, tmp_path / "configs")  # `from .tiny_moslora import *` is relative
    child = tmp_path / "configs" / "child.py"
    child.write_text(
        "from mmengine.config import read_base\n\n"
        "with read_base():\n"
        "    from .tiny_moslora import *\n\n"
        "max_epochs = 5\n"
        "batch_size = 2\n"
        "accumulative_counts = 3\n" + (DERIVE_CALL if calls_derive else "")
    )
    cfg = Config.fromfile(str(child))
    parent, flat = flatten(load("tiny_moslora").to_dict()), flatten(cfg.to_dict())
    differing = {k for k in parent.keys() | flat.keys() if parent.get(k) != flat.get(k)}
    knobs = {"max_epochs", "batch_size", "accumulative_counts"}
    if not calls_derive:
        assert differing == knobs
        assert invariant_violations(cfg) == [
            "train_cfg.max_epochs 2 != max_epochs 5",
            "train_dataloader.batch_size 4 != batch_size",
        ]
        return
    assert differing == knobs | {
        "param_scheduler[0].end",
        "param_scheduler[1].begin",
        "param_scheduler[1].end",
        "train_cfg.max_epochs",
        "train_dataloader.batch_size",
        "train_dataloader.sampler.per_device_batch_size",
        "optim_wrapper.accumulative_counts",
    }
    assert invariant_violations(cfg) == []
    warmup, main = cfg.param_scheduler
    assert (warmup.end, main.begin, main.end) == (0.03 * 5, 0.03 * 5, 5)
    assert cfg.train_cfg.max_epochs == 5
    assert (cfg.train_dataloader.batch_size, cfg.optim_wrapper.accumulative_counts) == (2, 3)
    assert cfg.train_dataloader.sampler.per_device_batch_size == 6
