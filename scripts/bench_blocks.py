#!/usr/bin/env python
"""Decoder blocks at LLaMA-3-8B widths: adapter cost per block, measured beside the planner's peak.

    python scripts/bench_blocks.py CASE [CASE ...] --out-dir DIR [--tiny] [--steps N]

gpu_check.sh runs one pair per call, each call with its own time limit; every case writes
DIR/CASE.json as soon as it is measured. Every
case trains a stack of LLaMA-3-8B decoder blocks (hidden 4096, MLP 14336, 32 heads / 8 KV heads,
no embedding, no lm_head: the logits of a 128256 vocabulary would hide the adapter's cost) on
random bf16 hidden states, loss = mean square of the output, AdamW on the adapters:

    lora / moslora          LLaVA's LLM recipe: r64 / alpha 128 on q,k,v,o,gate,up,down, bf16
    qlora / qmoslora        QMoSLoRA's: base in 4-bit NF4 (double quant), r512 / alpha 256
    zero2 / zero3           moslora under DeepSpeed ZeRO-2 / ZeRO-3 on one GPU (bf16, XTuner's json)
    table4_lora / table4_moslora
                            the paper's Table 4 shape (text-only commonsense LLaMA-3-8B: r16 on
                            q,k,v,up,down, batch 16); not LLaVA's, and reported apart from it

Time: median seconds per step after warm-up (CUDA events). Memory: torch.cuda.max_memory_allocated
over the timed steps, beside the planner's prediction for the same blocks: weights and AdamW
states counted (llava_moslora.plan.planner's rules), the step simulated op by op on fake tensors
(`simulate_peak`); under DeepSpeed the planner's gradient partitions and reduce buckets.
`--tiny` (CPU dry run): hidden 128, 2 blocks, 64 tokens, fp32; no measured peak (CPU has no
max_memory_allocated; tests/test_plan.py holds the planner to the profiler's CPU peak instead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from llava_moslora.plan.planner import REDUCE_BUCKET, nf4_bytes, simulate_peak  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TABLE4 = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    moslora: bool
    r: int
    alpha: int
    targets: list[str]
    batch: int
    seq: int
    nf4: bool = False
    zero: int = 0  # DeepSpeed stage, 0 for none


CASES = {
    "lora": Case(False, 64, 128, ALL7, batch=4, seq=2048),
    "moslora": Case(True, 64, 128, ALL7, batch=4, seq=2048),
    "qlora": Case(False, 512, 256, ALL7, batch=4, seq=2048, nf4=True),
    "qmoslora": Case(True, 512, 256, ALL7, batch=4, seq=2048, nf4=True),
    "zero2": Case(True, 64, 128, ALL7, batch=4, seq=2048, zero=2),
    "zero3": Case(True, 64, 128, ALL7, batch=4, seq=2048, zero=3),
    # Commonsense samples are short: 256 positions is this check's assumption, not the paper's.
    "table4_lora": Case(False, 16, 32, TABLE4, batch=16, seq=256),
    "table4_moslora": Case(True, 16, 32, TABLE4, batch=16, seq=256),
}


def blocks_config(tiny: bool, layers: int):
    from transformers import LlamaConfig

    if tiny:  # multiples of 64: bitsandbytes' CPU 4-bit kernel (docs/development.md)
        return LlamaConfig(
            hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, num_hidden_layers=layers, vocab_size=64,
        )  # fmt: skip
    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=layers, vocab_size=64, rope_theta=500000.0, rms_norm_eps=1e-5,
    )  # fmt: skip


def build(case: Case, config, dtype: torch.dtype, device: str) -> nn.Module:
    """LlamaModel blocks with the case's adapters (get_peft_model), on `device` ("meta" too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaModel

    from llava_moslora.moslora import moslora_config

    with torch.device(device):
        model = LlamaModel._from_config(config, dtype=dtype)
    if case.nf4 and device != "meta":
        model = quantize(model, dtype)
    options = dict(r=case.r, lora_alpha=case.alpha, target_modules=case.targets, lora_dropout=0.0)
    adapter = moslora_config(**options) if case.moslora else LoraConfig(**options)
    with torch.device(device):
        model = get_peft_model(model, adapter)
    model.gradient_checkpointing_disable()
    return model


def quantize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every decoder Linear to bitsandbytes NF4 (double quant), as transformers' 4-bit loading."""
    import bitsandbytes as bnb

    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                    quant_type="nf4", compress_statistics=True, device=linear.weight.device,
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    linear.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                    compress_statistics=True,
                ).to(linear.weight.device)  # fmt: skip
                setattr(parent, name, q)
    return model


