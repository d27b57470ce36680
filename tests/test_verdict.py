"""The noise-aware speed verdict (pytest_kvperf.verdict).

Seeded synthetic timings (lognormal noise around a median) play the baseline and the
current run: unchanged code must stay "ok", a real shift beyond the tolerance must not.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics

import pytest

from pytest_kvperf import verdict as V
from pytest_kvperf.compare import MetricChange, compare_metrics, judge, mark_unreliable
from pytest_kvperf.metric import Metric, Spread
from pytest_kvperf.stats import binomial_upper_tail
from pytest_kvperf.verdict import RatioInterval, judge_speed_metric, speed_verdict


def draw(seed: int, n: int, median: float, sigma: float) -> list[float]:
    rng = random.Random(seed)
    return [median * rng.lognormvariate(0.0, sigma) for _ in range(n)]


def summary(xs: list[float]) -> dict:
    """A baseline stored without raw samples: median, quartiles, rounds."""
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "n": len(xs)}


@pytest.mark.parametrize("stored", ["samples", "quartiles"])
def test_same_distribution_twice_is_ok_in_at_least_99_percent_of_trials(stored):
    trials, n, sigma = 200, 40, 0.05
    ok = 0
    for t in range(trials):
        base = draw(2 * t, n, 100.0, sigma)
        cur = draw(2 * t + 1, n, 100.0, sigma)
        rec = {"samples": base} if stored == "samples" else summary(base)
        v = speed_verdict(rec, cur, rtol=0.01, n_boot=2000)
        ok += v.status == "ok"
    assert ok / trials >= 0.99


@pytest.mark.parametrize("stored", ["samples", "quartiles"])
def test_10_percent_slowdown_with_5_percent_tolerance_is_regressed(stored):
    for t in range(40):
        base = draw(2 * t, 50, 100.0, 0.02)
        cur = draw(2 * t + 1, 50, 110.0, 0.02)
        rec = {"samples": base} if stored == "samples" else summary(base)
        v = speed_verdict(rec, cur, rtol=0.05, n_boot=2000)
        assert v.status == "regressed", (t, v)
        assert 1.05 < v.ci_low <= v.ratio <= v.ci_high
        assert v.ratio == pytest.approx(1.10, abs=0.02)


def test_10_percent_speedup_is_improved_symmetrically():
    for t in range(40):
        v = speed_verdict({"samples": draw(2 * t, 50, 100.0, 0.02)},
                          draw(2 * t + 1, 50, 90.0, 0.02), rtol=0.05, n_boot=2000)
        assert v.status == "improved", (t, v)
        assert v.ci_low <= v.ratio <= v.ci_high < 0.95


def test_noisy_data_with_a_small_shift_is_ok():
    for t in range(40):
        v = speed_verdict({"samples": draw(2 * t, 20, 100.0, 0.15)},
                          draw(2 * t + 1, 20, 103.0, 0.15), rtol=0.05, n_boot=2000)
        assert v.status == "ok", (t, v)
        assert v.ci_low < 1.05  # the interval is wide: noise, not a regression


def test_a_shift_inside_the_tolerance_is_ok_however_precise():
    # Tight data (0.2 % noise): the 3 % shift is real, but within rtol=5 %.
    v = speed_verdict({"samples": draw(1, 500, 100.0, 0.002)}, draw(2, 500, 103.0, 0.002))
    assert v.status == "ok" and 1.02 < v.ci_low < v.ci_high < 1.04


def test_rates_where_higher_is_better_mirror_the_verdict():
    base = {"samples": draw(1, 60, 3000.0, 0.02)}  # e.g. GB/s
    assert speed_verdict(base, draw(2, 60, 2700.0, 0.02), better="higher").status == "regressed"
    assert speed_verdict(base, draw(3, 60, 3300.0, 0.02), better="higher").status == "improved"
    assert speed_verdict(base, draw(4, 60, 3000.0, 0.02), better="higher").status == "ok"


def test_deterministic_for_the_same_inputs_and_seed():
    base, cur = {"samples": draw(1, 33, 10.0, 0.1)}, draw(2, 33, 10.5, 0.1)
    assert speed_verdict(base, cur) == speed_verdict(base, cur)
    assert speed_verdict(summary(base["samples"]), cur) == speed_verdict(
        summary(base["samples"]), cur)


def test_quartile_baseline_gives_about_the_same_interval_as_raw_samples():
    base = draw(7, 200, 50.0, 0.05)
    cur = draw(8, 200, 50.0, 0.05)
    a = speed_verdict({"samples": base}, cur)
    b = speed_verdict(summary(base), cur)
    width_a, width_b = a.ci_high - a.ci_low, b.ci_high - b.ci_low
    assert width_b == pytest.approx(width_a, rel=0.25)
    assert b.ratio == pytest.approx(a.ratio, rel=1e-12)  # same medians


def thin(xs: list[float], keep: int) -> list[float]:
    xs = sorted(xs)
    step = (len(xs) - 1) / (keep - 1)
    return [xs[round(i * step)] for i in range(keep)]


def test_thinned_samples_keep_the_precision_of_all_rounds():
    base, cur = draw(11, 4000, 50.0, 0.05), draw(12, 4000, 50.0, 0.05)
    full = speed_verdict({"samples": base}, cur)
    thinned = speed_verdict({"samples": thin(base, 400), "n": 4000, **{
        k: v for k, v in summary(base).items() if k != "n"}}, cur)
    as_if_400 = speed_verdict({"samples": thin(base, 400)}, cur)
    width = lambda v: v.ci_high - v.ci_low  # noqa: E731
    assert width(thinned) == pytest.approx(width(full), rel=0.2)
    assert width(as_if_400) > 1.5 * width(full)  # what ignoring n would have cost
    # the plugin adapter expands a thinned current side the same way
    status, _, _ = judge_speed_metric(
        metric(50.0, spread={"samples": thin(base, 400), **summary(base)}),
        metric(55.0, spread={"samples": thin(draw(13, 4000, 55.0, 0.05), 400), "n": 4000}))
    assert status == "regressed"


def test_reason_names_the_ratio_interval_and_band():
    v = speed_verdict({"samples": draw(1, 50, 100.0, 0.02)}, draw(2, 50, 120.0, 0.02))
    assert v.status == "regressed"
    assert "ratio" in v.reason and "CI" in v.reason and "1.0500" in v.reason


# ----------------------------------------------------------------- the exact bootstrap


@pytest.mark.parametrize("xs", [[3.0, 1.0, 4.0, 1.5, 9.0], [2.0, 7.0, 1.0, 8.0, 2.5, 8.5, 3.0]])
def test_median_bootstrap_distribution_is_exact_for_odd_n(xs):
    """Enumerate all n^n resamples: the bootstrap median's CDF must match exactly."""
    xs = sorted(xs)
    n = len(xs)
    counts: dict[float, int] = {}
    for pick in itertools.product(xs, repeat=n):
        m = sorted(pick)[n // 2]
        counts[m] = counts.get(m, 0) + 1
    values, cdf = V._median_bootstrap_distribution(xs)
    total = n**n
    for v, c in zip(values, cdf, strict=True):
        exact = sum(k for m, k in counts.items() if m <= v) / total
        assert c == pytest.approx(exact, abs=1e-12)


def test_even_n_median_distribution_has_the_exact_mean():
    xs = [1.0, 2.0, 4.0, 8.0]
    exact_mean = statistics.fmean(
        statistics.median(p) for p in itertools.product(xs, repeat=4))
    values, cdf = V._median_bootstrap_distribution(xs)
    probs = [c - p for c, p in zip(cdf, [0.0] + cdf[:-1], strict=True)]
    assert sum(v * p for v, p in zip(values, probs, strict=True)) == pytest.approx(
        exact_mean, rel=1e-12)


@pytest.mark.parametrize("n, p, k", [(10, 0.5, 5), (31, 0.3, 12), (200, 0.55, 100), (7, 0.9, 7)])
def test_binomial_tail_matches_the_exact_sum(n, p, k):
    exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
    assert binomial_upper_tail(n, p, k) == pytest.approx(exact, rel=1e-10, abs=1e-15)


def test_binomial_tail_normal_approximation_is_close_for_large_n():
    n, k = 4001, 2001
    for j in (1960, 2000, 2040):
        p = j / n
        # exact in log space, the reference for the approximation used above n=1000
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
        exact = sum(math.exp(x) for x in logs)
        assert binomial_upper_tail(n, p, k) == pytest.approx(exact, abs=2e-3)


# ----------------------------------------------------------------- the plugin adapter


def metric(value, *, spread=None, better="lower", rtol=0.05, atol=0.0):
    if spread is not None:
        spread = Spread.from_dict({**summary(spread["samples"]), **spread}
                                  if "median" not in spread else spread)
    return Metric(value, "speed", better, rtol, atol, "us", spread=spread)


def test_judge_uses_the_bootstrap_when_both_sides_have_a_spread():
    base, cur = draw(1, 60, 100.0, 0.02), draw(2, 60, 110.0, 0.02)
    status, detail, ci = judge(
        metric(statistics.median(base), spread={"samples": base, **summary(base)}),
        metric(statistics.median(cur), spread={"samples": cur, **summary(cur)}))
    assert status == "regressed" and "CI" in detail
    # the interval is the verdict's own, as a field, not only in the text
    v = speed_verdict({"samples": base}, cur)
    assert ci == RatioInterval(v.ci_low, v.ci_high, 0.99) == v.interval
    assert 1.05 < ci.low <= v.ratio <= ci.high
    # the current side given by quartiles only is rebuilt the same way as a baseline
    status, _, _ = judge_speed_metric(metric(statistics.median(base), spread=summary(base)),
                                   metric(statistics.median(cur), spread=summary(cur)))
    assert status == "regressed"


def test_judge_without_spread_falls_back_to_the_plain_tolerance():
    assert judge(metric(100.0), metric(104.0))[0] == "ok"
    assert judge(metric(100.0), metric(106.0))[0] == "regressed"
    assert judge(metric(100.0), metric(94.0))[0] == "improved"
    # a spread on one side only is not enough for the bootstrap
    one_sided = metric(100.0, spread=summary(draw(1, 60, 100.0, 0.02)))
    assert judge(one_sided, metric(106.0)) == judge(metric(100.0), metric(106.0))
    assert judge(metric(100.0), metric(106.0)).ci is None  # no interval without spreads


def test_judge_keeps_changes_within_atol_ok():
    base, cur = draw(1, 60, 10.0, 0.01), draw(2, 60, 11.0, 0.01)
    status, detail, ci = judge_speed_metric(
        metric(statistics.median(base), spread={"samples": base}, atol=2.0),
        metric(statistics.median(cur), spread={"samples": cur}, atol=2.0))
    assert status == "ok" and "atol" in detail
    assert ci.low > 1.05  # the interval still says what the bootstrap saw


def test_comparison_carries_the_interval_into_the_results_json():
    base, cur = draw(1, 60, 100.0, 0.02), draw(2, 60, 110.0, 0.02)
    stored = {"median_us": metric(statistics.median(base), spread={"samples": base}),
              "err": Metric(0.01, "accuracy", "lower", 0.5, 0.0)}
    now = {"median_us": metric(statistics.median(cur), spread={"samples": cur}),
           "err": Metric(0.01, "accuracy", "lower", 0.5, 0.0)}
    changes = {c.name: c for c in compare_metrics(stored, now).changes}
    v = speed_verdict({"samples": base}, cur)
    assert changes["median_us"].ci == v.interval and changes["err"].ci is None
    for c in changes.values():  # to_dict / from_dict are each other's inverse, via JSON
        assert MetricChange.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert changes["median_us"].to_dict()["ci"] == {"low": v.ci_low, "high": v.ci_high,
                                                    "confidence": 0.99}
    # a throttled timing keeps the interval it would have been judged by
    (marked,) = [c for c in mark_unreliable(compare_metrics(stored, now), "throttled").changes
                 if c.name == "median_us"]
    assert marked.status == "unreliable" and marked.ci == v.interval
    # written before the field existed: no interval
    old = {k: x for k, x in changes["median_us"].to_dict().items() if k != "ci"}
    assert MetricChange.from_dict(old).ci is None


@pytest.mark.parametrize("data, words", [
    ({"low": 1.1, "high": 1.2}, "ci.confidence: missing"),
    ({"low": 1.1, "high": 1.2, "confidence": 0.99, "level": 1}, "ci.level: unknown field"),
    ({"low": 1.3, "high": 1.2, "confidence": 0.99}, "low <= high"),
    ({"low": math.nan, "high": 1.2, "confidence": 0.99}, "ci.low must be a finite number"),
    ({"low": 1.1, "high": 1.2, "confidence": 99}, "ci.confidence must be in"),
    ([1.1, 1.2], "ci must be an object"),
])
def test_bad_interval_raises_a_clear_error(data, words):
    with pytest.raises(ValueError, match=words):
        RatioInterval.from_dict(data)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "base, cur, kwargs, exc, words",
    [
        ({"samples": [1.0]}, [], {}, ValueError, "current_samples is empty"),
        ({"samples": [1.0]}, [1.0, math.nan], {}, ValueError, "finite"),
        ({"samples": [1.0]}, [1.0, -2.0], {}, ValueError, "> 0"),
        ({"samples": [1.0]}, "12", {}, TypeError, "sequence of numbers"),
        ({"median": 1.0, "q1": 0.9}, [1.0], {}, ValueError, "lacks"),
        ({"median": 1.0, "q1": 1.1, "q3": 1.2, "n": 5}, [1.0], {}, ValueError, "q1 <= median"),
        ({"median": 1.0, "q1": 0.9, "q3": 1.2, "n": 0}, [1.0], {}, ValueError, "'n'"),
        ([1.0, 2.0], [1.0], {}, TypeError, "mapping"),
        ({"samples": [1.0]}, [1.0], {"better": "faster"}, ValueError, "better"),
        ({"samples": [1.0]}, [1.0], {"rtol": -0.1}, ValueError, "rtol"),
        ({"samples": [1.0]}, [1.0], {"confidence": 1.0}, ValueError, "confidence"),
        ({"samples": [1.0]}, [1.0], {"n_boot": 10}, ValueError, "n_boot"),
    ],
)
def test_bad_input_raises_a_clear_error(base, cur, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        speed_verdict(base, cur, **kwargs)
