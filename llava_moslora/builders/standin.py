"""Shape-true stand-ins: the paper's towers at their real widths, few layers, random weights.

`llava-moslora make-tiny DIR --shape NAME [--llm-layers N --vit-layers M]`, NAME one of STANDINS:

    DIR/llm/         the backbone at its real widths (backbones.BACKBONES): LLaMA-3-8B (hidden 4096,
                     MLP 14336, 32 heads over 8 KV heads, vocab 128256), Vicuna-7B (LLaMA-2-7B),
                     Qwen2.5-7B-Instruct or InternLM2-7B (fused wqkv; llava_moslora.builders.internlm2
                     as remote code) with N layers, bf16 safetensors, + a byte-level BPE tokenizer
                     with the family's real chat tokens
    DIR/clip/        CLIP ViT-L/14-336 (1024 wide, 16 heads, MLP 4096, (336 // 14) ** 2 = 576 image
                     tokens) with M layers + the real image processor settings
    DIR/projector/   XTuner's projector 1024 -> 4096 -> 4096 (bf16, mmengine checkpoint layout)
    DIR/data/        synthetic LLaVA data (llava_moslora.data.synthetic) whose conversations fill the
                     paper's 2048 positions: 2048 - 576 = 1472 text tokens after XTuner's truncation

The paper configs train on it unchanged except for paths: `path_overrides(config, paths)` lists
the `--cfg-options` that point a config at a stand-in (`llava-moslora standin-options`).
The `mid` shape (LLaMA-3 proportions at hidden 1024, 4 layers, vocab 8192, sequence 1024 with
576 image tokens) is the CPU benchmark size of docs/performance.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_moslora.data import synthetic
from llava_moslora.data.prompts import IMAGE_TOKEN

from . import make_tiny
from .backbones import BACKBONES, LLMShape, build_llm, llm_config

__all__ = ["build_llm", "llm_config"]  # re-exported: `plan` and the tests build LLMs from here


@dataclass(frozen=True)
class VisionShape:
    hidden: int = 1024
    intermediate: int = 4096
    heads: int = 16
    layers: int = 24
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 576 for ViT-L/14-336


@dataclass(frozen=True)
class StandIn:
    """What `make-tiny --shape NAME` builds: an LLM and a ViT at given widths, a sequence length."""

    llm: LLMShape
    vision: VisionShape
    seq_length: int  # LLM positions per sample, image tokens included
    llm_layers: int  # stand-in defaults
    vit_layers: int


CLIP_L_336 = VisionShape()  # openai/clip-vit-large-patch14-336
# make_tiny's CLIP: 64 wide, 56 px images in 14 px patches, 16 image tokens
TINY_CLIP = VisionShape(
    64, 256, 4, make_tiny.TINY_CLIP_LAYERS, make_tiny.IMAGE_SIZE, make_tiny.PATCH_SIZE, 64
)
LLAMA3_8B = BACKBONES["llama3"].real
INTERNLM2_7B = BACKBONES["internlm2"].real
# Stand-in name -> its widths: one per backbone at the hub model's real widths (the name says the
# model), and `mid`. `--tiny` swaps in the backbone's test widths and the tiny CLIP.
STANDINS = {
    "llama3-8b": StandIn(LLAMA3_8B, CLIP_L_336, seq_length=2048, llm_layers=2, vit_layers=2),
    "vicuna-7b": StandIn(
        BACKBONES["vicuna"].real, CLIP_L_336, seq_length=2048, llm_layers=2, vit_layers=2
    ),
    "qwen2.5-7b": StandIn(
        BACKBONES["qwen2"].real, CLIP_L_336, seq_length=2048, llm_layers=2, vit_layers=2
    ),
    "internlm2-7b": StandIn(INTERNLM2_7B, CLIP_L_336, seq_length=2048, llm_layers=2, vit_layers=2),
    # The CPU benchmark size: LLaMA-3 proportions (head dim 128, 4 query heads per KV head).
    "mid": StandIn(
        LLMShape("llama3", 1024, 3584, 8, 2, 8192, 4, 8192, 500000.0),
        CLIP_L_336,
        seq_length=1024,
        llm_layers=4,
        vit_layers=2,
    ),
}
# The hub ids the paper configs name, and the widths they have (what `plan` reads offline).
HUB_MODELS = {entry.hub_id: entry.real for entry in BACKBONES.values()} | {
    "openai/clip-vit-large-patch14-336": CLIP_L_336
}


def _check_standin(name: str) -> StandIn:
    if name not in STANDINS:
        raise ValueError(
            f"`shape` should be one of {', '.join(STANDINS)} but the value passed is {name!r}."
        )
    return STANDINS[name]


def tiny_widths(spec: StandIn) -> StandIn:
    """`spec` at its backbone's test widths, with the tiny CLIP: seconds to build and train."""
    return StandIn(
        BACKBONES[spec.llm.family].tiny,
        TINY_CLIP,
        seq_length=TINY_CLIP.image_tokens + 128,
        llm_layers=BACKBONES[spec.llm.family].tiny.layers,
        vit_layers=TINY_CLIP.layers,
    )


def clip_config(vision: VisionShape, layers: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=vision.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=vision.heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        projection_dim=vision.projection_dim,
        hidden_act="quick_gelu",
    )


