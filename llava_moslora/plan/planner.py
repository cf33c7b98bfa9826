"""Per-GPU memory of a LLaVA MoSLoRA/LoRA run, predicted from the config without allocating weights.

    llava-moslora plan configs/llama3_moslora.py --gpus 8 --gpu-memory 80 --deepspeed zero2

How each figure is obtained:

* Parameters: XTuner's own `LLaVAModel.__init__` runs on the meta device, with the LLM and ViT
  built from their configs (a local folder's config.json, or the hub ids of standin.HUB_MODELS
  offline). So PEFT's target matching, `prepare_model_for_kbit_training`'s casts, the projector
  and every adapter and mixer are exactly what a real build makes; bytes = numel x dtype size.
  4-bit NF4 weights (the Linear layers bitsandbytes would replace, same skip rule as transformers)
  count `NF4_BYTES`: n/2 packed + n/64 one-byte absmax + 4 bytes per 256 absmax (double quant).
* Gradients and AdamW states, per stage (P = trainable parameters, N = GPUs):
    none   grads P x dtype, AdamW exp_avg + exp_avg_sq 2 P x dtype + a 4-byte `step` per tensor
           (exactly what torch allocates; the CPU test checks it byte for byte)
    zero2  weights replicated in bf16; bf16 gradient partition 2P/N + fp32 partition 4P/N;
           fp32 master + exp_avg + exp_avg_sq 12P/N
    zero3  as zero2, and every weight (frozen ones too) partitioned /N, plus the largest layer
           gathered twice (current + prefetch)
  Under DeepSpeed every floating weight is bf16 (DeepSpeed's engine casts the module).
* Activations: the real forward of the ViT, projector and LLM at the config's sequence length
  (max_length - 1 text positions + the image tokens) runs under torch's FakeTensorMode (shapes
  only, no memory), counting the bytes autograd saves for backward (unique storages,
  saved_tensors_hooks) at batch 1 and 2: activations(b) = fixed + b x per_sample, exact for the
  saved tensors of the traced kernels. Two things it does not see: the data-dependent splice of
  image features into text (XTuner's prepare_inputs_labels_for_multimodal; a few index tensors)
  and backward's transient buffers, estimated as the logits gradient B x T x vocab x 4 bytes.
  Tolerance: stated as 2 % of the saved bytes of a real forward; on CPU the tiny and mid-size
  stand-ins match to the byte (tests/test_plan.py). On GPU the SDPA kernel differs (flash /
  memory-efficient attention save a few more small tensors, e.g. rng state).
  With activation checkpointing: the checkpointed trace plus one LLM layer recomputed during
  backward, estimated as (no-checkpoint - checkpointed) / LLM layers.
* Largest batch: the biggest b with static + activations(b) + workspace(b) <= GPU memory - 1 GiB
  (CUDA context and allocator slack).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..runs import image_features, load_config

STAGES = ("none", "zero2", "zero3")
GiB = 2**30
CUDA_RESERVE = 1 * GiB  # CUDA context + allocator slack kept out of the fit
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size
NF4_NESTED_BLOCK = 256  # double quantization: absmax quantized in blocks of 256, fp32 scale each


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight: packed nibbles + its absmax (uint8 when double-quantized)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return math.ceil(numel / 2) + 4 * blocks
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)


def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value != "auto":
        return getattr(torch, value)
    return None


def _pretrained_config(path: str, kind: str, trust_remote_code: bool):
    """The LLM / ViT config behind a config's `pretrained_model_name_or_path`, offline."""
    from ..builders import standin

    if (Path(path) / "config.json").is_file():
        if kind == "vit":
            from transformers import CLIPVisionConfig

            return CLIPVisionConfig.from_pretrained(path)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    shape = standin.HUB_MODELS.get(path)
    if shape is None:
        raise FileNotFoundError(
            f"`pretrained_model_name_or_path` {path!r} is neither a local folder with a "
            f"config.json nor a hub id `plan` knows offline ({', '.join(standin.HUB_MODELS)}); "
            "point it at a local copy with --cfg-options."
        )
    if kind == "vit":
        return standin.clip_config(shape, shape.layers)
    return standin.llm_config(shape, shape.layers)


