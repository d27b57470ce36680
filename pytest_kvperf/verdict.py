"""Noise-aware speed verdict: is the current run slower than the baseline beyond a tolerance?

The statistic is the ratio of medians, current / baseline. Its confidence interval comes
from a bootstrap: for each side the bootstrap distribution of the sample median is
computed exactly (the median of n draws with replacement from sorted x_1..x_n is <= x_j
with probability P(Binomial(n, j/n) >= (n+1)/2)), then a seeded Monte-Carlo draw from the
two distributions gives the ratio's percentile interval. Exact per-side distributions
make this fast in pure Python and deterministic for the same inputs and seed.

A baseline without raw samples is rebuilt from its median, quartiles and round count: n
pseudo-samples at the plotting positions of a split normal distribution (separate widths
below and above the median) that has exactly those quartiles. That reproduces the
median's sampling spread, which depends on the density near the median. Samples thinned
to fewer points than the ``n`` rounds they summarise are expanded back to n quantiles.

Status "regressed" only when the whole interval lies beyond the tolerance on the bad side
(so an unchanged rerun is not flagged by noise), "improved" for the mirror case.
"""

from __future__ import annotations

import bisect
import math
import numbers
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .stats import binomial_upper_tail

_WINDOW_SD = 8.0  # order statistics further than this many sd from the middle carry ~0 mass
_Z_QUARTILE = statistics.NormalDist().inv_cdf(0.75)


@dataclass(frozen=True)
class RatioInterval:
    """The verdict's confidence interval of the median ratio current / baseline.

    Carried on compare.MetricChange and into the results JSON, so the report draws it
    without reading it back out of the verdict's text.
    """

    low: float
    high: float
    confidence: float  # 0.99 for a 99 % interval

    def __post_init__(self):
        for name in ("low", "high", "confidence"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"ci.{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))  # 1 and 1.0 must serialise alike
        if not 0 < self.low <= self.high:
            raise ValueError(f"ci needs 0 < low <= high, got [{self.low}, {self.high}]")
        if not 0 < self.confidence < 1:
            raise ValueError(f"ci.confidence must be in (0, 1), got {self.confidence!r}")

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "confidence": self.confidence}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RatioInterval:
        if not isinstance(data, Mapping):
            raise ValueError(f"ci must be an object {{low, high, confidence}}, "
                             f"got {type(data).__name__}")
        fields = ("low", "high", "confidence")
        wrong = sorted(set(data) ^ set(fields))
        if wrong:
            raise ValueError(f"ci.{wrong[0]}: " + ("unknown field" if wrong[0] in data
                                                   else "missing"))
        return cls(data["low"], data["high"], data["confidence"])


@dataclass(frozen=True)
class Verdict:
    status: str  # "ok" | "regressed" | "improved"
    ratio: float  # median(current) / median(baseline)
    ci_low: float
    ci_high: float
    reason: str
    confidence: float = 0.99  # of [ci_low, ci_high]

    @property
    def interval(self) -> RatioInterval:
        return RatioInterval(self.ci_low, self.ci_high, self.confidence)


