"""The LLM backbones, one table: family -> `Backbone` (hub id, chat template, tokens, widths, targets).

Any Hugging Face causal LM can be LLaVA's LLM: XTuner's LLaVAModel builds whatever
`AutoModelForCausalLM` returns, and the hf-llava export holds any LLM transformers itself ships.
What differs between families is data, and it lives here once:

    family     hub id                               template        linear targets
    llama3     meta-llama/Meta-Llama-3-8B-Instruct  llama3_chat     q k v o gate up down _proj
    vicuna     lmsys/vicuna-7b-v1.5                 vicuna          (LLaMA-2's, the same names)
    qwen2      Qwen/Qwen2.5-7B-Instruct             qwen_chat       (the same names, q/k/v biased)
    internlm2  internlm/internlm2-chat-7b           internlm2_chat  wqkv wo w1 w2 w3 (fused q,k,v)

Each entry also carries its special chat tokens (the tiny tokenizers of the stand-ins get the
family's real ones), its real widths (`plan` and `make-tiny --shape` read them) and stand-in widths
(`make_standin(..., tiny=True)`: the family's layout at test size). LLaVA's `<image>` placeholder
is the same for every family (XTuner splices the image features at it; the hf-llava export adds it
to any tokenizer), so it is not a column.

A config picks a family with one call, which also re-points every dict that names the LLM
(lazy configs copy dicts on inheritance, so setting `llm_name_or_path` alone changes nothing):

    llm_name_or_path = "Qwen/Qwen2.5-7B-Instruct"
    pretrained_pth = "..."
    __import__("llava_moslora.builders.backbones", fromlist=["use_backbone"]).use_backbone(
        globals(), "qwen2"
    )
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from .make_tiny import INTERNLM2_CHAT, LLAMA3_CHAT, ChatTokens
from .tiny import LLAMA_TARGETS as LLAMA_LINEARS  # the paper's seven projections, LLaMA's names


@dataclass(frozen=True)
class LLMShape:
    """A causal LM's widths; `family` names its entry of BACKBONES (its config class)."""

    family: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int  # the real model's depth
    max_positions: int
    rope_theta: float
    rms_norm_eps: float = 1e-5


@dataclass(frozen=True)
class Backbone:
    """One LLM family (see the module docstring).

    Attributes:
        config_class: dotted path of its transformers config class (ours for InternLM2, which
            transformers does not ship: the hub runs it as remote code).
        template: XTuner's PROMPT_TEMPLATE name.
        chat: its special tokens, for the stand-ins' tokenizers.
        targets: its linear layers, the paper's seven projections under the family's names.
        real: the hub model's widths.
        tiny: stand-in widths for tests: the family's layout (head ratio, biases) at test size.
    """

    name: str
    hub_id: str
    config_class: str
    template: str
    chat: ChatTokens
    targets: tuple[str, ...]
    real: LLMShape
    tiny: LLMShape

    @property
    def remote_code(self) -> bool:
        """Whether transformers lacks the architecture (the hub model ships its own code)."""
        return not self.config_class.startswith("transformers.")