def _skipped_by_bnb(name: str, skip: list[str]) -> bool:
    # transformers' _replace_with_bnb_linear rules: the module's own name is listed, or
    # `key + "."` is inside the dotted name, or equals it.
    short = name.rsplit(".", 1)[-1]
    return short in skip or any((key + "." in name) or key == name for key in skip)


@dataclass
class Tensors:
    """One row of the plan: a parameter group's element count and bytes as built."""

    numel: int = 0
    bytes: int = 0
    tensors: int = 0

    def add(self, numel: int, nbytes: int) -> None:
        self.numel += numel
        self.bytes += nbytes
        self.tensors += 1


@dataclass
class MetaLLaVA:
    model: nn.Module
    nf4: dict[int, int]  # id(weight) -> NF4 bytes, for the LLM layers bitsandbytes quantizes
    llm_layers: int
    vit_layers: int


def build_meta_llava(cfg, llm_layers: int | None = None, vit_layers: int | None = None):
    """XTuner's LLaVAModel of `cfg.model` on the meta device (towers from their configs)."""
    from transformers import CLIPVisionModel

    from ..builders.standin import build_llm

    model_cfg = copy.deepcopy(cfg.model)
    llm_cfg, vit_cfg = model_cfg.pop("llm"), model_cfg.pop("visual_encoder")
    llm_config = _pretrained_config(
        llm_cfg.pretrained_model_name_or_path, "llm", bool(llm_cfg.get("trust_remote_code"))
    )
    vit_config = _pretrained_config(vit_cfg.pretrained_model_name_or_path, "vit", False)
    if llm_layers:
        llm_config.num_hidden_layers = llm_layers
    if vit_layers:
        vit_config.num_hidden_layers = vit_layers
    quant = llm_cfg.get("quantization_config")
    with torch.device("meta"):
        llm = build_llm(llm_config, _dtype(llm_cfg.get("torch_dtype")) or torch.float32)
        vit = CLIPVisionModel._from_config(
            vit_config, dtype=_dtype(vit_cfg.get("torch_dtype")) or torch.float32
        )
    nf4: dict[int, int] = {}
    if quant is not None and quant.get("load_in_4bit"):
        skip = quant.get("llm_int8_skip_modules")
        if skip is None:
            from transformers.integrations.bitsandbytes import get_keys_to_not_convert

            skip = get_keys_to_not_convert(llm)
        double = bool(quant.get("bnb_4bit_use_double_quant"))
        for name, module in llm.named_modules():
            if isinstance(module, nn.Linear) and not _skipped_by_bnb(name, list(skip)):
                nf4[id(module.weight)] = nf4_bytes(module.weight.numel(), double)
    model_type = model_cfg.pop("type")
    model_cfg.pop("pretrained_pth", None)  # the projector's values do not change its size
    with torch.device("meta"):
        model = model_type(llm=llm, visual_encoder=vit, pretrained_pth=None, **model_cfg)
    return MetaLLaVA(model, nf4, llm_config.num_hidden_layers, vit_config.num_hidden_layers)


def parameter_rows(
    meta: MetaLLaVA, deepspeed: str
) -> tuple[dict[str, Tensors], dict[str, Tensors], dict[str, Tensors]]:
    """(frozen rows by tower, trainable rows by summary.GROUPS, trainable tensors by name)."""
    from ..train.summary import param_group

    frozen: dict[str, Tensors] = {}
    trainable: dict[str, Tensors] = {}
    by_name: dict[str, Tensors] = {}
    seen: set[int] = set()
    for name, param in meta.model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        itemsize = 2 if deepspeed != "none" and param.is_floating_point() else param.element_size()
        nbytes = meta.nf4.get(id(param), param.numel() * itemsize)
        if param.requires_grad:
            trainable.setdefault(param_group(name), Tensors()).add(param.numel(), nbytes)
            by_name.setdefault(name, Tensors()).add(param.numel(), nbytes)
        else:
            tower = name.split(".", 1)[0].replace("visual_encoder", "vit")
            label = f"{tower} weights" + (" (NF4)" if id(param) in meta.nf4 else "")
            frozen.setdefault(label, Tensors()).add(param.numel(), nbytes)
    return frozen, trainable, by_name


