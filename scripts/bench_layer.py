#!/usr/bin/env python
r"""Benchmark: MoSLoRA vs stock PEFT LoRA vs the official repo's naive chain, one Linear at a time.

Not a test: it prints ratios side by side in one run (and asserts, before timing each config, that
MoSLoRA's chosen compute order gives the same output and gradients as the naive chain).

    uv run python scripts/bench_layer.py --quick                 # CPU, reduced grid, < ~3 min
    uv run python scripts/bench_layer.py --device cuda --out bench_layer_gpu.md

Part 1, per layer (batch 1 x tokens), forward + backward through the adapters, base frozen:
    LoRA            `peft.LoraConfig`                 y = W0 x + s B A x
    MoSLoRA         `moslora_config` (kaiming mixer)  y = W0 x + s B M A x, order picked by
                                                      MoSLoRAVariant.forward ("chain" or "fold")
    official chain  MoSLoRA layers whose variant always runs lora_B(mixer(lora_A(x))), as the
                    paper's repository does (nn.Linear(r, r) between lora_A and lora_B)
  Base weight bf16 on CUDA (fp32 on CPU); adapters as PEFT leaves them (autocast_adapter_dtype:
  fp32 adapter weights) unless --adapter-dtype base; input requires no grad;
  loss = out.float().square().mean().
  Time: CUDA events, warm-up, then interleaved rounds of the three, median per step (CPU:
  time.perf_counter). Memory on CUDA: max_memory_allocated over one step minus memory_allocated
  before it ("step peak": activations + temporaries + grads), and the absolute peak with only that
  implementation's model resident. On every device also "saved": bytes of tensors saved for
  backward (torch.autograd.graph.saved_tensors_hooks), unique storages, excluding the input and
  parameters, i.e. the activation memory a model of many such layers holds per layer. On CPU the
  memory ratios are the "saved" ratios (CPU peak is not measurable reliably).

Part 2: a small LlamaForCausalLM with MoSLoRA on q,k,v,o,gate,up,down, merge_and_unload():
merged/base forward time and max |logit| difference merged vs unmerged.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import peft  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from llava_moslora.machine import cpu_model_and_flags  # noqa: E402
from llava_moslora.moslora import MoSLoRAVariant, moslora_config  # noqa: E402

warnings.filterwarnings("ignore", message=".*")  # PEFT's notes about custom models etc.

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------
# The "official chain": MoSLoRA layers forced to compute B(M(A(x))) whatever the shapes.
# ------------------------------------------------------------------------------------------------
class OfficialChainVariant(MoSLoRAVariant):
    """The official MoSLoRA repository's order: lora_B(lora_AB(lora_A(dropout(x)))) * scaling."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        hidden = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x))
        mixed = module.lora_mixer[active_adapter](hidden)
        return result + module.lora_B[active_adapter](mixed) * module.scaling[active_adapter]


def force_official_chain(peft_model: nn.Module) -> None:
    n = 0
    for module in peft_model.modules():
        variants = getattr(module, "lora_variant", None)
        if variants and isinstance(variants.get("default"), MoSLoRAVariant):
            variants["default"] = OfficialChainVariant()
            n += 1
    assert n > 0, "no MoSLoRA layer found to force into the chain order"


def moslora_order(out_features: int, tokens: int) -> str:
    """The order MoSLoRAVariant.forward picks (no lora_B bias here): fold when out < tokens."""
    return "fold" if out_features < tokens else "chain"


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------
def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name, _ = cpu_model_and_flags()
    return f"{name} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Part 1: one Linear
# ------------------------------------------------------------------------------------------------
class OneLinear(nn.Module):
    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        with torch.device("meta"):
            self.proj = nn.Linear(in_f, out_f, bias=False)
        self.proj.weight = weight  # shared, frozen base weight

    def forward(self, x):
        return self.proj(x)


IMPLS = ("lora", "moslora", "chain")


def build(impl: str, weight: nn.Parameter, r: int, adapter_base_dtype: bool, seed: int):
    """A PEFT model around one shared frozen Linear; returns (peft_model, the LoRA layer)."""
    torch.manual_seed(seed)
    kw = dict(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0)
    config = LoraConfig(**kw) if impl == "lora" else moslora_config(**kw)
    model = get_peft_model(OneLinear(weight), config, autocast_adapter_dtype=not adapter_base_dtype)
    layer = model.base_model.model.proj
    with torch.no_grad():  # B = 0 at init would make every check trivial: make it random
        b = layer.lora_B["default"].weight
        b.copy_(torch.randn_like(b, dtype=torch.float32).mul_(1.0 / math.sqrt(r)).to(b.dtype))
    if impl == "chain":
        force_official_chain(model)
    return model, layer


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def step(layer: nn.Module, params: list[nn.Parameter], x: torch.Tensor) -> torch.Tensor:
    for p in params:
        p.grad = None
    out = layer(x)
    out.float().square().mean().backward()
    return out


