"""FSDP (full shard) for the hf engine: torch's own `fully_shard` (FSDP2), called directly.

`llava-moslora train --engine hf CONFIG --fsdp` shards the model as FSDP2 is meant to be used on
a transformers model: each decoder layer of both towers (the classes each tower lists in
`_no_split_modules`, as accelerate's `transformer_based_wrap` picks them) is one unit, and the
root holds the rest (embeddings, head, projector, norms). Every parameter, frozen or trained,
becomes a DTensor sharded over the processes; the optimizer is built on those, so its state is
sharded too. The hf engine's loop is unchanged (hf_engine.Run.step): the same loss division,
schedule and accumulation, and `clip_grad_norm_` on DTensor gradients clips with the norm over
all shards.

Why not accelerate's FSDP plugin: accelerate turns FSDP on only for GPU-type distributed states
(MULTI_GPU, MULTI_XPU, ...); on a CPU it leaves the model unsharded without a word, so nothing
here could test that path. Calling `fully_shard` is a few lines and runs the same on a CPU (gloo)
and on GPUs (nccl).

Checkpoints are the plain loop's `iter_N.pth`: the trained tensors gathered into full tensors
(XTuner's keys) and the optimizer state gathered keyed by parameter name (torch's
`torch.distributed.checkpoint.state_dict` helpers), written by rank 0, so `export`, the
evaluators and `--resume` read them as any hf run's. A process started without a launcher gets a
one-process group, as under `--deepspeed`; `torchrun --nproc-per-node N` gives N.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .hf_recipe import Recipe, RecipeError


def require_fsdp(recipe: Recipe, deepspeed: str | None = None) -> None:
    """Refuse, in one line and before anything is built, `--fsdp` beside `--deepspeed`, with a
    4-bit base, or on a stack where FSDP2 does not import."""
    if deepspeed is not None:
        raise RecipeError(
            f"`--fsdp` and `--deepspeed {deepspeed}` both shard the model: give one of them"
        )
    if recipe.quantization is not None:  # bitsandbytes' packed uint8 weights and their quant
        raise RecipeError(  # state do not split into DTensor shards as they are
            "`--fsdp` with a 4-bit LLM (`model.llm.quantization_config`, QLoRA / QMoSLoRA) is not "
            "supported by the hf engine: drop `--fsdp`, or train a LoRA / MoSLoRA config with it"
        )
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401 - torch >= 2.6
    except ImportError as error:
        raise RecipeError(
            f"`--fsdp` needs torch's FSDP2 (`torch.distributed.fsdp.fully_shard`), which does not "
            f"import here ({error}): use torch >= 2.6, or leave `--fsdp` out"
        ) from error


def _options(**changes):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full tensors on rank 0's CPU only (`cpu_offload`), trained tensors only.
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **changes)


def shard(model: nn.Module) -> tuple[int, int]:
    """Join (or start) the process group and fully shard `model` in place: each decoder layer of
    both towers, then the root; (world size, rank). The optimizer must be built afterwards, on
    its DTensors."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from .hf_deepspeed import _single_process_env

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        _single_process_env()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        model.to(torch.device("cuda", torch.cuda.current_device()))
    towers = (model.model.language_model, model.model.vision_tower)
    layers = {name for tower in towers for name in tower._no_split_modules or ()}
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)
    return dist.get_world_size(), dist.get_rank()


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(trained tensors by our key, optimizer state by parameter name), full, on rank 0's CPU
    (empty elsewhere). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = _options(ignore_frozen_params=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_full_state(model: nn.Module, optimizer, trained: dict, optimizer_state: dict) -> None:
    """Shard the full `trained` tensors (our keys) and optimizer state back into place; every
    rank calls it with what it read from the checkpoint."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = _options(strict=False)  # the frozen weights stay as built
    set_model_state_dict(model, trained, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
