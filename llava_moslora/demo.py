"""The offline demo: fine-tune one tiny LLaMA with LoRA and with MoSLoRA, side by side.

Task: every even position holds a random token t, the next position must be perm[t] for a fixed
random permutation of the vocabulary, which the random base model does not know. Both adapters
start from the same A and B (MoSLoRA adds its Kaiming mixer), see the same batches, and are scored
on held-out sequences: exact-match accuracy on the perm[t] positions.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from .builders.tiny import LLAMA_TARGETS, tiny_llama
from .moslora import moslora_config


@dataclass
class DemoResult:
    name: str
    losses: list[float]
    accuracy: float
    trainable: int
    seconds: float
    mixer_drift: float | None
    merge_error: float


def _batch(perm: torch.Tensor, batch: int, pairs: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.randint(0, perm.numel(), (batch, pairs), generator=generator)
    return torch.stack([tokens, perm[tokens]], dim=-1).reshape(batch, 2 * pairs)  # (B, 2·pairs)


def _accuracy(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)  # (B, T)
    # position 2k predicts position 2k+1 = perm[token at 2k]
    return (pred[:, 0::2] == ids[:, 1::2]).float().mean().item()


def _train(name: str, model, perm, steps: int, lr: float, seed: int) -> DemoResult:
    generator = torch.Generator().manual_seed(seed)
    eval_ids = _batch(perm, 64, 8, torch.Generator().manual_seed(seed + 1))
    mixers = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_mixer" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        ids = _batch(perm, 16, 8, generator)
        labels = ids.clone()
        labels[:, 0::2] = -100  # score only the perm[t] positions
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    drift = None
    if mixers:
        params = dict(model.named_parameters())
        drift = max(((params[n] - m0).norm() / m0.norm()).item() for n, m0 in mixers.items())
    with torch.no_grad():
        unmerged = model(input_ids=eval_ids).logits
        model.merge_adapter()
        merge_error = (model(input_ids=eval_ids).logits - unmerged).abs().max().item()
        model.unmerge_adapter()
    trainable, _ = model.get_nb_trainable_parameters()
    return DemoResult(
        name, losses, _accuracy(model, eval_ids), trainable, seconds, drift, merge_error
    )


def run_demo(steps: int = 200, r: int = 8, lr: float = 3e-3, seed: int = 0) -> list[DemoResult]:
    base = tiny_llama(seed, vocab_size=64, hidden_size=64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(seed))
    common = dict(r=r, lora_alpha=2 * r, target_modules=list(LLAMA_TARGETS))
    torch.manual_seed(seed)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(**common))
    torch.manual_seed(seed)
    mos = get_peft_model(copy.deepcopy(base), moslora_config(**common))
    results = [
        _train("LoRA", lora, perm, steps, lr, seed),
        _train("MoSLoRA (kaiming mixer)", mos, perm, steps, lr, seed),
    ]
    base_acc = _accuracy(base, _batch(perm, 64, 8, torch.Generator().manual_seed(seed + 1)))
    print(
        f"tiny LLaMA (2 layers, hidden 64, vocab 64), adapters r={r} on {', '.join(LLAMA_TARGETS)}"
    )
    print(f"task: predict perm[t] after each token t; base model accuracy {base_acc:.1%}\n")
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    header = [
        "",
        "trainable",
        *[f"loss@{s + 1}" for s in marks],
        "held-out acc",
        "mixer drift",
        "merge err",
        "s/step",
    ]
    rows = []
    for res in results:
        drift = "-" if res.mixer_drift is None else f"{res.mixer_drift:.2f}"
        rows.append(
            [
                res.name,
                f"{res.trainable:,}",
                *[f"{res.losses[s]:.3f}" for s in marks],
                f"{res.accuracy:.1%}",
                drift,
                f"{res.merge_error:.1e}",
                f"{res.seconds / steps:.4f}",
            ]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(cell).rjust(w) if i else str(cell).ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(
        "\nmixer drift = ||M - M0|| / ||M0|| (largest over layers); merge err = max |logits merged - unmerged|"
    )
    return results
