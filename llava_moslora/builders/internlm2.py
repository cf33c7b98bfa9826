"""An InternLM2 stand-in: InternLM2's module names and weight layout, written here, loaded as remote code.

InternLM2 is not in transformers: the hub's `internlm/internlm2-chat-7b` ships its own
`modeling_internlm2.py`, which `from_pretrained(..., trust_remote_code=True)` imports. The paper
config `internlm2_qmoslora.py` adapts InternLM2's fused projections by name, so a stand-in must
have them:

    model.tok_embeddings                      (vocab, hidden)
    model.layers[i].attention_norm            RMSNorm
    model.layers[i].attention.wqkv            hidden -> (heads + 2 * kv_heads) * head_dim, laid out
                                              per KV group as [q_1 .. q_g, k, v] (g = heads / kv_heads)
    model.layers[i].attention.wo              heads * head_dim -> hidden
    model.layers[i].ffn_norm                  RMSNorm
    model.layers[i].feed_forward.w1, w3, w2   gate, up (hidden -> intermediate), down
    model.norm, output                        final RMSNorm, LM head (not tied)

`write_remote_code(folder)` puts two one-line files next to config.json that re-export the classes
below, so the unchanged config (`trust_remote_code=True`, the user's explicit flag) loads a
stand-in folder exactly as it loads the hub model. The maths is LLaMA's (rotary embedding from
transformers' LLaMA, SDPA attention); the hub model's dynamic rope scaling and flash-attention
paths are left out. Weights are random: this is for shapes, memory and speed, not for text.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


class InternLM2Config(PretrainedConfig):
    """InternLM2's config fields (the hub's configuration_internlm2.py names)."""

    model_type = "internlm2"

    def __init__(
        self,
        vocab_size: int = 92544,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1e6,
        initializer_range: float = 0.02,
        bias: bool = False,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.bias = bias
        self.use_cache = use_cache
        self.head_dim = hidden_size // num_attention_heads
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


class InternLM2RMSNorm(nn.Module):
    """RMSNorm computed in float32 (attribute names as the hub's, which XTuner's kernel reads)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class InternLM2RotaryEmbedding(nn.Module):
    """cos / sin of rotary position embedding (rope_theta from the config, no scaling)."""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class InternLM2Attention(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_out = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_out, bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None):
        bsz, q_len, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states)
        # (B, T, kv_heads, groups + 2, head_dim): per KV group its query heads, then k, then v
        qkv = qkv.view(bsz, q_len, self.num_key_value_heads, self.num_key_value_groups + 2, -1)
        query = qkv[..., : self.num_key_value_groups, :].reshape(bsz, q_len, self.num_heads, -1)
        key, value = qkv[..., -2, :], qkv[..., -1, :]  # (B, T, kv_heads, head_dim)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, T, d)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        causal = attention_mask is None and q_len > 1
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, is_causal=causal
        )  # (B, H, T, d)
        return self.wo(out.transpose(1, 2).reshape(bsz, q_len, -1))


class InternLM2MLP(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None):
        hidden_states = hidden_states + self.attention(
            self.attention_norm(hidden_states), position_embeddings, attention_mask, past_key_values
        )
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states))


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, InternLM2RMSNorm):
            module.weight.data.fill_(1.0)


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = InternLM2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.tok_embeddings = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache_position=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
        bsz, q_len, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + q_len, device=inputs_embeds.device)[None]
        mask = _attention_mask(attention_mask, bsz, q_len, past, inputs_embeds)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, past_key_values)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values
        )


def _attention_mask(attention_mask, bsz: int, q_len: int, past: int, like: torch.Tensor):
    """None (plain causal SDPA) when nothing is padded and nothing is cached, else a bool mask."""
    if attention_mask is None or (past == 0 and _unpadded(attention_mask)):
        return None if past == 0 else _causal(bsz, q_len, past, like.device)
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, past + T)
    return _causal(bsz, q_len, past, like.device) & keep


def _unpadded(attention_mask: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    # Shape-only traces (`llava-moslora plan`, FakeTensorMode) pass all-True masks they cannot read.
    return isinstance(attention_mask, FakeTensor) or bool(attention_mask.all())


def _causal(bsz: int, q_len: int, past: int, device) -> torch.Tensor:
    rows = torch.arange(past, past + q_len, device=device)[:, None]
    cols = torch.arange(past + q_len, device=device)[None, :]
    return (cols <= rows)[None, None].expand(bsz, 1, q_len, past + q_len)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    _tied_weights_keys: list[str] = []

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.output

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.output = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        cache_position=None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.output(hidden_states).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values
        )


REMOTE_CODE = {
    "configuration_internlm2.py": "from llava_moslora.builders.internlm2 import InternLM2Config\n",
    "modeling_internlm2.py": (
        "from llava_moslora.builders.internlm2 import InternLM2Config, InternLM2ForCausalLM\n"
    ),
}
AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


def write_remote_code(folder: str | Path) -> None:
    """Write the remote-code files `trust_remote_code=True` imports from a stand-in folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in REMOTE_CODE.items():
        (folder / name).write_text(text)
