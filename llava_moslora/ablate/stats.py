"""Mean, spread and paired comparisons over seeds, stated so that 5 seeds are not over-read.

Per variant: mean, sample standard deviation and a 95% confidence interval from Student's t
(n - 1 degrees of freedom). Against the baseline, per seed: the paired difference (same seed, so
same data order and the same initial A where the variants share it), its mean with a t interval,
the paired t-test p-value, and an exact sign-flip permutation p-value, which assumes only that
the differences are symmetric about 0 under "no effect" (with 5 seeds its smallest value is
2/32 = 0.0625: five seeds can never be "significant at 0.05" by that test, and the table says so).

A report makes several comparisons at once (every variant against LoRA, plus the direct pairs), so
`holm` adjusts their p-values for it: Holm's step-down method keeps the chance of any false
"significant" in the family at the nominal level without assuming the tests independent (they are
not: they share the baseline's seeds), and is uniformly more powerful than Bonferroni.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as _scipy

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Spread:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan for n < 2
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Paired:
    n: int  # seeds present in both
    mean_diff: float  # variant - baseline
    ci_low: float
    ci_high: float
    p_ttest: float  # two-sided paired t-test; nan for n < 2 or zero spread
    p_signflip: float  # two-sided exact sign-flip permutation test
    wins: int  # seeds where the variant scored higher
    losses: int


def _t_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _scipy.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def spread(values: Sequence[float]) -> Spread:
    """Mean, std and 95% t interval of one variant's per-seed scores."""
    if not values:
        raise ValueError("`values` is empty: a variant needs at least one finished run")
    mean, std, low, high = _t_interval(list(values))
    return Spread(len(values), mean, std, low, high)


def signflip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided p-value of the mean difference under random sign flips (2^n arrangements)."""
    observed = abs(sum(diffs))
    hits = sum(
        abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - 1e-12
        for signs in itertools.product((1, -1), repeat=len(diffs))
    )
    return hits / 2 ** len(diffs)


def paired(variant: Mapping[int, float], baseline: Mapping[int, float]) -> Paired:
    """Compare per-seed scores (seed -> score) on the seeds both have."""
    seeds = sorted(variant.keys() & baseline.keys())
    if not seeds:
        raise ValueError("no seed has a finished run in both the variant and the baseline")
    diffs = [variant[s] - baseline[s] for s in seeds]
    mean, std, low, high = _t_interval(diffs)
    if len(diffs) < 2 or std == 0:
        p_t = math.nan
    else:
        p_t = float(
            _scipy.ttest_rel([variant[s] for s in seeds], [baseline[s] for s in seeds]).pvalue
        )
    return Paired(
        n=len(diffs),
        mean_diff=mean,
        ci_low=low,
        ci_high=high,
        p_ttest=p_t,
        p_signflip=signflip_p(diffs),
        wins=sum(d > 0 for d in diffs),
        losses=sum(d < 0 for d in diffs),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order; a nan (no test) stays nan and does not count.

    The k-th smallest of m p-values is multiplied by m - k + 1 (k from 1), then made monotone
    (never below an adjusted smaller one) and capped at 1.
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * p))
        adjusted[i] = running
    return adjusted