class SavedBytes:
    """Bytes autograd saves for backward inside the `with` block (unique storages, no Parameters)."""

    def __enter__(self):
        self.seen: set[int] = set()
        self.total = 0

        def pack(tensor):
            if not isinstance(tensor, nn.Parameter):
                storage = tensor.untyped_storage()
                if storage._cdata not in self.seen:  # one storage, however many views
                    self.seen.add(storage._cdata)
                    self.total += storage.nbytes()
            return tensor

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def llava_loss(model, pixel_values: torch.Tensor, text_len: int) -> torch.Tensor:
    """LLaVA's training forward without the data-dependent splice: image features, then text."""
    features = image_features(model, pixel_values)  # (B, image tokens, d_llm)
    ids = torch.zeros(pixel_values.shape[0], text_len, dtype=torch.long)
    embeds = torch.cat([features, model.llm.get_input_embeddings()(ids)], dim=1)
    labels = torch.zeros(embeds.shape[:2], dtype=torch.long)
    # XTuner's collate passes a mask; all True (nothing padded) lets SDPA run causal and use GQA
    # natively (without one, transformers looks for packed sequences and builds a 4-D mask).
    mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
    return model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


@contextmanager
def fake_masks_are_unpadded():
    """transformers asks `padding_mask.all()`, which a shape-only tensor cannot answer: the
    trace's masks are all True, so answer as for no mask at all."""
    from torch._subclasses.fake_tensor import FakeTensor
    from transformers import masking_utils

    original = masking_utils._ignore_causal_mask_sdpa

    def ignore_causal_mask(padding_mask, *args, **kwargs):
        if isinstance(padding_mask, FakeTensor):
            padding_mask = None
        return original(padding_mask, *args, **kwargs)

    masking_utils._ignore_causal_mask_sdpa = ignore_causal_mask
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original


@dataclass
class Trace:
    saved: int  # bytes saved for backward
    unreachable: list[str] = field(default_factory=list)  # trainable, no gradient


def trace_activations(model, batch: int, text_len: int, image_size: int) -> Trace:
    """Saved-for-backward bytes of one training forward of `model` (already fake), and the
    trainable parameters its backward never reaches."""
    dtype = model.visual_encoder.dtype
    for param in model.parameters():
        param.grad = None
    pixels = torch.zeros(batch, 3, image_size, image_size, dtype=dtype)
    with SavedBytes() as saved:
        loss = llava_loss(model, pixels, text_len)
    loss.backward()
    unreachable = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for param in model.parameters():
        param.grad = None
    return Trace(saved.total, unreachable)


