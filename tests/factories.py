"""Tiny models and data the tests build (nothing is downloaded): models in memory from config
objects, the tiny LLaVA on disk (`make-tiny`, once per setting per session), the trained tiny LLaVA
the export tests start from, and the exports and VLMEvalKit runs of the offline evaluation.

Loaded as a pytest plugin by tests/conftest.py; its fixtures are every test's, its helpers are
imported from here. Session-scoped folders are shared by every test that asks for them: read
them, never write into them (copy first, as test_launch.py does).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from llava_moslora.builders.tiny import CLIP_TARGETS, tiny_clip_vision, tiny_llama
from llava_moslora.builders.tiny import LLAMA_TARGETS as _LLAMA

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TINY_MOSLORA = str(CONFIGS / "tiny_moslora.py")
TINY_LORA = str(CONFIGS / "tiny_lora.py")

LLAMA_TARGETS = list(_LLAMA)
# CLIP's adapted linears inside one encoder layer, as PEFT names them, in the order CLIPAttention
# and CLIPMLP define them (and named_parameters lists them).
CLIP_LAYER_LINEARS = (
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.q_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)

# --- tiny models in memory ---------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 8) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


def make_mlp(seed: int = 0, **kwargs) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kwargs)


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, hidden_size: int = 32):
    return tiny_llama(seed, dtype=dtype, hidden_size=hidden_size)


# Layer widths 64 and 128: bitsandbytes' AVX512 CPU kernel mis-dequantizes rows that are a multiple
# of 16 but not of its 64-wide blocks (llava_moslora.moslora.layers_bnb), so 4-bit tests use these.
HIDDEN_4BIT = 64


def make_tiny_clip_vision(seed: int = 0):
    return tiny_clip_vision(seed)


def build_llava(seed: int = 0):
    """XTuner's LLaVAModel on the in-memory tiny towers (2-layer LLaMA, 2-layer CLIP), MoSLoRA on
    both: r=8 on every LLM linear, r=4 on the ViT's."""
    from xtuner.model import LLaVAModel

    from llava_moslora.moslora import moslora_config

    torch.manual_seed(seed)
    return LLaVAModel(
        llm=make_tiny_llama(seed),
        visual_encoder=make_tiny_clip_vision(seed),
        freeze_llm=True,
        freeze_visual_encoder=True,
        llm_lora=dict(
            type=moslora_config,
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            bias="none",
            task_type="CAUSAL_LM",
        ),
        visual_encoder_lora=dict(
            type=moslora_config, r=4, lora_alpha=2, target_modules=list(CLIP_TARGETS), bias="none"
        ),
    )


