"""`ablate --lr-grid`: each variant at its own best learning rate, next to one shared rate.

The paper trains every adapter at one learning rate; a variant that wants another is then judged
at a rate chosen for someone else. With `--lr-grid 5e-4,1e-3,2e-3`:

    1. grid       every variant x rate on the `--grid-seeds` (100,101), seeds that are never test
                  seeds, each run scored on the config's validation items (`--eval heldout:val`,
                  never the test items). A run's validation and test scores move together, so a
                  rate chosen on a seed's validation score favours that seed's test score: the
                  grid's trainings must not be the test table's.
    2. widening   per variant, while its best rate is the lowest (highest) of its grid, one rate
                  a factor 2 below (above) is added, at most `--grid-widen` (2) steps beyond the
                  grid given on each side: a best rate at the grid's edge says only that the
                  optimum may lie beyond it
    3. choice     per variant, the rate with the highest mean validation score; a tie goes to
                  the lower rate (TIE_RULE), whatever order the rates were listed in. Each choice
                  is labelled (`placement`): interior (a worse neighbour on both sides), tied
                  with the next rate up, or at the edge with the widening limit reached
    4. full runs  every test seed (`--seeds`, `--first-seed`) at the shared rate (the config's
                  own `optim_wrapper.optimizer.lr`, as the paper) and at each variant's chosen
                  rate, scored on the test items

Each rate is its own work dir, WORK/lr_<rate>/VARIANT/seed_S (the rate is passed as
`--cfg-options optim_wrapper.optimizer.lr=<rate>`); grid runs (seed_100, ...) and test runs
(seed_0, ...) lie side by side there and never share a training. A variant's full runs at the
shared and at its chosen rate are one training when the two rates are equal. Everything resumes
as a plain ablation does.
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
GRID_SEEDS = (100, 101)  # far from the test seeds 0, 1, ... of any usual `--seeds`
WIDEN = 2  # rates a factor 2 apart added beyond each edge of the grid given, at most
TIE_RULE = "the lower rate"  # a tie of mean validation scores goes to it (choose_rates)
# placement of a chosen rate in its variant's grid
INTERIOR = "interior"  # a strictly worse neighbour on both sides
TIED_ABOVE = "tied with the next rate up"  # a plateau: widening cannot resolve it
LOW_EDGE = "lowest of its grid (widening limit reached)"
HIGH_EDGE = "highest of its grid (widening limit reached)"


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


def parse_grid_seeds(text: str, test_seeds: Sequence[int]) -> list[int]:
    """`100,101` -> [100, 101]: distinct non-negative seeds, none of them a test seed (a grid run
    is scored on validation to choose a rate; as a test run it would be favoured by that choice)."""
    try:
        seeds = list(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        seeds = []
    if not seeds or any(seed < 0 for seed in seeds):
        raise ValueError(
            "`--grid-seeds` should be comma-separated non-negative seeds (e.g. 100,101), "
            f"got {text!r}"
        )
    shared = sorted(set(seeds) & set(test_seeds))
    if shared:
        raise ValueError(
            f"`--grid-seeds` {text!r} shares seed(s) {', '.join(map(str, shared))} with the test "
            f"seeds {min(test_seeds)}-{max(test_seeds)} (`--first-seed`, `--seeds`): the rate "
            "would be chosen on runs that are then scored as tests; pick seeds outside them "
            f"(e.g. {','.join(map(str, GRID_SEEDS))})"
        )
    return seeds


def lr_option(rate: float) -> str:
    """The `--cfg-options` item that sets the rate (repr: one spelling per float)."""
    return f"{LR_KEY}={rate!r}"


def rate_dir(work_dir: str | Path, rate: float) -> Path:
    return Path(work_dir) / f"lr_{rate:g}"


def config_lr(config: str | Path) -> float:
    """The config's own rate: the shared one, as the paper trains every variant."""
    from mmengine.config import Config

    return float(Config.fromfile(str(config)).optim_wrapper.optimizer.lr)


def _means(variant: str, by_rate: Mapping[float, Sequence[float]]) -> dict[float, float]:
    """rate -> mean validation score, rates ascending; refuses a variant without any."""
    means = {
        rate: sum(by_rate[rate]) / len(by_rate[rate]) for rate in sorted(by_rate) if by_rate[rate]
    }
    if not means:
        raise ValueError(f"variant {variant!r} has no validation score at any rate")
    return means


def choose_rates(scores: Mapping[str, Mapping[float, Sequence[float]]]) -> dict[str, float]:
    """variant -> the rate of its highest mean validation score; a tie goes to the lower rate
    (TIE_RULE), never to the order the rates were listed in."""
    chosen = {}
    for variant, by_rate in scores.items():
        means = _means(variant, by_rate)
        chosen[variant] = max(means, key=lambda rate: (means[rate], -rate))
    return chosen


def placement(
    by_rate: Mapping[float, Sequence[float]], chosen: float, variant: str = "this variant"
) -> str:
    """Where `chosen` sits in one variant's grid: INTERIOR, TIED_ABOVE, LOW_EDGE or HIGH_EDGE
    (the edges: as run_lr_grid leaves them, i.e. after widening stopped at its limit)."""
    means = _means(variant, by_rate)
    rates = list(means)
    at = rates.index(chosen)
    if at == 0:
        return LOW_EDGE
    if at == len(rates) - 1:
        return HIGH_EDGE
    return INTERIOR if means[rates[at + 1]] < means[chosen] else TIED_ABOVE