def saved_bytes(layer, params, x) -> int:
    """Bytes of new tensors autograd saves for backward in one step (unique storages)."""
    exclude = {x.untyped_storage().data_ptr()} | {
        p.untyped_storage().data_ptr() for p in layer.parameters()
    }
    seen: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in exclude:
                seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        except Exception:  # noqa: BLE001 - a tensor subclass without storage: ignore
            pass
        return t

    for p in params:
        p.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
        loss = out.float().square().mean()
    loss.backward()
    return sum(seen.values())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_equal(mos_layer, mos_model, chain_layer, chain_model, x, tol_out, tol_grad) -> float:
    """Assert MoSLoRA (its chosen order) == naive chain, same A, B, M; returns the worst rel err."""
    chain_model.load_state_dict(mos_model.state_dict())
    p_mos, p_chain = dict(mos_model.named_parameters()), dict(chain_model.named_parameters())
    out_m = step(mos_layer, trainable(mos_model), x)
    out_c = step(chain_layer, trainable(chain_model), x)
    worst = rel_err(out_m, out_c)
    assert worst <= tol_out, f"MoSLoRA output != chain output: rel err {worst:.3g} > {tol_out}"
    for name, p in p_mos.items():
        if not p.requires_grad:
            continue
        q = p_chain[name]
        assert p.grad is not None and q.grad is not None, f"no grad for {name}"
        e = rel_err(p.grad, q.grad)
        assert e <= tol_grad, f"MoSLoRA grad {name} != chain grad: rel err {e:.3g} > {tol_grad}"
        worst = max(worst, e)
    return worst


@dataclass
class Row:
    shape: tuple[int, int]
    r: int
    tokens: int
    order: str
    ms: dict[str, float] = field(default_factory=dict)
    mem: dict[str, float] = field(default_factory=dict)  # step peak (cuda) or saved (cpu), bytes
    abs_peak: dict[str, float] = field(default_factory=dict)
    saved: dict[str, float] = field(default_factory=dict)
    check_err: float = 0.0
    host: dict[str, float] = field(default_factory=dict)  # CUDA: host ms per step (launch cost)
    aa: float = 1.0  # LoRA timed against itself (even vs odd rounds): the noise floor