def speed_verdict(
    base: Mapping[str, Any],
    current_samples: Sequence[float],
    *,
    better: str = "lower",
    rtol: float = 0.05,
    confidence: float = 0.99,
    n_boot: int = 10_000,
    seed: int = 0,
) -> Verdict:
    """Compare current samples with a baseline record {median, q1, q3, n[, samples]}.

    better="lower" for times (regressed: whole CI of the ratio above 1+rtol; improved:
    whole CI below 1-rtol); better="higher" for rates such as GB/s (mirrored).
    """
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    if not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
        raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")
    if not (isinstance(confidence, float) and 0.5 <= confidence < 1):
        raise ValueError(f"confidence must be a float in [0.5, 1), got {confidence!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100, got {n_boot!r}")
    cur = _check_samples(current_samples, "current_samples")
    base_med, base_dist = _baseline_distribution(base)
    cur_dist = _median_bootstrap_distribution(cur)

    rng = random.Random(seed)
    ratios = sorted(_draw(cur_dist, rng.random()) / _draw(base_dist, rng.random())
                    for _ in range(n_boot))
    alpha = 1.0 - confidence
    ci_low = ratios[int(math.floor(alpha / 2 * (n_boot - 1)))]
    ci_high = ratios[int(math.ceil((1 - alpha / 2) * (n_boot - 1)))]
    ratio = statistics.median(cur) / base_med

    hi_bound, lo_bound = 1.0 + rtol, 1.0 - rtol
    ci = f"ratio {ratio:.4f}, {confidence:.0%} CI [{ci_low:.4f}, {ci_high:.4f}]"
    worse_up = better == "lower"  # for times a larger ratio is worse
    if ci_low > hi_bound:
        status = "regressed" if worse_up else "improved"
        return Verdict(status, ratio, ci_low, ci_high, f"{ci} entirely above {hi_bound:.4f}",
                       confidence)
    if ci_high < lo_bound:
        status = "improved" if worse_up else "regressed"
        return Verdict(status, ratio, ci_low, ci_high, f"{ci} entirely below {lo_bound:.4f}",
                       confidence)
    return Verdict("ok", ratio, ci_low, ci_high,
                   f"{ci} not entirely outside the tolerance band "
                   f"[{lo_bound:.4f}, {hi_bound:.4f}]", confidence)


def _check_samples(values: Any, what: str) -> list[float]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a sequence of numbers, got {type(values).__name__}")
    values = list(values)  # numpy arrays and other iterables too
    if len(values) == 0:
        raise ValueError(f"{what} is empty")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{what} must hold numbers, got {type(v).__name__}")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{what} must be finite and > 0, got {v!r}")
        out.append(float(v))
    return sorted(out)


def _baseline_distribution(base: Mapping[str, Any]):
    """(baseline median, bootstrap distribution of its median)."""
    if not isinstance(base, Mapping):
        raise TypeError(f"base must be a mapping {{median, q1, q3, n[, samples]}}, "
                        f"got {type(base).__name__}")
    if base.get("samples") is not None and len(base["samples"]) > 0:
        xs = _check_samples(base["samples"], "base['samples']")
        n = _thinned_count(base, xs)
        if n == len(xs):
            return statistics.median(xs), _median_bootstrap_distribution(xs)
        # Samples thinned to evenly spaced order statistics of n rounds: the median's
        # spread follows n, the shape follows the kept points.
        value_at = _empirical_quantile_sample(xs, n)
        return _summary_median(base, xs), _median_bootstrap_distribution(None, n=n,
                                                                         value_at=value_at)
    med, q1, q3, n = _summary(base, "base")
    pseudo = _split_normal_sample(med, q1, q3, n)
    return med, _median_bootstrap_distribution(None, n=n, value_at=pseudo)


def _summary(base: Mapping[str, Any], what: str) -> tuple[float, float, float, int]:
    missing = [k for k in ("median", "q1", "q3", "n") if k not in base]
    if missing:
        raise ValueError(f"{what} lacks {missing} (and has no 'samples')")
    med, q1, q3 = (float(base[k]) for k in ("median", "q1", "q3"))
    n = base["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what}['n'] must be an int >= 1, got {n!r}")
    if not all(math.isfinite(v) for v in (med, q1, q3)) or not 0 < q1 <= med <= q3:
        raise ValueError(f"{what} needs finite 0 < q1 <= median <= q3, got {q1}, {med}, {q3}")
    return med, q1, q3, n


def _thinned_count(rec: Mapping[str, Any], xs: list[float]) -> int:
    """Rounds the samples stand for: rec['n'] when it says more rounds were taken."""
    n = rec.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > len(xs):
        return n
    return len(xs)