@dataclass
class MemoryPlan:
    config: str
    gpus: int
    deepspeed: str
    gpu_memory_gib: float
    seq_len: int
    image_tokens: int
    vocab: int
    llm_layers: int
    vit_layers: int
    frozen: dict[str, Tensors]
    trainable: dict[str, Tensors]
    gradients: int
    optimizer: int
    zero_gathered: int
    act_fixed: dict[bool, int]  # checkpointing -> bytes independent of batch
    act_per_sample: dict[bool, int]
    unreachable: list[str]
    unreachable_numel: int
    batch_size: int

    @property
    def weights(self) -> int:
        rows = list(self.frozen.values()) + list(self.trainable.values())
        total = sum(r.bytes for r in rows)
        if self.deepspeed == "zero3":
            return math.ceil(total / self.gpus) + self.zero_gathered
        return total

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def workspace(self, batch: int) -> int:
        """Backward's transient logits gradient (fp32)."""
        return batch * self.seq_len * self.vocab * 4

    def activations(self, batch: int, checkpointing: bool) -> int:
        return self.act_fixed[checkpointing] + batch * self.act_per_sample[checkpointing]

    def total(self, batch: int, checkpointing: bool) -> int:
        return self.static + self.activations(batch, checkpointing) + self.workspace(batch)

    def largest_batch(self, checkpointing: bool) -> int:
        usable = self.gpu_memory_gib * GiB - CUDA_RESERVE
        per_sample = self.act_per_sample[checkpointing] + self.workspace(1)
        room = usable - self.static - self.act_fixed[checkpointing]
        return max(0, int(room // per_sample)) if per_sample else 0


def _optimizer_bytes(
    trainable: dict[str, Tensors], unreachable: list[str], deepspeed: str, gpus: int
) -> tuple[int, int]:
    """(gradient bytes, AdamW state bytes) per GPU; see the module docstring.

    Without DeepSpeed a parameter that never gets a gradient gets no `.grad` and no AdamW state;
    DeepSpeed's flat partitions hold every trainable parameter.
    """
    if deepspeed == "none":
        reached = [row for name, row in trainable.items() if name not in set(unreachable)]
        as_built = sum(r.bytes for r in reached)
        return as_built, 2 * as_built + 4 * len(reached)
    numel = sum(r.numel for r in trainable.values())
    return math.ceil(6 * numel / gpus), math.ceil(12 * numel / gpus)


def plan_memory(
    config: str | Path,
    *,
    gpus: int = 1,
    gpu_memory_gib: float = 80.0,
    deepspeed: str = "none",
    cfg_options: dict | None = None,
    llm_layers: int | None = None,
    vit_layers: int | None = None,
    seq_len: int | None = None,
) -> MemoryPlan:
    """Predict the per-GPU memory of `config` (see the module docstring for every term)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if deepspeed not in STAGES:
        raise ValueError(
            f"`deepspeed` should be one of {', '.join(STAGES)} but the value passed is {deepspeed!r}."
        )
    if gpus < 1:
        raise ValueError(f"`gpus` should be a positive integer but the value passed is {gpus}.")
    cfg = load_config(config, cfg_options)
    meta = build_meta_llava(cfg, llm_layers, vit_layers)
    model = meta.model
    meta_checkpointing = bool(cfg.model.get("use_activation_checkpointing", True))
    vocab = model.llm.config.vocab_size
    frozen, trainable, by_name = parameter_rows(meta, deepspeed)
    vit_config = model.visual_encoder.config
    image_tokens = (vit_config.image_size // vit_config.patch_size) ** 2
    max_length = cfg.train_dataloader.dataset.max_length
    text_len = (seq_len - image_tokens) if seq_len else max_length - 1  # <image> -> image tokens
    gathered = 0
    if deepspeed == "zero3":
        layer = (
            model.llm.get_base_model().model.layers[0]
            if hasattr(model.llm, "get_base_model")
            else None
        )
        if layer is not None:
            gathered = 2 * sum(2 * p.numel() for p in layer.parameters())

    act_fixed: dict[bool, int] = {}
    act_per_sample: dict[bool, int] = {}
    traces = {}
    for checkpointing in (False, True):
        # Built with the switch as a run would be: with checkpointing, XTuner also makes the
        # towers' inputs require grad, which changes what autograd saves.
        cfg.model.use_activation_checkpointing = checkpointing
        traced = model if checkpointing == meta_checkpointing else None
        if traced is None:
            traced = build_meta_llava(cfg, llm_layers, vit_layers).model
        if deepspeed != "none":
            traced = traced.to(torch.bfloat16)  # DeepSpeed's engine casts the module
        with FakeTensorMode(allow_non_fake_inputs=True), fake_masks_are_unpadded():
            traced = traced.to_empty(device="cpu").train()
            traces[checkpointing] = [
                trace_activations(traced, b, text_len, vit_config.image_size) for b in (1, 2)
            ]
    unreachable = traces[False][0].unreachable
    for checkpointing, (one, two) in traces.items():
        act_per_sample[checkpointing] = two.saved - one.saved
        act_fixed[checkpointing] = one.saved - act_per_sample[checkpointing]
    gradients, optimizer = _optimizer_bytes(by_name, unreachable, deepspeed, gpus)
    # One LLM layer's activations come back during backward (recomputed), per sample.
    recompute = (act_per_sample[False] - act_per_sample[True]) // max(meta.llm_layers, 1)
    act_per_sample[True] += recompute
    return MemoryPlan(
        config=str(config),
        gpus=gpus,
        deepspeed=deepspeed,
        gpu_memory_gib=gpu_memory_gib,
        seq_len=text_len + image_tokens,
        image_tokens=image_tokens,
        vocab=vocab,
        llm_layers=meta.llm_layers,
        vit_layers=meta.vit_layers,
        frozen=frozen,
        trainable=trainable,
        gradients=gradients,
        optimizer=optimizer,
        zero_gathered=gathered,
        act_fixed=act_fixed,
        act_per_sample=act_per_sample,
        unreachable=unreachable,
        unreachable_numel=sum(by_name[n].numel for n in unreachable),
        batch_size=cfg.train_dataloader.batch_size,
    )


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}" if nbytes >= GiB / 10 else f"{nbytes / GiB:.5f}"


def _count(numel: int) -> str:
    return f"{numel / 1e9:.2f} B" if numel >= 1e8 else f"{numel / 1e6:.2f} M"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a short markdown table plus the fitting batch sizes."""
    stage = {"none": "no DeepSpeed (dtypes as built)", "zero2": "DeepSpeed ZeRO-2, bf16"}.get(
        plan.deepspeed, "DeepSpeed ZeRO-3, bf16"
    )
    lines = [
        f"# plan: {plan.config} on {plan.gpus} GPU(s) x {plan.gpu_memory_gib:g} GiB, {stage}",
        f"LLM {plan.llm_layers} layers, ViT {plan.vit_layers} layers; sequence {plan.seq_len} "
        f"positions ({plan.image_tokens} image tokens)",
        "",
        "| per GPU | parameters | GiB |",
        "|---|---|---|",
    ]
    # ZeRO-3 partitions every weight: a row's bytes per GPU are its share.
    shards = plan.gpus if plan.deepspeed == "zero3" else 1
    shard = f", 1/{plan.gpus} each" if shards > 1 else ""
    for kind, rows in (("frozen", plan.frozen), ("trainable", plan.trainable)):
        for label, row in rows.items():
            lines.append(
                f"| {label} ({kind}{shard}) | {_count(row.numel)} | {_gib(row.bytes / shards)} |"
            )
    if plan.zero_gathered:
        lines.append(f"| ZeRO-3 gathered layer (x2) | | {_gib(plan.zero_gathered)} |")
    trainable = sum(r.numel for r in plan.trainable.values())
    lines.append(f"| gradients | {_count(trainable)} | {_gib(plan.gradients)} |")
    lines.append(f"| AdamW states | {_count(trainable)} | {_gib(plan.optimizer)} |")
    lines.append(f"| **static total** | | **{_gib(plan.static)}** |")
    for ckpt in (True, False):
        on = "on" if ckpt else "off"
        lines.append(
            f"| activations / sample, checkpointing {on} | | {_gib(plan.act_per_sample[ckpt])} |"
        )
    lines.append(f"| backward logits gradient / sample | | {_gib(plan.workspace(1))} |")
    b = plan.batch_size
    lines += [
        "",
        f"at the config's batch {b}: {_gib(plan.total(b, True))} GiB with activation "
        f"checkpointing, {_gib(plan.total(b, False))} GiB without",
        f"largest per-device batch within {plan.gpu_memory_gib:g} GiB (1 GiB kept for the CUDA "
        f"context): {plan.largest_batch(True)} with checkpointing, "
        f"{plan.largest_batch(False)} without",
    ]
    if plan.unreachable:
        lines.append(
            f"unreachable: {_count(plan.unreachable_numel)} trainable parameters in "
            f"{len(plan.unreachable)} tensors never receive a gradient (e.g. "
            f"{plan.unreachable[0]}) but are counted above and carried in AdamW state"
        )
    return "\n".join(lines)