def loss_of(model: nn.Module, case: Case, config, dtype: torch.dtype, device: str) -> torch.Tensor:
    hidden = torch.randn(case.batch, case.seq, config.hidden_size, dtype=dtype, device=device)
    return model(inputs_embeds=hidden).last_hidden_state.float().square().mean()


def planned(case: Case, config, dtype: torch.dtype, cuda: bool) -> dict[str, int]:
    """The planner's figures for these blocks: persistent bytes and the simulated step peak."""
    model = build(case, config, dtype, "meta")
    if case.zero and cuda:
        model = model.to(torch.bfloat16)  # DeepSpeed's engine casts the module, adapters too
    frozen = adapters = largest = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            adapters += param.numel()
        elif case.nf4 and name.endswith("_proj.base_layer.weight"):
            frozen += nf4_bytes(param.numel())
            largest = max(largest, param.numel() * param.element_size())
        else:
            frozen += param.numel() * param.element_size()
    peak = simulate_peak(model, lambda m: loss_of(m, case, config, dtype, "cpu"))
    peak += largest  # bitsandbytes dequantizes one 4-bit weight at a time for its matmul
    if case.zero:  # the planner's DeepSpeed rows on one GPU: bf16 adapters, 6 + 12 bytes each
        buckets = {2: 2, 3: 1}[case.zero] * REDUCE_BUCKET * 2 if cuda else 0
        persistent = frozen + (2 + 6 + 12) * adapters + buckets
        if case.zero == 3:  # the planner's ZeRO-3 row: one block gathered twice (now + prefetch)
            block = model.get_base_model().layers[0]
            persistent += 2 * sum(2 * p.numel() for p in block.parameters())
        return {"persistent": persistent, "step": peak, "total": persistent + peak}
    # fp32 adapters (PEFT's autocast_adapter_dtype) and AdamW's exp_avg, exp_avg_sq
    persistent = frozen + 3 * 4 * adapters
    step = max(peak, 2 * 4 * adapters)  # or after backward: gradients + AdamW's sqrt temporary
    return {"persistent": persistent, "step": step, "total": persistent + step}


def deepspeed_engine(model: nn.Module, stage: int, cuda: bool):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "overlap_comm": True},
        "bf16": {"enabled": cuda},
    }
    if not cuda:  # a CPU dry run: tiny buckets, DeepSpeed's gloo group of one
        config["zero_optimization"].update(reduce_bucket_size=1e6, allgather_bucket_size=1e6)
    if not torch.distributed.is_initialized():  # a world of one over an in-memory store: no port
        backend = "nccl" if cuda else "gloo"
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def run(name: str, out_dir: Path, tiny: bool, steps: int, warmup: int) -> dict:
    case = CASES[name]
    cuda = torch.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    layers = 2 if tiny else 4
    config = blocks_config(tiny, layers)
    if tiny:
        case = Case(**{**case.__dict__, "seq": 64, "batch": min(case.batch, 2)})
    torch.manual_seed(0)
    model = build(case, config, dtype, device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if case.zero:
        engine = deepspeed_engine(model, case.zero, cuda)

        def step():
            loss = loss_of(engine, case, config, dtype, device)
            engine.backward(loss)
            engine.step()
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step():
            loss_of(model, case, config, dtype, device).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else None  # none on CPU
    plan = planned(case, config, dtype, cuda)
    result = {
        "case": name,
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run, tiny widths)",
        "layers": layers,
        "hidden": config.hidden_size,
        "batch": case.batch,
        "seq": case.seq,
        "r": case.r,
        "targets": case.targets,
        "adapter": ("MoSLoRA" if case.moslora else "LoRA") + (" NF4" if case.nf4 else ""),
        "deepspeed": f"ZeRO-{case.zero}" if case.zero else "none",
        "trainable": sum(p.numel() for p in params),
        "steps": steps,
        "median_s": statistics.median(times),
        "peak_bytes": peak,
        "planned_bytes": plan["total"],
        "planned": plan,
        "versions": versions(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=sorted(CASES), metavar="CASE")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: tiny widths")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    for case in args.cases:  # each written as soon as it is measured
        result = run(case, args.out_dir, args.tiny, args.steps, args.warmup)
        peak = result["peak_bytes"]
        print(
            f"{case}: {result['median_s']:.4f} s/step, peak "
            f"{'-' if peak is None else f'{peak / 2**30:.3f}'} GiB, "
            f"planned {result['planned_bytes'] / 2**30:.3f} GiB",
            flush=True,
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
