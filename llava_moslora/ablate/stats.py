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

"Not significant" is not "equal": `tost_paired` tests equality within a margin fixed in advance
(two one-sided t-tests), and `tost_seeds_needed` says how many seeds that margin needs at a given
spread of the paired differences (`tost_power`, exact for normal differences).
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


# Equivalence: "X matches LoRA" is a claim of its own. A paired t-test that does not reject says
# only "no difference detected" (with 5 seeds its interval is wide); two one-sided tests (TOST,
# Schuirmann 1987) against a margin fixed before the data show the difference lies inside it.
ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 10_000  # `tost_seeds_needed` gives up (None) beyond this


@dataclass(frozen=True)
class Equivalence:
    n: int
    mean_diff: float  # variant - baseline
    std_diff: float  # sample std of the per-seed differences (ddof=1)
    ci90_low: float  # the (1 - 2 alpha) interval: inside (-margin, margin) iff p < alpha
    ci90_high: float
    margin: float
    p: float  # the larger of the two one-sided p-values; nan for n < 2 or zero spread
    seeds_needed: int | None  # seeds for `POWER` at this std if the true difference is 0

    @property
    def equivalent(self) -> bool:
        return self.p < ALPHA


def tost_paired(
    variant: Mapping[int, float], baseline: Mapping[int, float], margin: float
) -> Equivalence:
    """Paired TOST on the seeds both have: H0 |true difference| >= margin, rejected (p < ALPHA)
    when both one-sided t-tests reject, i.e. when the 90% t interval lies inside +-margin."""
    if not margin > 0:
        raise ValueError(f"`margin` should be a positive number of points, got {margin!r}")
    seeds = sorted(variant.keys() & baseline.keys())
    if not seeds:
        raise ValueError("no seed has a finished run in both the variant and the baseline")
    diffs = [variant[s] - baseline[s] for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return Equivalence(n, mean, math.nan, math.nan, math.nan, margin, math.nan, None)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if std == 0:
        return Equivalence(n, mean, 0.0, mean, mean, margin, math.nan, None)
    se = std / math.sqrt(n)
    p_low = float(_scipy.t.sf((mean + margin) / se, n - 1))  # H0: difference <= -margin
    p_high = float(_scipy.t.cdf((mean - margin) / se, n - 1))  # H0: difference >= +margin
    half = _scipy.t.ppf(1 - ALPHA, n - 1) * se
    return Equivalence(
        n=n,
        mean_diff=mean,
        std_diff=std,
        ci90_low=mean - half,
        ci90_high=mean + half,
        margin=margin,
        p=max(p_low, p_high),
        seeds_needed=tost_seeds_needed(std, margin),
    )


def tost_power(n: int, std: float, margin: float, true_diff: float = 0.0) -> float:
    """The exact chance that a paired TOST at ALPHA on n seeds shows equivalence, when the
    differences are normal with standard deviation `std` around `true_diff`.

    TOST rejects when -margin + c S / sqrt(n) < mean < margin - c S / sqrt(n), c = t_{1-ALPHA,
    n-1}; the mean is N(true_diff, std^2 / n) and independent of S, with (n-1) S^2 / std^2 a
    chi-square on n-1 degrees of freedom: integrate the normal probability over S's law."""
    from scipy import integrate
    from scipy.special import ndtr  # the normal cdf, without a frozen distribution per call

    if n < 2 or not std > 0 or not margin > 0:
        raise ValueError(f"need n >= 2, std > 0, margin > 0; got {n}, {std}, {margin}")
    c = _scipy.t.ppf(1 - ALPHA, n - 1)
    se = std / math.sqrt(n)
    k = (n - 1) / 2  # the chi-square's density on n - 1 dof, in logs: exact for any n
    log_norm = -k * math.log(2) - math.lgamma(k)

    def reject_given(u: float) -> float:  # u = (n-1) S^2 / std^2
        room = margin - c * std * math.sqrt(u / (n - 1)) / math.sqrt(n)
        if room <= 0 or u <= 0:
            return 0.0
        inside = ndtr((room - true_diff) / se) - ndtr((-room - true_diff) / se)
        return float(inside) * math.exp(log_norm + (k - 1) * math.log(u) - u / 2)

    # The interval is empty once c S / sqrt(n) >= margin; beyond the chi-square's central
    # 1 - 2e-12 the integrand is below what quad resolves (and for many seeds it would miss
    # the narrow peak if asked to integrate from 0).
    low, high = _scipy.chi2.ppf([1e-12, 1 - 1e-12], n - 1)
    u_max = min(high, (n - 1) * (margin * math.sqrt(n) / (c * std)) ** 2)
    if u_max <= low:
        return 0.0
    peak = [n - 1] if low < n - 1 < u_max else None  # the chi-square's bulk
    value, _ = integrate.quad(reject_given, low, u_max, points=peak, limit=200)
    return min(1.0, max(0.0, value))


def tost_seeds_needed(std: float, margin: float, power: float = POWER) -> int | None:
    """The fewest seeds for which a paired TOST at ALPHA reaches `power` when the true
    difference is 0 and the differences' std is `std`; None beyond MAX_SEEDS."""
    if not std > 0:
        return None
    high = 2  # power grows with n: double until it is reached, then bisect
    while tost_power(high, std, margin) < power:
        if high >= MAX_SEEDS:
            return None
        high = min(2 * high, MAX_SEEDS)
    low = max(2, high // 2)
    while low < high:
        mid = (low + high) // 2
        if tost_power(mid, std, margin) >= power:
            high = mid
        else:
            low = mid + 1
    return low
