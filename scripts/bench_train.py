#!/usr/bin/env python
"""Whole-model benchmark: training steps of two configs side by side (MoSLoRA vs LoRA, ...).

Not a test: it prints ratios from one run. Both models come from real configs (XTuner's
LLaVAModel and LLaVADataset, adapters on both towers) pointed at a stand-in with path overrides
only (`llava_moslora.builders.standin.path_overrides`), see the same batches, and are stepped in
interleaved rounds (forward, backward, AdamW step), so drift of the machine hits both alike.

    uv run llava-moslora make-tiny ./mid --shape mid            # or llama3-8b, internlm2-7b, tiny
    uv run python scripts/bench_train.py --standin ./mid --pair moslora-lora
    uv run python scripts/bench_train.py --standin ./i2 --pair qmoslora-qlora --device cuda
    uv run python scripts/bench_train.py --standin ./tiny --configs tiny_moslora tiny_lora

Time: median seconds per step. Memory: on CUDA the peak allocated during a step minus what was
allocated before it; on CPU (no allocator statistics) the bytes of tensors autograd saves for
backward (llava_moslora.plan.planner.SavedBytes), which is what grows with the adapter's
activations. Parameters, gradients and AdamW states are reported per model (exact bytes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "configs"
PAIRS = {
    "moslora-lora": ("llama3_moslora", "llama3_lora"),
    "qmoslora-qlora": ("internlm2_qmoslora", "internlm2_qlora"),
    "tiny": ("tiny_moslora", "tiny_lora"),
}


def build(config_name: str, standin: Path, args):
    from xtuner.registry import BUILDER

    from llava_moslora.builders.standin import path_overrides, standin_paths
    from llava_moslora.runs import load_config
    from llava_moslora.train.launch import parse_cfg_options

    config = CONFIGS / f"{config_name}.py"
    options = path_overrides(config, standin_paths(standin))
    options.update(parse_cfg_options(args.cfg_options))
    cfg = load_config(config, options)
    cfg.model.use_activation_checkpointing = args.checkpointing
    if args.max_length:
        cfg.train_dataloader.dataset.max_length = args.max_length
    if not args.device.startswith("cuda") and "quantization_config" in cfg.model.llm:
        # bitsandbytes' CPU kernels compute in float32 (configs/tiny_qmoslora.py says why).
        cfg.model.llm.torch_dtype = torch.float32
        cfg.model.llm.quantization_config.bnb_4bit_compute_dtype = torch.float32
    torch.manual_seed(0)
    model = BUILDER.build(cfg.model)
    if args.dtype != "float32" and "quantization_config" not in cfg.model.llm:
        model = model.to(getattr(torch, args.dtype))  # as DeepSpeed's bf16 engine casts it
    model = model.to(args.device).train()
    dataset = BUILDER.build(cfg.train_dataloader.dataset)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    return model, dataset, optimizer


def batches(dataset, batch_size: int, count: int, device: str) -> list[dict]:
    from xtuner.dataset.collate_fns import default_collate_fn

    out = []
    for i in range(count):
        items = [dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)]
        data = default_collate_fn(items)["data"]
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()})
    return out


def step(model, optimizer, data, device: str) -> tuple[float, int]:
    from llava_moslora.plan.planner import SavedBytes

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with SavedBytes() as saved:
        loss = model(dict(data), mode="loss")["loss"]  # LLaVAModel.forward rewrites its dict
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() - before if cuda else saved.total
    return seconds, memory


def state_bytes(model, optimizer) -> int:
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.untyped_storage().nbytes() for p in params)
    states = sum(
        t.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    return weights + states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--standin", type=Path, default=Path("./tiny"), help="make-tiny folder")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pair", choices=sorted(PAIRS), help="default: moslora-lora")
    group.add_argument("--configs", nargs=2, metavar=("A", "B"), help="config names; ratio A/B")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, help="text tokens (default: the config's)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--cfg-options", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from llava_moslora.train import cpu_shims

    cpu_shims.apply()
    if not (args.standin / "llm").is_dir():
        print(f"error: `--standin` {args.standin} has no llm/; run `llava-moslora make-tiny`")
        return 2
    names = tuple(args.configs) if args.configs else PAIRS[args.pair or "moslora-lora"]
    runs = {name: build(name, args.standin, args) for name in names}
    dataset = runs[names[1]][1]
    data = batches(dataset, args.batch_size, args.steps_per_round, args.device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    memory: dict[str, int] = {}
    for model, _, optimizer in runs.values():
        for i in range(args.warmup):
            step(model, optimizer, data[i % len(data)], args.device)
    for _ in range(args.rounds):
        for name, (model, _, optimizer) in runs.items():
            for batch in data:
                seconds, mem = step(model, optimizer, batch, args.device)
                times[name].append(seconds)
                memory[name] = max(memory.get(name, 0), mem)

    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    mem_label = "peak MiB in step" if cuda else "saved-for-backward MiB"
    seq = data[0]["input_ids"].shape[1]
    lines = [
        f"# bench_train: {names[0]} vs {names[1]} on {args.standin.name} "
        f"({device_name}, torch {torch.__version__}, {args.dtype})",
        f"{args.rounds} interleaved rounds x {args.steps_per_round} steps, batch "
        f"{args.batch_size}, {seq} text tokens + image tokens, AdamW, activation checkpointing "
        f"{'on' if args.checkpointing else 'off'}",
        "",
        f"| run | median s/step | {mem_label} | weights + AdamW MiB |",
        "|---|---|---|---|",
    ]
    for name, (model, _, optimizer) in runs.items():
        lines.append(
            f"| {name} | {statistics.median(times[name]):.4f} | {memory[name] / 2**20:.2f} | "
            f"{state_bytes(model, optimizer) / 2**20:.1f} |"
        )
    time_ratio = statistics.median(times[names[0]]) / statistics.median(times[names[1]])
    mem_ratio = memory[names[0]] / memory[names[1]]
    lines.append(f"\n{names[0]} / {names[1]}: time {time_ratio:.3f}, memory {mem_ratio:.4f}")
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
