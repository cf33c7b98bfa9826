#!/usr/bin/env python
"""End-to-end benchmark: one tiny LLaVA training step with MoSLoRA vs with LoRA, side by side.

Not a test: it prints ratios from one run. Both models come from the real configs
(`configs/tiny_moslora.py`, `configs/tiny_lora.py`: XTuner's LLaVAModel and LLaVADataset, adapters
on both towers), see the same batches, and are stepped in interleaved rounds (forward, backward,
AdamW step), so drift of the machine hits both alike.

    uv run llava-moslora make-tiny ./tiny
    uv run python scripts/bench_train.py --tiny-dir ./tiny                 # CPU
    uv run python scripts/bench_train.py --tiny-dir ./tiny --device cuda   # GPU

Time: median seconds per step. Memory: on CUDA the peak allocated during a step minus what was
allocated before it; on CPU (no allocator statistics) the bytes of tensors autograd saves for
backward, which is what grows with the adapter's activations.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def build(config_name: str, tiny_dir: Path, device: str):
    from mmengine.config import Config
    from xtuner.registry import BUILDER

    os.environ["LLAVA_MOSLORA_TINY_DIR"] = str(tiny_dir)
    cfg = Config.fromfile(str(CONFIGS / f"{config_name}.py"))
    cfg.model.use_activation_checkpointing = False  # measure the adapters, not recomputation
    torch.manual_seed(0)
    model = BUILDER.build(cfg.model).to(device).train()
    dataset = BUILDER.build(cfg.train_dataloader.dataset)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, dataset, optimizer, cfg.train_dataloader.batch_size


def batches(dataset, batch_size: int, count: int, device: str) -> list[dict]:
    from xtuner.dataset.collate_fns import default_collate_fn

    out = []
    for i in range(count):
        items = [dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)]
        data = default_collate_fn(items)["data"]
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()})
    return out


class SavedBytes:
    """Bytes autograd saves for backward during the `with` block (unique storages)."""

    def __enter__(self):
        self.seen, self.total = set(), 0

        def pack(tensor):
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in self.seen and not isinstance(tensor, torch.nn.Parameter):
                self.seen.add(key)
                self.total += storage.nbytes()
            return tensor

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def step(model, optimizer, data, device: str) -> tuple[float, int]:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with SavedBytes() as saved:
        loss = model(dict(data), mode="loss")["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() - before if cuda else saved.total
    return seconds, memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-dir", type=Path, default=Path("./tiny"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    from llava_moslora.train import cpu_shims

    cpu_shims.apply()
    if not (args.tiny_dir / "llm").is_dir():
        print(
            f"error: `--tiny-dir` {args.tiny_dir} has no llm/; run `llava-moslora make-tiny {args.tiny_dir}`"
        )
        return 2
    runs = {name: build(name, args.tiny_dir, args.device) for name in ("tiny_lora", "tiny_moslora")}
    _, dataset, _, batch_size = runs["tiny_lora"]
    data = batches(dataset, batch_size, args.steps_per_round, args.device)
    times = {name: [] for name in runs}
    memory = {}
    for model, _, optimizer, _ in runs.values():
        for i in range(args.warmup):
            step(model, optimizer, data[i % len(data)], args.device)
    for _ in range(args.rounds):
        for name, (model, _, optimizer, _) in runs.items():
            for batch in data:
                seconds, mem = step(model, optimizer, batch, args.device)
                times[name].append(seconds)
                memory[name] = max(memory.get(name, 0), mem)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    mem_label = "peak MiB in step" if args.device.startswith("cuda") else "saved-for-backward MiB"
    print(
        f"# bench_train: tiny LLaVA step, MoSLoRA vs LoRA ({device_name}, torch {torch.__version__})"
    )
    print(
        f"{args.rounds} interleaved rounds x {args.steps_per_round} steps, batch {batch_size}, "
        "AdamW, adapters on both towers, activation checkpointing off\n"
    )
    print(f"| run | median s/step | {mem_label} |")
    print("|---|---|---|")
    for name in runs:
        print(f"| {name} | {statistics.median(times[name]):.4f} | {memory[name] / 2**20:.2f} |")
    time_ratio = statistics.median(times["tiny_moslora"]) / statistics.median(times["tiny_lora"])
    mem_ratio = memory["tiny_moslora"] / memory["tiny_lora"]
    print(f"\nMoSLoRA / LoRA: time {time_ratio:.3f}, memory {mem_ratio:.4f} (target <= 1.02)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
