"""The statistics the timing engine, the spreads and the speed verdict share.

Pure Python (no numpy), so the plugin works without it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

_EXACT_BINOMIAL_MAX_N = 1000  # above this the binomial tail uses the normal approximation


def quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3), interpolated linearly like numpy's default; one sample is all three."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("quartiles of no samples")
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


def thin(samples: Sequence[float], keep: int) -> list[float]:
    """Sorted samples cut to `keep` evenly spaced order statistics (all of them if fewer)."""
    xs = sorted(samples)
    if len(xs) <= keep:
        return xs
    step = (len(xs) - 1) / (keep - 1)
    return [xs[round(i * step)] for i in range(keep)]


def binomial_upper_tail(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k)."""
    if k <= 0 or p >= 1.0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if n > _EXACT_BINOMIAL_MAX_N:
        sd = math.sqrt(n * p * (1 - p))
        return 1.0 - statistics.NormalDist().cdf((k - 0.5 - n * p) / sd)
    log_term = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                + k * math.log(p) + (n - k) * math.log1p(-p))
    term, total, odds, mean = math.exp(log_term), 0.0, p / (1 - p), n * p
    for i in range(k, n + 1):
        total += term
        if i > mean and term < 1e-17 * total:
            break
        term *= (n - i) / (i + 1) * odds
    return min(total, 1.0)


def median_ci_rank(n: int, confidence: float) -> int:
    """The largest r with P(Binomial(n, 1/2) <= r-1) <= (1-confidence)/2, or 0 if none."""
    tail = (1.0 - confidence) / 2.0

    def below(r: int) -> float:  # P(Bin(n, 1/2) <= r-1) = P(Bin >= n-r+1) by symmetry
        return binomial_upper_tail(n, 0.5, n - r + 1)

    z = statistics.NormalDist().inv_cdf(1.0 - tail)
    r = min(max(int(n / 2.0 - z * math.sqrt(n) / 2.0), 0), n)  # normal guess, then exact
    while r < n and below(r + 1) <= tail:
        r += 1
    while r > 0 and below(r) > tail:
        r -= 1
    return r


def median_ci(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free CI of the median: order statistics x_(r) .. x_(n+1-r).

    Returns (-inf, inf) when n is too small for any r.
    """
    xs = sorted(samples)
    r = median_ci_rank(len(xs), confidence)
    if r < 1:
        return -math.inf, math.inf
    return xs[r - 1], xs[len(xs) - r]


def relative_ci_halfwidth(samples: Sequence[float], confidence: float = 0.95) -> float:
    """Half the width of the median's CI over the median (inf when it cannot be bounded)."""
    lo, hi = median_ci(samples, confidence)
    med = statistics.median(samples)
    if not math.isfinite(lo) or med <= 0:
        return math.inf
    return (hi - lo) / 2.0 / med
