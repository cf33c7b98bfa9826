"""`ablate --lr-grid`: each variant at its own best learning rate, next to one shared rate.

The paper trains every adapter at one learning rate; a variant that wants another is then judged
at a rate chosen for someone else. With `--lr-grid 5e-4,1e-3,2e-3`:

    1. grid       every variant x rate on the first `--grid-seeds` seeds (2), each run scored on
                  the config's validation items (`--eval heldout:val`, never the test items)
    2. choice     per variant, the rate with the highest mean validation score (ties: the first
                  rate listed)
    3. full runs  every seed at the shared rate (the config's own `optim_wrapper.optimizer.lr`,
                  as the paper) and every seed at each variant's chosen rate, scored on the test
                  items

Each rate is its own work dir, WORK/lr_<rate>/VARIANT/seed_S (the rate is passed as
`--cfg-options optim_wrapper.optimizer.lr=<rate>`), so a grid run and a full run of the same
variant, seed and rate are one training scored twice (result_val.json, result.json): the full
runs retrain only the seeds the grid did not run. Everything resumes as a plain ablation does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runner import VAL_RESULT, parse_evaluator, plan, run_all

LR_KEY = "optim_wrapper.optimizer.lr"  # the optimizer's rate; paramwise lr_mults scale from it
MIN_RATES = 3
CHOICE = "lr_grid.json"


def parse_rates(text: str) -> list[float]:
    """`5e-4,1e-3,2e-3` -> [0.0005, 0.001, 0.002]: at least MIN_RATES distinct positive rates."""
    try:
        rates = list(dict.fromkeys(float(part) for part in text.split(",") if part.strip()))
    except ValueError:
        rates = []
    if len(rates) < MIN_RATES or any(not rate > 0 for rate in rates):
        raise ValueError(
            f"`--lr-grid` should be at least {MIN_RATES} distinct positive learning rates, "
            f"comma-separated (e.g. 5e-4,1e-3,2e-3), got {text!r}"
        )
    return rates


def lr_option(rate: float) -> str:
    """The `--cfg-options` item that sets the rate (repr: one spelling per float)."""
    return f"{LR_KEY}={rate!r}"


def rate_dir(work_dir: str | Path, rate: float) -> Path:
    return Path(work_dir) / f"lr_{rate:g}"


def config_lr(config: str | Path) -> float:
    """The config's own rate: the shared one, as the paper trains every variant."""
    from mmengine.config import Config

    return float(Config.fromfile(str(config)).optim_wrapper.optimizer.lr)


def choose_rates(scores: Mapping[str, Mapping[float, Sequence[float]]]) -> dict[str, float]:
    """variant -> the rate of its highest mean validation score; a tie goes to the rate listed
    first (dicts keep the grid's order)."""
    chosen = {}
    for variant, by_rate in scores.items():
        means = {rate: sum(values) / len(values) for rate, values in by_rate.items() if values}
        if not means:
            raise ValueError(f"variant {variant!r} has no validation score at any rate")
        chosen[variant] = max(means, key=means.__getitem__)  # max keeps the first of equals
    return chosen


@dataclass
class GridOutcome:
    """What the report shows: the validation grid, the choice, and both sets of full runs."""

    grid: dict[str, dict[float, list[float]]]  # variant -> rate -> validation score per seed
    chosen: dict[str, float]
    shared_lr: float
    shared: list[dict[str, Any]] = field(default_factory=list)  # every seed at shared_lr
    best: list[dict[str, Any]] = field(default_factory=list)  # every seed at its chosen rate


def run_lr_grid(
    config: str | Path,
    variants: Sequence[str],
    seeds: Sequence[int],
    rates: Sequence[float],
    work_dir: str | Path,
    *,
    shared_lr: float,
    grid_seeds: int = 2,
    launcher: str | None = None,
    extra: Sequence[str] = (),
    evaluator: str = "heldout",
    runner: Callable[..., list[dict[str, Any]]] = run_all,
    log: Callable[[str], None] = print,
) -> GridOutcome:
    """The grid, the choice and the full runs (module docstring); `runner` is `run_all` (a test
    passes a fake that returns scores without training)."""
    if parse_evaluator(evaluator) != ("heldout", None):
        raise ValueError(
            f"`--lr-grid` scores the grid on the config's validation items, so `--eval` should "
            f"be `heldout`, got {evaluator!r}"
        )
    if any(option.startswith(f"{LR_KEY}=") for option in extra):
        raise ValueError(f"`--cfg-options` sets `{LR_KEY}`: `--lr-grid` sets it per run; drop it")
    if isinstance(grid_seeds, bool) or not isinstance(grid_seeds, int) or grid_seeds < 1:
        raise ValueError(f"`--grid-seeds` should be a positive integer, got {grid_seeds!r}")
    common = dict(launcher=launcher, log=log)

    def at(rate: float) -> list[str]:
        return [*extra, lr_option(rate)]

    grid: dict[str, dict[float, list[float]]] = {v: {r: [] for r in rates} for v in variants}
    for rate in rates:
        log(f"--lr-grid: rate {rate:g} on seeds {list(seeds[:grid_seeds])}, validation split")
        runs = plan(rate_dir(work_dir, rate), variants, seeds[:grid_seeds], VAL_RESULT)
        for result in runner(runs, config, extra=at(rate), evaluator="heldout:val", **common):
            grid[result["variant"]][rate].append(float(result["score"]))
    chosen = choose_rates(grid)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    (Path(work_dir) / CHOICE).write_text(
        json.dumps(
            {
                "shared_lr": shared_lr,
                "chosen": chosen,
                "grid": {v: {repr(r): s for r, s in by.items()} for v, by in grid.items()},
            },
            indent=1,
        )
        + "\n"
    )
    log("--lr-grid chose: " + ", ".join(f"{v} {r:g}" for v, r in chosen.items()))

    outcome = GridOutcome(grid, chosen, shared_lr)
    log(f"--lr-grid: every seed at the shared rate {shared_lr:g}")
    runs = plan(rate_dir(work_dir, shared_lr), variants, seeds)
    outcome.shared = runner(runs, config, extra=at(shared_lr), evaluator=evaluator, **common)
    for variant in variants:
        rate = chosen[variant]
        log(f"--lr-grid: every seed of {variant} at its best rate {rate:g}")
        runs = plan(rate_dir(work_dir, rate), [variant], seeds)
        results = runner(runs, config, extra=at(rate), evaluator=evaluator, **common)
        outcome.best += [{**result, "lr": rate} for result in results]
    return outcome