def lengthen_conversations(json_path: Path, tokenizer, template_name: str, text_tokens: int):
    """Repeat each conversation's rounds until its templated text has >= `text_tokens` tokens.

    XTuner's LLaVADataset truncates at `max_length` (= text tokens), so every sample then fills
    the paper's sequence: `text_tokens` + 576 image tokens = 2048 positions.
    """
    from xtuner.utils import PROMPT_TEMPLATE

    template = PROMPT_TEMPLATE[template_name]
    records = json.loads(json_path.read_text())
    for record in records:
        turns = record["conversations"]
        rounds = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
        one_pass = sum(
            len(tokenizer.encode(template.INSTRUCTION.format(input=q, round=1) + a, False))
            + 1  # the SUFFIX token
            for q, a in rounds
        )
        repeats = math.ceil(text_tokens / max(one_pass, 1)) + 1
        extra = [
            {"from": who, "value": text.replace(f"{IMAGE_TOKEN}\n", "")}
            for _ in range(repeats - 1)
            for q, a in rounds
            for who, text in (("human", q), ("gpt", a))
        ]
        record["conversations"] = turns + extra
    json_path.write_text(json.dumps(records, indent=1) + "\n")


def make_standin(
    out_dir: str | Path,
    shape: str,
    *,
    llm_layers: int | None = None,
    vit_layers: int | None = None,
    samples: int = 32,
    seed: int = 0,
    tiny: bool = False,
) -> dict[str, Path]:
    """Write the stand-in `shape` (see the module docstring) under `out_dir`; return its paths.

    `tiny=True` builds it at its backbone's test widths (BACKBONES[...].tiny) with the tiny CLIP:
    the family's layout, names and chat tokens in seconds, for tests.
    """
    spec = _check_standin(shape)
    if tiny:
        spec = tiny_widths(spec)
    llm_layers = spec.llm_layers if llm_layers is None else llm_layers
    vit_layers = spec.vit_layers if vit_layers is None else vit_layers
    for name, value in (("llm_layers", llm_layers), ("vit_layers", vit_layers)):
        if value < 1:
            raise ValueError(
                f"`{name}` should be a positive integer but the value passed is {value}."
            )
    out_dir = Path(out_dir)
    paths = standin_paths(out_dir)
    family = BACKBONES[spec.llm.family]
    tokenizer = make_tiny.build_tokenizer(
        make_tiny.chat_texts("shapes", family.template),
        vocab_size=make_tiny.SHAPES_TASK_VOCAB_SIZE,
        chat=family.chat,
        model_max_length=spec.seq_length,
    )
    torch.manual_seed(seed)
    config = llm_config(spec.llm, llm_layers, tokenizer)
    llm = build_llm(config)
    tokenizer.save_pretrained(paths["llm"])
    llm.save_pretrained(paths["llm"], safe_serialization=True)
    if family.remote_code:
        from .internlm2 import write_remote_code

        write_remote_code(paths["llm"])
    del llm

    from transformers import CLIPImageProcessor, CLIPVisionModel

    vision = spec.vision
    clip = CLIPVisionModel._from_config(clip_config(vision, vit_layers), dtype=torch.bfloat16)
    clip.save_pretrained(paths["clip"], safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    ).save_pretrained(paths["clip"])

    paths["projector"].parent.mkdir(parents=True, exist_ok=True)
    state = make_tiny.projector_state_dict(vision.hidden, spec.llm.hidden, seed)
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    torch.save({"meta": {"seed": seed, "shape": shape}, "state_dict": state}, paths["projector"])

    synthetic.write_dataset(
        paths["data"].parent, samples=samples, seed=seed, image_size=vision.image_size
    )
    lengthen_conversations(
        paths["data"], tokenizer, family.template, spec.seq_length - vision.image_tokens
    )
    record = {"shape": shape, "llm_layers": llm_layers, "vit_layers": vit_layers, "tiny": tiny}
    (out_dir / "standin.json").write_text(json.dumps(record) + "\n")
    return paths


# Config keys whose value is a path the stand-in replaces, and which file of the stand-in it becomes.
PATH_KEYS = {
    "llm_name_or_path": "llm",
    "visual_encoder_name_or_path": "clip",
    "pretrained_pth": "projector",
    "data_path": "data",
    "image_folder": "images",
}


def path_overrides(config: str | Path, paths: dict[str, Path]) -> dict[str, str]:
    """`--cfg-options` pointing `config` at a stand-in: every occurrence of each path, nothing else.

    Lazy configs copy dicts on inheritance, so the LLM path sits in `tokenizer`, `model.llm`,
    the dataset's tokenizer and every hook's tokenizer; this walks the parsed config and lists
    each place whose value equals one of the config's top-level path settings (PATH_KEYS), plus
    the evaluation image (a URL in the paper configs) which becomes the stand-in's first image.
    """
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    replace = {str(cfg[key]): str(paths[part]) for key, part in PATH_KEYS.items() if key in cfg}
    first_image = sorted(Path(paths["images"]).glob("*.png"))
    if "evaluation_images" in cfg and first_image:
        replace[str(cfg["evaluation_images"])] = str(first_image[0])
    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{prefix}.{i}")
        elif isinstance(node, str) and node in replace:
            out[prefix] = replace[node]

    walk(cfg.to_dict(), "")
    return out


def standin_paths(out_dir: str | Path) -> dict[str, Path]:
    """The paths `make_standin` (and `make_tiny`) write under `out_dir`."""
    out_dir = Path(out_dir)
    return {
        "llm": out_dir / "llm",
        "clip": out_dir / "clip",
        "projector": out_dir / "projector" / "iter_0.pth",
        "data": out_dir / "data" / "tiny_llava.json",
        "images": out_dir / "data" / "images",
    }
