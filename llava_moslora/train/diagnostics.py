r"""Mixer diagnostics: what the r x r mixer of MoSLoRA does during training, per module group.

A MoSLoRA run and a LoRA run can have the same loss curve; whether the learned mixer did anything
is a question about the adapter weights. Every `interval` iterations `MixerDiagnosticsHook` reads
each adapted layer and logs, grouped by tower and target module (`llm/q_proj`, `vit/fc1`, ...) and
aggregated over layers (mean and max):

    distance      ||M - M0||_F / ||M0||_F    how far the mixer moved from its initial value
    mixer_sv_max, mixer_sv_min, mixer_cond   singular values of M and sigma_max / sigma_min
    delta_erank   effective rank of ΔW = s · B · M · A (Roy & Vetterli 2007, "The effective rank:
                  a measure of effective dimensionality"): exp(entropy of sigma_i / sum sigma)
    delta_norm    ||ΔW||_F

Plain LoRA layers (no mixer) get `delta_erank` / `delta_norm` of s · B · A, so ablations compare.

The SVD of ΔW is never formed at (out, in) size. With thin QRs B = Q_B R_B and Aᵀ = Q_A R_A:

    B · M · A = Q_B · (R_B · M · R_Aᵀ) · Q_Aᵀ          Q_B (out, r), Q_A (in, r) orthonormal
                      └──── core (r, r) ────┘

so ΔW has the singular values of s · core: two thin QRs, O((out + in) · r²), and one r x r SVD.

Where values go: the text log (one line per group), `runner.visualizer.add_scalars` (TensorBoard
when the config enables `TensorboardVisBackend`, and the run's `vis_data/scalars.json`), the
message hub (`runner.message_hub.get_info("mixer_diagnostics")`, for other hooks), and
`work_dir/mixer_diagnostics.jsonl`, one JSON line per group and step, which
`llava-moslora plot-diagnostics WORK_DIR` draws.

The initial mixers M0 are written to `work_dir/mixer_init.pth` when training starts and read back
from there on resume. Not derived from the seed: rebuilding them would mean replaying the exact
random stream of model construction (XTuner's LoadWoInit, PEFT's layer order, a seed that may be
None), which silently breaks when anything upstream draws one more number; the file is r² floats
per layer and exact. A resumed run whose work dir lacks the file measures distances from the
mixers at the resume point, and says so in the log and in every JSON line (`reference_iter`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch import nn

from ..probes import gathered

JSONL_NAME = "mixer_diagnostics.jsonl"
INIT_NAME = "mixer_init.pth"
# LLaVAModel attribute -> how diagnostics name it (`vit/q_proj`)
TOWER_LABELS = {"llm": "llm", "visual_encoder": "vit", "projector": "projector"}
# Per-layer statistics; the mixer ones exist only for MoSLoRA layers.
MIXER_STATS = ("distance", "mixer_sv_max", "mixer_sv_min", "mixer_cond")
DELTA_STATS = ("delta_erank", "delta_norm")


# -- the maths -------------------------------------------------------------------------------------


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(H(p)) with p_i = sigma_i / sum(sigma) (Roy & Vetterli 2007); 0 for a zero matrix.

    Between 1 and the number of nonzero singular values: k equal ones give exactly k, and a
    spectrum dominated by one direction gives close to 1 however many tiny ones follow.
    """
    values = singular_values.detach().double().clamp_min(0)
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def delta_singular_values(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    mixer: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Singular values of s · B · M · A (M = I if None), descending, via r x r cores.

    `lora_a` is PEFT's (r, in) A, `lora_b` its (out, r) B. Computed in float64: the matrices are
    tiny, and bf16/fp16 adapters would otherwise give a noisy spectrum.
    """
    a, b = lora_a.detach().double(), lora_b.detach().double()
    _, r_b = torch.linalg.qr(b)  # (k_b, r), k_b = min(out, r)
    _, r_a = torch.linalg.qr(a.T)  # (k_a, r), k_a = min(in, r)
    middle = r_b if mixer is None else r_b @ mixer.detach().double()  # (k_b, r)
    core = middle @ r_a.T  # (k_b, k_a)
    return torch.linalg.svdvals(core) * abs(float(scaling))


@dataclass(frozen=True)
class MixerSpectrum:
    """Singular values of one mixer and what they say."""

    sv_max: float
    sv_min: float

    @property
    def cond(self) -> float:
        """sigma_max / sigma_min; inf for a singular mixer (a rank the mixer has thrown away)."""
        return self.sv_max / self.sv_min if self.sv_min > 0 else math.inf


def mixer_spectrum(mixer: torch.Tensor) -> MixerSpectrum:
    values = torch.linalg.svdvals(mixer.detach().double())
    return MixerSpectrum(sv_max=float(values.max()), sv_min=float(values.min()))


def relative_distance(mixer: torch.Tensor, initial: torch.Tensor) -> float:
    """||M - M0||_F / ||M0||_F: 0 for an unchanged mixer, scale-free across ranks and inits."""
    initial = initial.detach().double().to(mixer.device)
    return float(torch.linalg.norm(mixer.detach().double() - initial) / torch.linalg.norm(initial))


# -- reading the layers ----------------------------------------------------------------------------


def module_group(name: str) -> str:
    """`llm/q_proj` for `llm.base_model.model.model.layers.0.self_attn.q_proj`.

    The tower is LLaVAModel's `llm` / `visual_encoder` (shown as `llm` / `vit`), or `model` for
    any other model; the target is the last name component, the one `target_modules` matched.
    """
    parts = name.split(".")
    return f"{TOWER_LABELS.get(parts[0], 'model')}/{parts[-1]}"


def adapted_layers(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every PEFT LoRA linear layer carrying `adapter` (default: its active one)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        names = [adapter] if adapter is not None else list(module.active_adapters)
        for key in names:
            # lora_A holds Linear adapters only (embeddings use lora_embedding_A): 2-D weights.
            if key in module.lora_A and getattr(module.lora_A[key], "weight", None) is not None:
                yield name, module
                break


def _active_adapter(layer: nn.Module, adapter: str | None) -> str:
    if adapter is not None:
        return adapter
    return next(a for a in layer.active_adapters if a in layer.lora_A)


def _mixer_module(layer: nn.Module, adapter: str) -> nn.Module | None:
    mixers = getattr(layer, "lora_mixer", None)
    return mixers[adapter] if mixers is not None and adapter in mixers else None


def initial_mixers(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """float32 CPU copies of every mixer, keyed by layer name: the M0 the distances refer to."""
    found = {}
    for name, layer in adapted_layers(model, adapter):
        mixer = _mixer_module(layer, _active_adapter(layer, adapter))
        if mixer is not None:
            with gathered([mixer.weight]):
                found[name] = mixer.weight.detach().float().cpu().clone()
    return found


def layer_stats(
    layer: nn.Module, adapter: str, initial: torch.Tensor | None = None
) -> dict[str, float]:
    """DELTA_STATS for any LoRA layer, plus MIXER_STATS for a MoSLoRA one (distance needs M0)."""
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    mixer_module = _mixer_module(layer, adapter)
    weights = [lora_a, lora_b] + ([mixer_module.weight] if mixer_module is not None else [])
    with gathered(weights):
        mixer = None if mixer_module is None else mixer_module.weight.detach()
        values = delta_singular_values(lora_a, lora_b, mixer, layer.scaling[adapter])
        stats = {
            "delta_erank": effective_rank(values),
            "delta_norm": float(torch.linalg.norm(values)),
        }
        if mixer is not None:
            spectrum = mixer_spectrum(mixer)
            stats.update(
                mixer_sv_max=spectrum.sv_max, mixer_sv_min=spectrum.sv_min, mixer_cond=spectrum.cond
            )
            if initial is not None:
                stats["distance"] = relative_distance(mixer, initial)
    return stats


def group_stats(
    model: nn.Module,
    initial: dict[str, torch.Tensor] | None = None,
    adapter: str | None = None,
) -> dict[str, dict[str, float]]:
    """Per group: `layers`, `mixer` (1 if MoSLoRA) and `<stat>_mean` / `<stat>_max` over layers."""
    initial = initial or {}
    per_group: dict[str, list[dict[str, float]]] = defaultdict(list)
    for name, layer in adapted_layers(model, adapter):
        key = _active_adapter(layer, adapter)
        per_group[module_group(name)].append(layer_stats(layer, key, initial.get(name)))
    summary = {}
    for group, rows in sorted(per_group.items()):
        out: dict[str, float] = {"layers": len(rows), "mixer": int("mixer_cond" in rows[0])}
        for stat in MIXER_STATS + DELTA_STATS:
            values = [row[stat] for row in rows if stat in row]
            if values:
                out[f"{stat}_mean"] = sum(values) / len(values)
                out[f"{stat}_max"] = max(values)
        summary[group] = out
    return summary


# -- the hook --------------------------------------------------------------------------------------


def _json_number(value: float) -> float | None:
    # JSON has no inf/nan (Python would write the non-standard `Infinity`): a singular mixer's
    # condition number is written as null.
    return value if math.isfinite(value) else None


class MixerDiagnosticsHook(Hook):
    """Logs `group_stats` before training and every `interval` iterations (and at the last one).

    Switch it on from a config:

        custom_hooks.append(dict(type=MixerDiagnosticsHook, interval=50))

    Args:
        interval: iterations between two measurements. Each costs two thin QRs and two r x r SVDs
            per adapted layer: at LLaVA-8B sizes (r 64, ~250 layers) well under a second.
        adapter: the PEFT adapter to read; None reads each layer's active adapter.
    """

    priority = "LOW"

    def __init__(self, interval: int = 50, adapter: str | None = None) -> None:
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(
                f"`interval` should be a positive integer number of iterations but the value "
                f"passed is {interval!r}. Use e.g. interval=50."
            )
        self.interval = interval
        self.adapter = adapter
        self.initial: dict[str, torch.Tensor] = {}
        self.reference_iter = 0

    @staticmethod
    def _model(runner) -> nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    @staticmethod
    def _is_main(runner) -> bool:
        from mmengine.dist import get_rank

        return get_rank() == 0

    def before_train(self, runner) -> None:
        model = self._model(runner)
        path = Path(runner.work_dir) / INIT_NAME
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.initial, self.reference_iter = saved["mixers"], int(saved["iter"])
            if runner.iter > 0:
                runner.logger.info(f"Mixer diagnostics: initial mixers read from {path}")
        else:
            self.initial = initial_mixers(model, self.adapter)
            self.reference_iter = runner.iter
            if runner.iter > 0 and self.initial:
                runner.logger.warning(
                    f"Mixer diagnostics: resumed at iteration {runner.iter} without {path}: "
                    f"mixer distances are measured from the mixers at iteration {runner.iter}, "
                    "not from their initial values."
                )
            if self._is_main(runner) and self.initial:
                torch.save({"iter": self.reference_iter, "mixers": self.initial}, path)
        if runner.iter == 0:
            self._measure(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.every_n_train_iters(runner, self.interval) or self.is_last_train_iter(runner):
            self._measure(runner, step=runner.iter + 1)

    def _measure(self, runner, step: int | None = None) -> None:
        step = runner.iter if step is None else step
        summary = group_stats(self._model(runner), self.initial, self.adapter)
        if not summary:
            return
        runner.message_hub.update_info("mixer_diagnostics", {"iter": step, "groups": summary})
        scalars = {
            f"mixer/{group}/{stat}": value
            for group, stats in summary.items()
            for stat, value in stats.items()
            if stat not in ("layers", "mixer") and math.isfinite(value)
        }
        runner.visualizer.add_scalars(scalars, step=step)
        if not self._is_main(runner):
            return
        for group, stats in summary.items():
            runner.logger.info(f"Mixer diagnostics iter {step} {group}: {_log_text(stats)}")
        with open(Path(runner.work_dir) / JSONL_NAME, "a") as jsonl:
            for group, stats in summary.items():
                row = {"iter": step, "group": group, "reference_iter": self.reference_iter}
                row.update({k: _json_number(v) for k, v in stats.items()})
                jsonl.write(json.dumps(row) + "\n")


def _log_text(stats: dict[str, float]) -> str:
    parts = []
    if stats.get("mixer"):
        if "distance_mean" in stats:
            parts.append(f"distance {stats['distance_mean']:.3g}/{stats['distance_max']:.3g}")
        parts.append(f"cond {stats['mixer_cond_mean']:.3g}/{stats['mixer_cond_max']:.3g}")
    parts.append(f"erank(ΔW) {stats['delta_erank_mean']:.3g}/{stats['delta_erank_max']:.3g}")
    parts.append(f"|ΔW| {stats['delta_norm_mean']:.3g}")
    return ", ".join(parts) + f" (mean/max over {stats['layers']} layers)"


# -- reading the JSONL back ------------------------------------------------------------------------


def read_diagnostics(work_dir: str | Path) -> list[dict]:
    """The rows of `work_dir/mixer_diagnostics.jsonl`, in the order written."""
    path = Path(work_dir) / JSONL_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"`WORK_DIR` {str(work_dir)!r} has no {JSONL_NAME}: switch the hook on in the config "
            "(custom_hooks.append(dict(type=MixerDiagnosticsHook, interval=50))), train, then "
            "plot the run's work dir."
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PLOTTED = (
    ("distance_mean", "mixer distance ||M - M0|| / ||M0||", False),
    ("mixer_cond_mean", "mixer condition number", True),
    ("delta_erank_mean", "effective rank of ΔW", False),
)


def plot_diagnostics(work_dir: str | Path, out: str | Path | None = None) -> Path:
    """Curves over iterations per group (mean over layers): distance, condition number, eff. rank.

    LLM groups are solid lines, ViT groups dashed. A resumed run appends to the same JSONL: a
    repeated iteration keeps its last value. Returns the PNG's path (default WORK_DIR/...png).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = read_diagnostics(work_dir)
    out = Path(out) if out is not None else Path(work_dir) / "mixer_diagnostics.png"
    series: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        for stat, _, _ in PLOTTED:
            if row.get(stat) is not None:
                series[stat][row["group"]][row["iter"]] = row[stat]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(6 * len(PLOTTED), 4.5))
    for ax, (stat, title, log_scale) in zip(axes, PLOTTED, strict=True):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if not series[stat]:
            ax.text(0.5, 0.5, "no learnable mixer in this run", ha="center", transform=ax.transAxes)
            continue
        for group, points in sorted(series[stat].items()):
            steps = sorted(points)
            style = "--" if group.startswith("vit/") else "-"
            ax.plot(steps, [points[s] for s in steps], style, label=group)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize="small")
        fig.tight_layout(rect=(0, 0, 0.88, 1))
    else:
        fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