def nf4_config(compute_dtype: torch.dtype = torch.float32, **extra):
    """4-bit NF4 with double quantization, the QLoRA recipe (configs/internlm2_qmoslora.py)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **extra,
    )


def load_4bit(path: Path, **extra):
    """The LLaMA saved at `path`, its linears quantized to NF4 on load (float32 compute).

    4-bit loading on CPU wants float32 around the quantized layers (bitsandbytes' CPU kernels).
    """
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(
        path, quantization_config=nf4_config(**extra), torch_dtype=torch.float32
    )


def qmoslora(path: Path, **kwargs):
    """QMoSLoRA (r=8 on every linear) on the 4-bit LLaMA saved at `path`."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from llava_moslora.moslora import moslora_config

    model = prepare_model_for_kbit_training(load_4bit(path), use_gradient_checkpointing=False)
    config = moslora_config(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, **kwargs)
    return get_peft_model(model, config)


@pytest.fixture(scope="session")
def llama_4bit_dir(tmp_path_factory) -> Path:
    """The tiny LLaMA at the 4-bit tests' width (HIDDEN_4BIT), saved once; load it with
    `load_4bit` or `qmoslora`."""
    path = tmp_path_factory.mktemp("tiny_llama_4bit")
    make_tiny_llama(0, hidden_size=HIDDEN_4BIT).save_pretrained(path)
    return path


def trained_moslora(seed: int = 0):
    """(base, MoSLoRA on a copy): the tiny LLaMA with r=8 MoSLoRA on every linear, B random and
    the mixer orthogonal, so the adapter changes the output as a trained one would."""
    import copy

    from peft import get_peft_model

    from llava_moslora.moslora import moslora_config

    base = make_tiny_llama(seed)
    config = moslora_config(
        r=8,
        lora_alpha=16,
        target_modules=LLAMA_TARGETS,
        init_lora_weights=False,
        mixer_init="orthogonal",
    )
    return base, get_peft_model(copy.deepcopy(base), config)


def copy_lora_weights(src, dst, adapter: str = "default") -> None:
    """Copy lora_A / lora_B of every adapted layer from `src` to the same layers of `dst`."""
    src_layers = dict(src.named_modules())
    with torch.no_grad():
        for name, module in dst.named_modules():
            if hasattr(module, "lora_A") and adapter in module.lora_A:
                other = src_layers[name]
                module.lora_A[adapter].weight.copy_(other.lora_A[adapter].weight)
                module.lora_B[adapter].weight.copy_(other.lora_B[adapter].weight)


def moslora_layers(model, adapter: str = "default"):
    return [m for m in model.modules() if hasattr(m, "lora_mixer") and adapter in m.lora_mixer]


@pytest.fixture(autouse=True)
def _autograd_stays_on():
    """`import vlmeval.vlm` switches autograd off process-wide (see llava_moslora.eval's
    import_vlmeval); tests that import VLMEvalKit directly must not leak that into later tests."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


def vlmevalkit_mcq_prompts(tsv, tmp_path, monkeypatch) -> list[str]:
    """Build `tsv` with VLMEvalKit itself (its name unknown, so read as a custom MCQ set, from a
    copy in a fresh $LMUData) and return the text of every row's prompt."""
    from llava_moslora.eval import import_vlmeval

    root = tmp_path / "LMUData"
    root.mkdir()
    shutil.copy(tsv, root / "my_mcq_set.tsv")
    monkeypatch.setenv("LMUData", str(root))
    dataset = import_vlmeval("vlmeval.dataset").build_dataset("my_mcq_set")
    assert type(dataset).__name__ == "CustomMCQDataset"
    prompts = []
    for _, row in dataset.data.iterrows():
        message = dataset.build_prompt(row)
        assert [part["type"] for part in message] == ["image", "text"]
        prompts.append(message[1]["value"])
    return prompts


# --- the tiny LLaVA on disk (`llava-moslora make-tiny`) ---------------------------------------


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_llava(samples=160, **make_tiny_options)`: the folder `make-tiny` writes, built once
    per setting in a session. The models are the same whatever the samples (seeded); the first
    N samples are the same for any count above N."""
    from llava_moslora.builders.make_tiny import make_tiny

    built: dict[tuple, Path] = {}

    def folder(samples: int = 160, **options) -> Path:
        key = (samples, *sorted(options.items()))
        if key not in built:
            built[key] = tmp_path_factory.mktemp(f"tiny{samples}")
            make_tiny(built[key], samples=samples, **options)
        return built[key]

    return folder


@pytest.fixture(scope="session")
def tiny_dir(tiny_llava) -> Path:
    """The tiny LLaVA most tests read: 160 samples, 40 iterations an epoch at the tiny configs'
    batch 4, so their warm-up (3 % of 2 epochs) is 2 iterations as mmengine rounds it (fewer
    samples get the 1-iteration minimum of llava_moslora/train/schedule.py)."""
    return tiny_llava(samples=160)


@contextmanager
def tiny_dir_in_env(tiny_dir: Path) -> Iterator[Path]:
    """configs/tiny_*.py read $LLAVA_MOSLORA_TINY_DIR when they are parsed."""
    old = os.environ.get("LLAVA_MOSLORA_TINY_DIR")
    os.environ["LLAVA_MOSLORA_TINY_DIR"] = str(tiny_dir)
    try:
        yield tiny_dir
    finally:
        if old is None:
            os.environ.pop("LLAVA_MOSLORA_TINY_DIR", None)
        else:
            os.environ["LLAVA_MOSLORA_TINY_DIR"] = old


@pytest.fixture(scope="module")
def tiny_env(tiny_dir) -> Iterator[Path]:
    """`tiny_dir`, set as $LLAVA_MOSLORA_TINY_DIR for the rest of the module."""
    with tiny_dir_in_env(tiny_dir):
        yield tiny_dir


@pytest.fixture(scope="module")
def no_process_group_left_behind() -> Iterator[None]:
    """For a module whose runs start a process group in this process (`--deepspeed`, `--fsdp`:
    hf_deepspeed._single_process_env sets RANK/.../MASTER_PORT, and the gloo group keeps listening
    on that port): at the module's end the group is destroyed and the variables restored, or
    later modules' subprocesses would inherit them and find the port taken (EADDRINUSE), and
    in-process tests a group already up. The group lives for the module (DeepSpeed and accelerate
    keep handles to it between runs; every FSDP run joins it). Use it with
    `pytestmark = pytest.mark.usefixtures("no_process_group_left_behind")`."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {name: os.environ.get(name) for name in names}
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def read_config(name: str, options: dict | None = None):
    """configs/NAME.py as mmengine parses it, `options` (`--cfg-options`) merged in. The tiny
    configs read $LLAVA_MOSLORA_TINY_DIR (`tiny_env`) as they are parsed."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(CONFIGS / f"{name}.py"))
    cfg.merge_from_dict(options or {})
    return cfg


def build_from_config(name: str, options: dict | None = None, seed: int = 0):
    """(cfg, model): `read_config(name, options)` and its LLaVAModel, built from `cfg.model` as
    `xtuner train` builds it after `torch.manual_seed(seed)`, in train mode."""
    from xtuner.registry import BUILDER

    cfg = read_config(name, options)
    torch.manual_seed(seed)
    return cfg, BUILDER.build(cfg.model).train()


@pytest.fixture(scope="session")
def tiny_samples(tiny_dir) -> list[dict]:
    """The first two training samples of configs/tiny_moslora.py's dataset on `tiny_dir` (the
    tiny configs share it), as its dataloader yields them; built once, since building the dataset
    starts worker processes (seconds)."""
    from xtuner.registry import BUILDER

    with tiny_dir_in_env(tiny_dir):
        dataset = BUILDER.build(read_config("tiny_moslora").train_dataloader.dataset)
        return [dataset[0], dataset[1]]


# --- the trained tiny LLaVA the export tests start from --------------------------------------

IMAGE_TOKEN_INDEX = -200  # xtuner.utils.IMAGE_TOKEN_INDEX: where LLaVAModel splices the image
QUESTION = "How many shapes are there?"
# float32 throughout, same base weights: the reloaded adapters compute the same products, so
# only summation order can differ (fused vs chained B·M, merged W0 + ΔW vs W0 x + ΔW x).
FP32_ATOL = 1e-4


def randomise_trained_tensors(model, seed: int = 1) -> None:
    """What training would have moved: B (zero at init), the mixers, the projector."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_mixer" in name or name.startswith("projector."):
                noise = torch.randn(param.shape, generator=generator) * 0.1
                param.add_(noise.to(param.dtype))


def save_mmengine_checkpoint(model, path: Path, seed: int | None = 7) -> Path:
    torch.save({"state_dict": model.state_dict(), "meta": {"seed": seed}}, path)
    return path


def llava_model_logits(model, inputs) -> torch.Tensor:
    """The training model's own forward (LLaVAModel, mode="tensor"); it mutates `data`."""
    data = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"].clone()}
    with torch.no_grad():
        return model(data, mode="tensor").logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.float() - b.float()).abs().max().item()
    print(f"max abs diff {diff:.3g}")  # shown with `pytest -s`: the measured values quoted here
    return diff


@pytest.fixture(scope="session")
def inputs(tiny_dir):
    """One image question as XTuner lays it out: ids with one IMAGE_TOKEN_INDEX, pixel values."""
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor
    from xtuner.utils import PROMPT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llm")
    prompt = PROMPT_TEMPLATE.llama3_chat.INSTRUCTION.format(input="<image>\n" + QUESTION, round=1)
    before, after = prompt.split("<image>")
    # xtuner chat / EvaluateChatHook: BOS + first chunk, the image index, the rest without BOS.
    ids = tokenizer.encode(before) + [IMAGE_TOKEN_INDEX]
    ids += tokenizer.encode(after, add_special_tokens=False)
    image = Image.open(tiny_dir / "data" / "images" / "000000.png").convert("RGB")
    processor = CLIPImageProcessor.from_pretrained(tiny_dir / "clip")
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": pixel_values,
        "prompt": prompt,
        "image": image,
    }


@pytest.fixture(scope="session")
def _trained(tiny_dir, tmp_path_factory, inputs):
    with tiny_dir_in_env(tiny_dir):
        _, model = build_from_config("tiny_moslora")
    model.eval()  # no LoRA dropout
    before = llava_model_logits(model, inputs)
    randomise_trained_tensors(model)
    logits = llava_model_logits(model, inputs)
    with model.llm.disable_adapter(), model.visual_encoder.disable_adapter():
        no_adapters = llava_model_logits(model, inputs)
    # The adapters and the projector change the output: equalities below mean something.
    assert (logits - before).abs().max() > 0.5
    assert (logits - no_adapters).abs().max() > 0.5
    path = save_mmengine_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "iter_1.pth")
    return model, path, logits


@pytest.fixture(scope="module")
def trained(_trained, tiny_env):
    """(model, iter_1.pth, logits): the tiny MoSLoRA LLaVA of configs/tiny_moslora.py, its
    adapters and projector perturbed, saved as mmengine saves a checkpoint; built once a session,
    read-only. Sets $LLAVA_MOSLORA_TINY_DIR for the module, so the config parses to this model."""
    return _trained


# --- the offline evaluation: exports in every layout, the tiny suite run through VLMEvalKit -----


def _export_manifest(fmt: str, tiny_dir: Path, merged: bool):
    from llava_moslora.export.manifest import ExportManifest

    return ExportManifest(
        format=fmt,
        llm=None if merged else str(tiny_dir / "llm"),
        visual_encoder=None if merged else str(tiny_dir / "clip"),
        prompt_template="llama3_chat",
        system="",
        visual_select_layer=-2,
        pad_image_to_square=True,
        adapter_kind="moslora",
        mixer={"llm": {"init": "kaiming"}, "visual_encoder": {"init": "kaiming"}},
        quantized_base=False,
        dtype="float32",
        config="configs/tiny_moslora.py",
        checkpoint="tests/factories.py fixture",
        seed=0,
        trust_remote_code=False,
    )


@pytest.fixture(scope="session")
def tiny_exports(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaVA with random MoSLoRA adapters on both towers, in all four export layouts
    (written here with PEFT/transformers/xtuner + our io helpers), plus the adapter-free base
    ("base") and a scene image ("image")."""
    import copy

    from peft import get_peft_model
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM
    from xtuner.model.modules import ProjectorConfig, ProjectorModel
    from xtuner.utils import PROMPT_TEMPLATE

    from llava_moslora.export.hf_llava import build_hf_llava
    from llava_moslora.export.manifest import write_manifest
    from llava_moslora.moslora import moslora_config, save_adapter, save_folded

    root = tmp_path_factory.mktemp("exports")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llm")
    processor = CLIPImageProcessor.from_pretrained(tiny_dir / "clip")
    projector = ProjectorModel(ProjectorConfig(visual_hidden_size=64, llm_hidden_size=64, depth=2))
    state = torch.load(tiny_dir / "projector" / "iter_0.pth", weights_only=True)["state_dict"]
    projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()})

    torch.manual_seed(0)
    # init_lora_weights=False: random B, so the adapters change the outputs (equalities mean something)
    llm = get_peft_model(
        LlamaForCausalLM.from_pretrained(tiny_dir / "llm"),
        moslora_config(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False),
    )
    vit = get_peft_model(
        CLIPVisionModel.from_pretrained(tiny_dir / "clip"),
        moslora_config(
            r=8, lora_alpha=16, target_modules=list(CLIP_TARGETS), init_lora_weights=False
        ),
    )
    out = {}
    for fmt, save in (("xtuner", save_adapter), ("peft-folded", save_folded)):
        out[fmt] = root / fmt
        save(llm, out[fmt] / "llm_adapter")
        save(vit, out[fmt] / "visual_encoder_adapter")
        projector.save_pretrained(out[fmt] / "projector")
        write_manifest(out[fmt], _export_manifest(fmt, tiny_dir, merged=False))

    merged_llm = copy.deepcopy(llm).merge_and_unload()
    merged_vit = copy.deepcopy(vit).merge_and_unload()
    base_llm = LlamaForCausalLM.from_pretrained(tiny_dir / "llm")
    base_vit = CLIPVisionModel.from_pretrained(tiny_dir / "clip")
    for name, (lm, vt) in {
        "merged-xtuner": (merged_llm, merged_vit),
        "base": (base_llm, base_vit),
    }.items():
        out[name] = root / name
        lm.save_pretrained(out[name] / "llm")
        tokenizer.save_pretrained(out[name] / "llm")
        vt.save_pretrained(out[name] / "visual_encoder")
        processor.save_pretrained(out[name] / "visual_encoder")
        projector.save_pretrained(out[name] / "projector")
        write_manifest(out[name], _export_manifest("merged-xtuner", tiny_dir, merged=True))

    hf_model, hf_processor = build_hf_llava(
        copy.deepcopy(merged_llm),
        copy.deepcopy(merged_vit),
        projector,
        AutoTokenizer.from_pretrained(tiny_dir / "llm"),
        processor,
        visual_select_layer=-2,
        prompt_template=PROMPT_TEMPLATE.llama3_chat,
        pad_image_to_square=True,
    )
    out["hf-llava"] = root / "hf-llava"
    hf_model.save_pretrained(out["hf-llava"])
    hf_processor.save_pretrained(out["hf-llava"])
    write_manifest(out["hf-llava"], _export_manifest("hf-llava", tiny_dir, merged=True))
    out["image"] = root / "scene.png"
    _scene_image().save(out["image"])
    return out


def _scene_image():
    import random

    from llava_moslora.data import synthetic
    from llava_moslora.data.drawing import draw

    rng = random.Random(3)
    return draw(synthetic.random_scene(rng).objects, rng)


def scene_answers(records: dict, lmu_data: Path) -> dict[tuple[str, str], str]:
    """{(image key, question): answer} of the tiny benchmark `records` written in `lmu_data`."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    from llava_moslora.eval.tiny_bench import image_key

    answers = {}
    for name, recs in records.items():
        frame = pd.read_csv(lmu_data / f"{name}.tsv", sep="\t")
        images = {str(i): img for i, img in zip(frame["index"], frame["image"], strict=True)}
        for rec in recs:
            b64 = images[str(rec.index)]
            b64 = images[b64] if len(b64) <= 64 else b64
            key = image_key(Image.open(io.BytesIO(base64.b64decode(b64))))
            answers[(key, rec.question)] = rec.answer_text
    return answers


def make_oracle(records, lmu_data):
    """A VLMEvalKit model (test double) that answers every question right, from the scene drawn
    in the image."""
    import re
    import string

    from PIL import Image

    from llava_moslora.eval import import_vlmeval
    from llava_moslora.eval.benchmarks import TINY_TYPE
    from llava_moslora.eval.tiny_bench import image_key

    class Oracle(import_vlmeval("vlmeval.vlm.base").BaseModel):
        def __init__(self):
            super().__init__()
            self.table = scene_answers(records, lmu_data)

        def generate_inner(self, message, dataset=None):
            prompt, image = self.message_to_promptimg(message, dataset)
            key = image_key(Image.open(image))
            answer = next(a for (k, q), a in self.table.items() if k == key and q in prompt)
            if TINY_TYPE[dataset] == "MCQ":  # the letter whose option text is the answer
                return next(
                    letter
                    for letter in string.ascii_uppercase[:4]
                    if re.search(rf"^{letter}\. {re.escape(answer)}$", prompt, re.M)
                )
            return answer

    return Oracle()


def make_constant():
    """A VLMEvalKit model (test double) that always answers "A" / "Yes" / "red": chance-level by
    construction."""
    from llava_moslora.eval import import_vlmeval
    from llava_moslora.eval.benchmarks import TINY_TYPE

    class Constant(import_vlmeval("vlmeval.vlm.base").BaseModel):
        def generate_inner(self, message, dataset=None):
            return {"MCQ": "A", "Y/N": "Yes", "VQA": "red"}[TINY_TYPE[dataset]]

    return Constant()


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_exports) -> dict:
    """The offline suite in a temporary $LMUData, run for an oracle, a constant answerer and the
    tiny LLaVA (xtuner export), offline: any download or TCP connection raises.
    {"work": runs' folder, "lmu": $LMUData, "records": the questions, "summaries": {run: ...}}."""
    from llava_moslora.eval.benchmarks import TINY
    from llava_moslora.eval.manifest import read_export_manifest
    from llava_moslora.eval.model import GenerationSettings, LLaVAMoSLoRA
    from llava_moslora.eval.runner import run_benchmarks
    from llava_moslora.eval.tiny_bench import write_tiny_bench

    lmu = tmp_path_factory.mktemp("LMUData")
    records = write_tiny_bench(lmu, per_category=1)  # 6 questions per MMBench language
    work = tmp_path_factory.mktemp("runs")
    settings = GenerationSettings(max_new_tokens=8, short_max_new_tokens=8)
    manifest = read_export_manifest(tiny_exports["xtuner"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMUData", str(lmu))
        mp.delenv("OPENAI_API_KEY", raising=False)
        models = {
            "oracle": make_oracle(records, lmu),
            "constant": make_constant(),
            "tiny_llava": LLaVAMoSLoRA(tiny_exports["xtuner"], generation=settings),
        }
        summaries = {
            name: run_benchmarks(
                list(TINY),
                work_dir=work,
                run_name=name,
                model=model,
                manifest=manifest,
                generation=settings.as_dict(),
                offline=True,
                log=lambda _: None,
            )
            for name, model in models.items()
        }
    return {"work": work, "lmu": lmu, "records": records, "summaries": summaries}


def assert_one_step_trains(llava, sample: dict, mixer: torch.Tensor) -> None:
    """One AdamW step of a built LLaVAModel on one dataset `sample`: a finite loss, and `mixer`
    (a learnable mixer weight of it) moved."""
    from xtuner.dataset.collate_fns import default_collate_fn

    params = [p for p in llava.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = mixer.detach().clone()
    loss = llava(default_collate_fn([sample])["data"], mode="loss")["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(mixer.detach(), before)