def time_interleaved(runs: dict, device, warmup: int, rounds: int, per_round: int) -> dict:
    """Median ms per step for each impl, rounds interleaved so drift hits all alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[list[float]]] = {k: [] for k in runs}
    host: dict[str, list[float]] = {k: [] for k in runs}  # CUDA: host (launch) ms per step
    for _ in range(rounds):
        for name, fn in runs.items():
            if device.type == "cuda":
                evs = [torch.cuda.Event(enable_timing=True) for _ in range(per_round + 1)]
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                evs[0].record()
                for i in range(per_round):
                    fn()
                    evs[i + 1].record()
                host[name].append((time.perf_counter() - t0) * 1e3 / per_round)
                torch.cuda.synchronize(device)
                samples[name].append([evs[i].elapsed_time(evs[i + 1]) for i in range(per_round)])
            else:
                ts = []
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn()
                    ts.append((time.perf_counter() - t0) * 1e3)
                samples[name].append(ts)
    if device.type == "cuda":
        samples["_host"] = {k: statistics.median(v) for k, v in host.items()}
    return samples


def bench_config(in_f, out_f, r, tokens, device, dtype, args, plan) -> Row:
    row = Row((in_f, out_f), r, tokens, moslora_order(out_f, tokens))
    torch.manual_seed(0)
    weight = nn.Parameter(
        (torch.randn(out_f, in_f, device=device) / math.sqrt(in_f)).to(dtype), requires_grad=False
    )
    x = torch.randn(1, tokens, in_f, device=device).to(dtype)  # requires no grad

    # 1) Equal maths: MoSLoRA's chosen order vs the naive chain, same A, B, M.
    mos_model, mos_layer = build("moslora", weight, r, args.adapter_dtype == "base", seed=1)
    chain_model, chain_layer = build("chain", weight, r, args.adapter_dtype == "base", seed=2)
    low = dtype != torch.float32 or args.adapter_dtype == "base"
    row.check_err = check_equal(
        mos_layer,
        mos_model,
        chain_layer,
        chain_model,
        x,
        tol_out=2e-2 if low else 1e-5,
        tol_grad=2e-2 if low else 1e-4,
    )
    del mos_model, mos_layer, chain_model, chain_layer

    # 2) Memory, one implementation resident at a time.
    for impl in IMPLS:
        model, layer = build(impl, weight, r, args.adapter_dtype == "base", seed=1)
        params = trainable(model)
        step(layer, params, x)  # warm (cuBLAS workspaces, lazy inits)
        row.saved[impl] = saved_bytes(layer, params, x)
        if device.type == "cuda":
            for p in params:
                p.grad = None
            gc.collect()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = step(layer, params, x)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            del out
            row.mem[impl] = peak - before
            row.abs_peak[impl] = peak
        else:
            row.mem[impl] = row.saved[impl]
        del model, layer, params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 3) Time, all three resident, interleaved rounds.
    runs = {}
    keep = []
    for impl in IMPLS:
        model, layer = build(impl, weight, r, args.adapter_dtype == "base", seed=1)
        params = trainable(model)
        keep.append(model)
        runs[impl] = lambda layer=layer, params=params: step(layer, params, x)
    samples = time_interleaved(runs, device, plan["warmup"], plan["rounds"], plan["per_round"])
    row.host = samples.pop("_host", {})
    for impl, rounds in samples.items():
        row.ms[impl] = statistics.median([t for rnd in rounds for t in rnd])
    lora = samples["lora"]
    even = statistics.median([t for i, rnd in enumerate(lora) if i % 2 == 0 for t in rnd])
    odd = statistics.median([t for i, rnd in enumerate(lora) if i % 2 == 1 for t in rnd] or [even])
    row.aa = odd / even
    del keep, runs, samples
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def table_part1(rows: list[Row], device: torch.device) -> str:
    memname = "step-peak" if device.type == "cuda" else "saved"
    head = [
        "shape (in,out)",
        "r",
        "tokens",
        "LoRA ms",
        "MoSLoRA ms",
        "chain ms",
        "MoSLoRA/LoRA time",
        "chain/LoRA time",
        f"MoSLoRA/LoRA mem ({memname})",
        f"chain/LoRA mem ({memname})",
        "MoSLoRA order",
        "LoRA A/A time",
        "saved MiB LoRA/MoS/chain",
    ]
    if device.type == "cuda":
        head += [
            "host ms LoRA/MoS/chain",
            "step-peak MiB LoRA/MoS/chain",
            "abs peak MiB LoRA/MoS/chain",
            "abs peak MoS/LoRA",
        ]
    head += ["check rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in rows:
        ms, mem = w.ms, w.mem
        cells = [
            f"{w.shape[0]}x{w.shape[1]}",
            str(w.r),
            str(w.tokens),
            f"{ms['lora']:.3f}",
            f"{ms['moslora']:.3f}",
            f"{ms['chain']:.3f}",
            f"{ms['moslora'] / ms['lora']:.3f}",
            f"{ms['chain'] / ms['lora']:.3f}",
            f"{mem['moslora'] / mem['lora']:.4f}",
            f"{mem['chain'] / mem['lora']:.4f}",
            w.order,
            f"{w.aa:.3f}",
            "/".join(mib(w.saved[i]) for i in IMPLS),
        ]
        if device.type == "cuda":
            cells += [
                "/".join(f"{w.host[i]:.3f}" for i in IMPLS),
                "/".join(mib(w.mem[i]) for i in IMPLS),
                "/".join(mib(w.abs_peak[i]) for i in IMPLS),
                f"{w.abs_peak['moslora'] / w.abs_peak['lora']:.4f}",
            ]
        cells += [f"{w.check_err:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Part 2: merged model vs base
# ------------------------------------------------------------------------------------------------
def bench_merged(device, dtype, args, plan) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = plan["llama"]
    cfg = LlamaConfig(
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=max(4096, dims["tokens"]),
    )
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype).eval()
    model = copy.deepcopy(base)
    config = moslora_config(r=64, lora_alpha=128, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: random B, so the merge moves the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p, dtype=torch.float32).mul_(0.02).to(p.dtype))
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (1, dims["tokens"]), device=device)

    with torch.inference_mode():
        logits_base = base(ids).logits.float()
        logits_unmerged = model(ids).logits.float()
        t_unmerged = time_interleaved(
            {"base": lambda: base(ids), "unmerged": lambda: model(ids)},
            device,
            plan["m_warmup"],
            plan["m_rounds"],
            plan["m_per_round"],
        )
    merged = model.merge_and_unload()
    assert not any(hasattr(m, "lora_A") for m in merged.modules()), "merge left LoRA layers"
    with torch.inference_mode():
        logits_merged = merged(ids).logits.float()
        t = time_interleaved(
            {"base": lambda: base(ids), "merged": lambda: merged(ids)},
            device,
            plan["m_warmup"],
            plan["m_rounds"],
            plan["m_per_round"],
        )

    t.pop("_host", None)
    t_unmerged.pop("_host", None)

    def med(s, k):
        return statistics.median([x for rnd in s[k] for x in rnd])

    base_ms, merged_ms = med(t, "base"), med(t, "merged")
    base_ms2, unmerged_ms = med(t_unmerged, "base"), med(t_unmerged, "unmerged")
    diff = (logits_merged - logits_unmerged).abs().max().item()
    effect = (logits_unmerged - logits_base).abs().max().item()
    scale = logits_unmerged.abs().max().item()
    rel = rel_err(logits_merged, logits_unmerged)
    head = (
        f"LlamaForCausalLM: {dims['layers']} layers, hidden {dims['hidden']}, intermediate "
        f"{dims['intermediate']}, heads {dims['heads']}/{dims['kv_heads']} kv, vocab {dims['vocab']}, "
        f"{str(dtype).replace('torch.', '')}; MoSLoRA r=64 alpha=128 on {','.join(LLAMA_TARGETS)}; "
        f"forward on 1x{dims['tokens']} tokens, inference_mode"
    )
    rows = [
        "| metric | value |",
        "|---|---|",
        f"| base forward ms | {base_ms:.3f} |",
        f"| merged forward ms | {merged_ms:.3f} |",
        f"| **merged/base forward time** | **{merged_ms / base_ms:.3f}** |",
        f"| base forward ms (2nd pairing) | {base_ms2:.3f} |",
        f"| unmerged (adapter) forward ms | {unmerged_ms:.3f} |",
        f"| unmerged/base forward time | {unmerged_ms / base_ms2:.3f} |",
        f"| **max abs logit diff merged vs unmerged** | **{diff:.4g}** |",
        f"| rel. norm diff merged vs unmerged | {rel:.3g} |",
        f"| max abs logit diff unmerged vs base (adapter effect) | {effect:.4g} |",
        f"| max abs logit (unmerged) | {scale:.4g} |",
    ]
    return head + "\n\n" + "\n".join(rows)


# ------------------------------------------------------------------------------------------------
def make_plan(device: torch.device, quick: bool) -> dict:
    if quick:
        plan = dict(
            shapes=[(1024, 1024), (1024, 3584), (3584, 1024)],
            ranks=[16, 64],
            tokens=[512, 2048],
        )
    else:
        plan = dict(
            shapes=[(4096, 4096), (4096, 14336), (14336, 4096)],
            ranks=[16, 64, 512],
            tokens=[2048, 8192],
        )
    if device.type == "cuda":
        plan.update(warmup=25, rounds=10, per_round=10, m_warmup=5, m_rounds=6, m_per_round=5)
        llama = dict(
            vocab=32000,
            hidden=4096,
            intermediate=14336,
            layers=2,
            heads=32,
            kv_heads=8,
            tokens=2048,
        )
        if quick:
            plan.update(warmup=10, rounds=6, per_round=5)
            llama.update(hidden=1024, intermediate=3584, heads=8, kv_heads=2)
    else:
        plan.update(warmup=2, rounds=4, per_round=2, m_warmup=1, m_rounds=4, m_per_round=2)
        llama = dict(
            vocab=8000, hidden=512, intermediate=1792, layers=2, heads=8, kv_heads=2, tokens=256
        )
        if not quick:
            plan.update(warmup=3, rounds=6, per_round=3)
            llama.update(vocab=16000, hidden=1024, intermediate=3584, tokens=512)
    plan["llama"] = llama
    return plan


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quick", action="store_true", help="reduced grid (< ~3 min on a 2-core CPU)")
    ap.add_argument("--out", help="also write the tables (Markdown) to this file")
    ap.add_argument(
        "--adapter-dtype",
        choices=["fp32", "base"],
        default="fp32",
        help="fp32: PEFT's default (autocast_adapter_dtype=True); base: adapters in the base dtype",
    )
    ap.add_argument("--skip-merged", action="store_true", help="skip part 2")
    args = ap.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = make_plan(device, args.quick)

    import transformers

    header = [
        "# bench_layer: LoRA vs MoSLoRA vs official chain",
        "",
        f"- machine: {machine_name(device)}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), peft {peft.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}",
        f"- grid: {'quick' if args.quick else 'full'}; base dtype {str(dtype).replace('torch.', '')}; "
        f"adapter dtype: {'fp32 (PEFT autocast_adapter_dtype)' if args.adapter_dtype == 'fp32' else 'same as base'}; "
        f"TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}",
        f"- timing: {plan['warmup']} warm-up steps each, then {plan['rounds']} interleaved rounds x "
        f"{plan['per_round']} steps, median ms per fwd+bwd step "
        f"({'CUDA events' if device.type == 'cuda' else 'time.perf_counter'})",
        "- memory: "
        + (
            "step-peak = max_memory_allocated during one step - memory_allocated before it; abs "
            "peak with only that model resident; "
            if device.type == "cuda"
            else "mem ratio = bytes saved for backward (saved_tensors_hooks; CPU peak not measured); "
        )
        + "saved = new tensors saved for backward (unique storages, excl. input and parameters)",
        "- LoRA A/A = LoRA's median over odd rounds / even rounds (timing noise floor)",
        "- MoSLoRA order: what MoSLoRAVariant.forward picks (fold when out_features < tokens); "
        "before timing each row, MoSLoRA's output and A/B/M grads were asserted equal to the naive "
        "chain's with copied A, B, M ('check rel err' = worst relative norm error)",
    ]
    print("\n".join(header), flush=True)

    rows = []
    t_start = time.time()
    for in_f, out_f in plan["shapes"]:
        for r in plan["ranks"]:
            for tokens in plan["tokens"]:
                row = bench_config(in_f, out_f, r, tokens, device, dtype, args, plan)
                rows.append(row)
                print(
                    f"  [{time.time() - t_start:6.1f}s] {in_f}x{out_f} r={r} tokens={tokens} "
                    f"({row.order}): LoRA {row.ms['lora']:.3f} ms, MoSLoRA x{row.ms['moslora'] / row.ms['lora']:.3f}, "
                    f"chain x{row.ms['chain'] / row.ms['lora']:.3f}; mem MoSLoRA x{row.mem['moslora'] / row.mem['lora']:.4f}, "
                    f"chain x{row.mem['chain'] / row.mem['lora']:.4f}; check {row.check_err:.1e}",
                    flush=True,
                )
    part1 = "## Part 1: one Linear, forward+backward (batch 1 x tokens)\n\n" + table_part1(
        rows, device
    )
    r64 = [w for w in rows if w.r == 64]
    if r64:
        worst_t = max(r64, key=lambda w: w.ms["moslora"] / w.ms["lora"])
        worst_m = max(r64, key=lambda w: w.mem["moslora"] / w.mem["lora"])
        ok_t = all(w.ms["moslora"] / w.ms["lora"] <= 1.01 for w in r64)
        ok_m = all(w.mem["moslora"] / w.mem["lora"] <= 1.01 for w in r64)
        part1 += (
            f"\n\nr=64: MoSLoRA/LoRA time <= 1.01 everywhere: {ok_t} (worst "
            f"{worst_t.ms['moslora'] / worst_t.ms['lora']:.3f} at {worst_t.shape[0]}x{worst_t.shape[1]}, "
            f"{worst_t.tokens} tokens); mem <= 1.01 everywhere: {ok_m} (worst "
            f"{worst_m.mem['moslora'] / worst_m.mem['lora']:.4f} at {worst_m.shape[0]}x{worst_m.shape[1]}, "
            f"{worst_m.tokens} tokens)"
        )
    print("\n" + part1, flush=True)

    parts = ["\n".join(header), part1]
    if not args.skip_merged:
        part2 = "## Part 2: merged model vs base\n\n" + bench_merged(device, dtype, args, plan)
        print("\n" + part2, flush=True)
        parts.append(part2)
    print(f"\n(total {time.time() - t_start:.1f} s)")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(parts) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