# LLaMA-2's sentencepiece specials (<unk> 0, <s> 1, </s> 2), which Vicuna keeps; its template ends
# a turn with </s>, the eos.
VICUNA_CHAT = ChatTokens(special=("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", pad="<unk>")
# Qwen2.5's: <|endoftext|> (its pad, and the bos id of its config) and the ChatML turn markers of
# XTuner's PROMPT_TEMPLATE.qwen_chat (<|im_end|> ends a turn and is the eos of the Instruct model).
QWEN2_CHAT = ChatTokens(
    special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos="<|endoftext|>",
    eos="<|im_end|>",
    pad="<|endoftext|>",
)


def _tiny(family: str, heads: int = 4, kv_heads: int = 2, **extra: Any) -> LLMShape:
    # 64 wide, 4 heads of 16 (a multiple of 64: bitsandbytes' CPU blocks), 2 layers
    return LLMShape(family, 64, 128, heads, kv_heads, 768, 2, 512, 10000.0, **extra)


BACKBONES: dict[str, Backbone] = {
    entry.name: entry
    for entry in (
        Backbone(
            "llama3",
            "meta-llama/Meta-Llama-3-8B-Instruct",
            "transformers.LlamaConfig",
            "llama3_chat",
            LLAMA3_CHAT,
            LLAMA_LINEARS,
            LLMShape("llama3", 4096, 14336, 32, 8, 128256, 32, 8192, 500000.0),
            _tiny("llama3"),
        ),
        Backbone(
            "vicuna",
            "lmsys/vicuna-7b-v1.5",
            "transformers.LlamaConfig",
            "vicuna",
            VICUNA_CHAT,
            LLAMA_LINEARS,
            # LLaMA-2-7B: multi-head attention (32 KV heads), 4096 positions
            LLMShape("vicuna", 4096, 11008, 32, 32, 32000, 32, 4096, 10000.0),
            _tiny("vicuna", kv_heads=4),
        ),
        Backbone(
            "qwen2",
            "Qwen/Qwen2.5-7B-Instruct",
            "transformers.Qwen2Config",
            "qwen_chat",
            QWEN2_CHAT,
            LLAMA_LINEARS,
            # 28 query heads over 4 KV heads of 128; q, k and v carry biases (Qwen2's layout)
            LLMShape("qwen2", 3584, 18944, 28, 4, 152064, 28, 32768, 1e6, rms_norm_eps=1e-6),
            _tiny("qwen2", rms_norm_eps=1e-6),
        ),
        Backbone(
            "internlm2",
            "internlm/internlm2-chat-7b",
            "llava_moslora.builders.internlm2.InternLM2Config",
            "internlm2_chat",
            INTERNLM2_CHAT,
            ("wqkv", "wo", "w1", "w2", "w3"),  # q, k, v fused; w1 / w3 / w2 = gate / up / down
            LLMShape("internlm2", 4096, 14336, 32, 8, 92544, 32, 32768, 1e6),
            _tiny("internlm2"),
        ),
    )
}


def backbone(family: str) -> Backbone:
    """The BACKBONES entry `family`; ValueError listing the known ones otherwise."""
    if family not in BACKBONES:
        raise ValueError(
            f"`llm_family` should be one of {', '.join(BACKBONES)} but the value passed is "
            f"{family!r}. Add an entry to llava_moslora/builders/backbones.py for a new family."
        )
    return BACKBONES[family]


def _import(dotted: str):
    import importlib

    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def llm_config(llm: LLMShape, layers: int, tokenizer=None):
    """The transformers config of `llm` at `layers` layers (tokenizer ids when given)."""
    entry = backbone(llm.family)
    ids = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    config = _import(entry.config_class)(
        vocab_size=llm.vocab,
        hidden_size=llm.hidden,
        intermediate_size=llm.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=llm.heads,
        num_key_value_heads=llm.kv_heads,
        max_position_embeddings=llm.max_positions,
        rope_theta=llm.rope_theta,
        rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=False,
        **ids,
    )
    if entry.remote_code:
        from .internlm2 import AUTO_MAP

        config.auto_map = dict(AUTO_MAP)
    return config


def build_llm(config, dtype=None):
    """Random-init causal LM from `config` (any family of BACKBONES), built in `dtype` (bf16)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .internlm2 import InternLM2Config, InternLM2ForCausalLM

    dtype = torch.bfloat16 if dtype is None else dtype
    if isinstance(config, InternLM2Config):
        return InternLM2ForCausalLM._from_config(config, dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def use_backbone(cfg: MutableMapping[str, Any], family: str) -> None:
    """Point a LLaVA config (its namespace, `globals()`, or a loaded Config) at `family`'s LLM.

    Sets `llm_family`, `prompt_template` and `llm_target_modules` from the table, then every copy
    the bases made: the tokenizer, `model.llm`, `model.pretrained_pth`, the LLM adapter's targets
    (when the config has one), the dataset's tokenizer and template, and each hook's. The config's
    own `llm_name_or_path` and `pretrained_pth` are read, not set: they are its PART 1 knobs.
    """
    from xtuner.utils import PROMPT_TEMPLATE

    entry = backbone(family)
    missing = [
        k for k in ("llm_name_or_path", "tokenizer", "model", "llava_dataset") if k not in cfg
    ]
    if missing:
        raise ValueError(
            f"`use_backbone` needs the config's {', '.join(missing)}; call it after the config's "
            "bases are read (`with read_base():`)."
        )
    template = PROMPT_TEMPLATE[entry.template]
    cfg.update(llm_family=family, prompt_template=template, llm_target_modules=list(entry.targets))
    cfg["tokenizer"]["pretrained_model_name_or_path"] = cfg["llm_name_or_path"]
    model = cfg["model"]
    model["llm"]["pretrained_model_name_or_path"] = cfg["llm_name_or_path"]
    if "pretrained_pth" in cfg:
        model["pretrained_pth"] = cfg["pretrained_pth"]
    if model.get("llm_lora") is not None:
        model["llm_lora"]["target_modules"] = list(entry.targets)
    dataset = cfg["llava_dataset"]
    dataset["tokenizer"] = cfg["tokenizer"]
    dataset["template_map_fn"]["template"] = template
    if "train_dataloader" in cfg:
        cfg["train_dataloader"]["dataset"] = dataset
    for hook in cfg.get("custom_hooks", []):
        if "tokenizer" in hook:
            hook["tokenizer"] = cfg["tokenizer"]
        if "prompt_template" in hook:
            hook["prompt_template"] = template