def _summary_median(rec: Mapping[str, Any], xs: list[float]) -> float:
    med = rec.get("median")
    ok = isinstance(med, (int, float)) and not isinstance(med, bool) and math.isfinite(med)
    return float(med) if ok and med > 0 else statistics.median(xs)


def _empirical_quantile_sample(xs: list[float], n: int):
    """j -> the sorted sample's quantile at plotting position (j-0.5)/n (linear)."""
    m = len(xs)

    def value_at(j: int) -> float:
        pos = min(max((j - 0.5) / n * m - 0.5, 0.0), m - 1.0)
        i = int(pos)
        if i >= m - 1:
            return xs[-1]
        return xs[i] + (pos - i) * (xs[i + 1] - xs[i])

    return value_at


def _split_normal_sample(med: float, q1: float, q3: float, n: int):
    """j -> the j-th of n plotting positions of a split normal with these quartiles."""
    lo_sd, hi_sd = (med - q1) / _Z_QUARTILE, (q3 - med) / _Z_QUARTILE
    normal = statistics.NormalDist()

    def value_at(j: int) -> float:
        z = normal.inv_cdf((j - 0.5) / n)
        return max(med + z * (lo_sd if z < 0 else hi_sd), 1e-12)

    return value_at


def _median_bootstrap_distribution(xs, *, n=None, value_at=None):
    """Support values and CDF of the bootstrap sample median (a step function).

    For odd n the median is the order statistic k=(n+1)/2; for even n it is taken as a
    50/50 mixture of ranks n/2 and n/2+1 (same mean as their average, slightly wider:
    the interval errs on the side of "ok"). Only ranks within _WINDOW_SD standard
    deviations of the middle are kept; the rest carry negligible probability.
    """
    if xs is not None:
        n = len(xs)

        def value_at(j):
            return xs[j - 1]

    if n == 1:
        return [value_at(1)], [1.0]
    ranks = [(n + 1) // 2] if n % 2 else [n // 2, n // 2 + 1]
    half = int(math.ceil(_WINDOW_SD * math.sqrt(n) / 2)) + 1
    lo_j, hi_j = max(1, ranks[0] - half), min(n, ranks[-1] + half)
    values, cdf = [], []
    for j in range(lo_j, hi_j + 1):
        p = sum(binomial_upper_tail(n, j / n, k) for k in ranks) / len(ranks)
        values.append(value_at(j))
        cdf.append(p if j < hi_j else 1.0)
    return values, cdf


def _draw(dist, u: float) -> float:
    values, cdf = dist
    return values[min(bisect.bisect_left(cdf, u), len(values) - 1)]


def judge_speed_metric(base_metric, metric) -> tuple[str, str, RatioInterval]:
    """(status, detail, interval) of a speed metric.Metric against its stored one, both with
    a spread; interval: the verdict's confidence interval of the median ratio.

    A spread ({median, q1, q3, n[, samples]}) describes the distribution of the metric's
    own value, in its own unit. A change within the metric's atol is ok.
    """
    better, rtol, atol = metric.better, metric.rtol, metric.atol
    cur_spread = metric.spread.to_dict()
    samples = cur_spread.get("samples")
    if not samples:
        # rebuild the current run's samples from its quartiles, as for a baseline
        med, q1, q3, n = _summary(cur_spread, "current spread")
        samples = [_split_normal_sample(med, q1, q3, n)(j) for j in range(1, n + 1)]
    else:  # thinned samples stand for n rounds: expand them back to n quantiles
        xs = _check_samples(samples, "current spread['samples']")
        n = _thinned_count(cur_spread, xs)
        if n > len(xs):
            samples = [_empirical_quantile_sample(xs, n)(j) for j in range(1, n + 1)]
    v = speed_verdict(base_metric.spread.to_dict(), samples, better=better, rtol=rtol)
    change = abs(metric.value - base_metric.value)
    if v.status != "ok" and change <= atol:
        return "ok", f"{v.reason}, but |change| {change:.4g} <= atol {atol}", v.interval
    return v.status, v.reason, v.interval
