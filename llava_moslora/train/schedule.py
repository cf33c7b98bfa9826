"""What a config derives from its epoch count and batch, derived again in one call.

mmengine's lazy configs copy dicts on inheritance. `_base_/schedule_visual_instruction.py` writes
the warm-up's end as `warmup_ratio * max_epochs`, and the loader base the sampler's batch as
`batch_size * accumulative_counts`; a child that sets `max_epochs = 3` changes that name only, and
the dicts it inherits keep the numbers its base computed from the old values. XTuner's recipes
repeat every derived line in every config; here a child states its own PART 1 values and, in
PART 4, calls `derive_schedule` once on its namespace (lazy configs defer `import` statements, so
it is reached through `__import__`):

    max_epochs = 3
    ...
    __import__("llava_moslora.train.schedule", fromlist=["derive_schedule"]).derive_schedule(
        globals()
    )  # one line in a config file, at column 0

which sets, in the dicts the child inherited,

    derived value                                       from PART 1
    param_scheduler[0].end, param_scheduler[1].begin    warmup_ratio * max_epochs
    param_scheduler[1].end, train_cfg.max_epochs        max_epochs
    train_dataloader.batch_size                         batch_size
    train_dataloader.sampler.per_device_batch_size      batch_size * accumulative_counts
    optim_wrapper.accumulative_counts                   accumulative_counts

A loaded `mmengine.config.Config` is such a mapping too. `tests/test_configs.py` checks every
config's derived values against their sources.

The ends are in epochs; mmengine turns them into iterations when the run starts, once the data's
length is known, as `int(epochs * iterations_per_epoch)`. On a small dataset the warm-up's end
rounds down to iteration 0 (3 % of 2 epochs of 16 iterations is 0.96) and mmengine refuses the
schedule ("end should be larger than begin"), though the data is valid. The base config's two
schedulers are therefore `LinearWarmupLR` and `CosineAfterWarmupLR`: mmengine's LinearLR and
CosineAnnealingLR, whose warm-up boundary is taken from the real step count, at least one
iteration (`warmup_iterations`); a run long enough to round to one or more is unchanged.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from mmengine.optim import CosineAnnealingLR, LinearLR

KNOBS = ("max_epochs", "warmup_ratio", "batch_size", "accumulative_counts")
DERIVED = ("param_scheduler", "train_cfg", "train_dataloader", "optim_wrapper")


def _check_positive(name: str, value: Any, *, integer: bool) -> None:
    kind, noun = (int, "integer") if integer else ((int, float), "number")
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"`{name}` should be a positive {noun} but the value passed is {value!r}.")


def derive_schedule(cfg: MutableMapping[str, Any]) -> None:
    """Set, in place, every value `cfg`'s dicts derive from its four knobs (the module's diagram).

    `cfg` is a config's namespace (`globals()` inside a config file) or a loaded Config. Its
    `param_scheduler` is the base's pair, in epochs (mmengine converts them to iterations): a
    warm-up over the first `warmup_ratio` of the run, then the main phase to the last epoch. A
    sampler without `per_device_batch_size` (not XTuner's LengthGroupedSampler) is left as it is.
    """
    missing = [name for name in KNOBS + DERIVED if name not in cfg]
    if missing:
        raise ValueError(
            f"`derive_schedule` needs the config's {', '.join(KNOBS + DERIVED)} but {missing} "
            f"are not set; call it after the config's bases are read (`with read_base():`)."
        )
    max_epochs, warmup_ratio = cfg["max_epochs"], cfg["warmup_ratio"]
    batch_size, accumulative_counts = cfg["batch_size"], cfg["accumulative_counts"]
    _check_positive("max_epochs", max_epochs, integer=False)  # mmengine takes fractional epochs
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("accumulative_counts", accumulative_counts, integer=True)
    if isinstance(warmup_ratio, bool) or not (
        isinstance(warmup_ratio, (int, float)) and 0 <= warmup_ratio < 1
    ):
        raise ValueError(
            f"`warmup_ratio` should be a fraction of the run in [0, 1) but the value passed is "
            f"{warmup_ratio!r}."
        )
    if len(cfg["param_scheduler"]) != 2:
        raise ValueError(
            f"`param_scheduler` should be the base's [warm-up, main phase] pair but has "
            f"{len(cfg['param_scheduler'])} entries; set the ends of another schedule in the "
            f"config itself."
        )

    warmup, main = cfg["param_scheduler"]
    warmup_end = warmup_ratio * max_epochs  # in epochs, as the base writes it
    warmup["end"] = warmup_end
    main.update(begin=warmup_end, end=max_epochs)
    cfg["train_cfg"]["max_epochs"] = max_epochs

    loader = cfg["train_dataloader"]
    loader["batch_size"] = batch_size
    if "per_device_batch_size" in loader["sampler"]:
        # XTuner's recipes give LengthGroupedSampler one optimizer step's samples per device.
        loader["sampler"]["per_device_batch_size"] = batch_size * accumulative_counts
    cfg["optim_wrapper"]["accumulative_counts"] = accumulative_counts


def warmup_iterations(end_epochs: float, epoch_length: int) -> int:
    """The warm-up's last iteration (exclusive) for a warm-up ending at `end_epochs`: mmengine's
    `int(end_epochs * epoch_length)`, but at least 1 when there is a warm-up at all."""
    if end_epochs <= 0:
        return 0
    return max(1, int(end_epochs * epoch_length))


class LinearWarmupLR(LinearLR):
    """mmengine's LinearLR whose end, given in epochs, never rounds down to iteration 0."""

    @classmethod
    def build_iter_from_epoch(
        cls, *args, begin=0, end=float("inf"), by_epoch=True, epoch_length=None, **kwargs
    ):
        return cls(
            *args,
            begin=int(begin * epoch_length),
            end=warmup_iterations(end, epoch_length),
            by_epoch=False,
            **kwargs,
        )


class CosineAfterWarmupLR(CosineAnnealingLR):
    """mmengine's CosineAnnealingLR starting where `LinearWarmupLR` ends (its `begin` is the
    warm-up's end, in epochs, rounded the same way)."""

    @classmethod
    def build_iter_from_epoch(
        cls, *args, T_max=None, begin=0, end=float("inf"), by_epoch=True, epoch_length=None,
        **kwargs,
    ):  # fmt: skip
        return cls(
            *args,
            T_max=None if T_max is None else T_max * epoch_length,
            begin=warmup_iterations(begin, epoch_length),
            end=end if end == float("inf") else int(end * epoch_length),
            by_epoch=False,
            **kwargs,
        )