def widening(
    by_rate: Mapping[float, Sequence[float]], chosen: float, limits: tuple[float, float]
) -> float | None:
    """The rate to add to one variant's grid: a factor 2 beyond the edge its choice sits on,
    unless that passes `limits` (lowest, highest rate allowed); None for an interior choice."""
    rates = sorted(rate for rate, values in by_rate.items() if values)
    if len(rates) < 2:
        return None
    if chosen == rates[0] and rates[0] / 2 >= limits[0] * (1 - 1e-9):
        return rates[0] / 2
    if chosen == rates[-1] and rates[-1] * 2 <= limits[1] * (1 + 1e-9):
        return rates[-1] * 2
    return None


@dataclass
class GridOutcome:
    """What the report shows: the validation grid, the choice, and both sets of full runs."""

    grid: dict[str, dict[float, list[float]]]  # variant -> rate -> validation score per seed
    chosen: dict[str, float]
    shared_lr: float
    grid_seeds: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # the test seeds
    placement: dict[str, str] = field(default_factory=dict)  # variant -> INTERIOR, ...
    widen: int = WIDEN
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
    grid_seeds: Sequence[int] = GRID_SEEDS,
    widen: int = WIDEN,
    launcher: str | None = None,
    extra: Sequence[str] = (),
    evaluator: str = "heldout",
    runner: Callable[..., list[dict[str, Any]]] = run_all,
    log: Callable[[str], None] = print,
) -> GridOutcome:
    """The grid, its widening, the choice and the full runs (module docstring); `runner` is
    `run_all` (a test passes a fake that returns scores without training)."""
    if parse_evaluator(evaluator) != ("heldout", None):
        raise ValueError(
            f"`--lr-grid` scores the grid on the config's validation items, so `--eval` should "
            f"be `heldout`, got {evaluator!r}"
        )
    if any(option.startswith(f"{LR_KEY}=") for option in extra):
        raise ValueError(f"`--cfg-options` sets `{LR_KEY}`: `--lr-grid` sets it per run; drop it")
    grid_seeds = parse_grid_seeds(",".join(map(str, grid_seeds)), list(seeds))
    if isinstance(widen, bool) or not isinstance(widen, int) or widen < 0:
        raise ValueError(f"`--grid-widen` should be a non-negative integer, got {widen!r}")
    common = dict(launcher=launcher, log=log)
    limits = (min(rates) / 2**widen, max(rates) * 2**widen)

    def at(rate: float) -> list[str]:
        return [*extra, lr_option(rate)]

    grid: dict[str, dict[float, list[float]]] = {v: {} for v in variants}
    todo: dict[float, list[str]] = {rate: list(variants) for rate in rates}
    while todo:
        for rate, names in sorted(todo.items()):
            log(f"--lr-grid: rate {rate:g}, {', '.join(names)} on seeds {grid_seeds}, validation")
            runs = plan(rate_dir(work_dir, rate), names, grid_seeds, VAL_RESULT)
            for result in runner(runs, config, extra=at(rate), evaluator="heldout:val", **common):
                grid[result["variant"]].setdefault(rate, []).append(float(result["score"]))
        chosen = choose_rates(grid)
        todo = {}
        for variant in variants:
            rate = widening(grid[variant], chosen[variant], limits)
            if rate is not None:
                log(f"--lr-grid: {variant}'s best rate {chosen[variant]:g} is its grid's edge")
                todo.setdefault(rate, []).append(variant)
    where = {v: placement(grid[v], chosen[v], v) for v in variants}
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    (Path(work_dir) / CHOICE).write_text(
        json.dumps(
            {
                "shared_lr": shared_lr,
                "chosen": chosen,
                "placement": where,
                "tie_rule": TIE_RULE,
                "widen": widen,
                "grid_seeds": grid_seeds,
                "seeds": list(seeds),
                "grid": {v: {repr(r): by[r] for r in sorted(by)} for v, by in grid.items()},
            },
            indent=1,
        )
        + "\n"
    )
    log("--lr-grid chose: " + ", ".join(f"{v} {r:g} ({where[v]})" for v, r in chosen.items()))

    outcome = GridOutcome(grid, chosen, shared_lr, grid_seeds, list(seeds), where, widen)
    log(f"--lr-grid: every test seed at the shared rate {shared_lr:g}")
    runs = plan(rate_dir(work_dir, shared_lr), variants, seeds)
    outcome.shared = runner(runs, config, extra=at(shared_lr), evaluator=evaluator, **common)
    for variant in variants:
        rate = chosen[variant]
        log(f"--lr-grid: every test seed of {variant} at its best rate {rate:g}")
        runs = plan(rate_dir(work_dir, rate), [variant], seeds)
        results = runner(runs, config, extra=at(rate), evaluator=evaluator, **common)
        outcome.best += [{**result, "lr": rate} for result in results]
    return outcome
