"""Every metric kind's default tolerance catches a realistic regression, and only that.

Each case records a baseline, then reruns with the measured value moved: by a realistic
regression (fails), not at all (bit-identical: ok) and by a little (ok).
"""

import json

import pytest

pytest.importorskip("torch")

# Errors of `out` against `ref`: an orthogonal error (moves rel_l2_err and 1 - cosine)
# scaled by KV_ORTH and one spike (moves max_abs_err) scaled by KV_SPIKE. A rate, a speed
# metric with its spread, and a kernel that is bit-exact until KV_INEXACT says otherwise.
TESTS = """
import math, os
import torch
from pytest_kvperf.metric import Spread

def v(name, default):
    return float(os.environ.get("KV_" + name.upper(), default))

def test_errors(kvperf):
    n = 4096
    ref = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    w = torch.sin(torch.arange(n, dtype=torch.float64) * 0.37)
    w -= (w @ ref) / (ref @ ref) * ref  # orthogonal to ref: the cosine sees all of it
    spike = torch.zeros(n, dtype=torch.float64)
    spike[7] = 0.01
    out = ref + v("orth", 1.0) * 1e-3 * w + v("spike", 1.0) * spike
    m = kvperf.errors(out, ref)
    assert m["cosine"] >= 0.99  # a hard assert on the returned cosine still works

def test_bit_exact(kvperf):
    ref = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)
    kvperf.errors(ref * (1.0 + v("inexact", 0.0)), ref, prefix="exact_")

def test_rate(kvperf):
    kvperf.rate("token_match", v("rate", 0.99))

def test_speed(kvperf):
    us = v("us", 100.0)
    samples = [us * (1.0 + 0.01 * math.sin(i)) for i in range(200)]
    kvperf.speed("median_us", us, better="lower", spread=Spread.of(samples))
"""

ENV = ("orth", "spike", "inexact", "rate", "us")


def run(pytester, monkeypatch, *args, **env):
    for name in ENV:
        monkeypatch.delenv("KV_" + name.upper(), raising=False)
    for name, val in env.items():
        monkeypatch.setenv("KV_" + name.upper(), str(val))
    result = pytester.runpytest("-p", "no:cacheprovider", "--kvperf-json=r.json", *args)
    tests = json.loads((pytester.path / "r.json").read_text())["tests"]
    return result, {
        k.split("::")[1]: {c["name"]: c["status"] for c in t["changes"]} for k, t in tests.items()
    }


@pytest.fixture
def recorded(pytester, monkeypatch):
    pytester.makepyfile(test_lab=TESTS)
    result, _ = run(pytester, monkeypatch, "--update-baselines")
    result.assert_outcomes(passed=4)


def test_bit_identical_rerun_is_ok(pytester, monkeypatch, recorded):
    result, changes = run(pytester, monkeypatch)
    result.assert_outcomes(passed=4)
    assert {s for test in changes.values() for s in test.values()} == {"ok"}


@pytest.mark.parametrize("env, regressed", [
    # every error doubled: each metric fails on its own tolerance (1 - cosine goes x4)
    ({"orth": 2.0, "spike": 2.0}, {"max_abs_err", "rel_l2_err", "cosine_distance"}),
    # 1 - cosine doubled (orthogonal error x1.41): rel_l2 and max_abs x1.41 stay within 1.5x
    ({"orth": 2**0.5}, {"cosine_distance"}),
    # max_abs_err doubled by one element; the L2 error and the cosine barely move
    ({"spike": 2.0}, {"max_abs_err"}),
])
def test_doubled_error_fails_on_that_metric(pytester, monkeypatch, recorded, env, regressed):
    result, changes = run(pytester, monkeypatch, **env)
    result.assert_outcomes(passed=3, failed=1)
    assert {name for name, s in changes["test_errors"].items() if s == "regressed"} == regressed
    result.stdout.fnmatch_lines(["*test_errors regressed against baseline*"])


def test_bit_exact_baseline_fails_as_soon_as_exactness_is_lost(pytester, monkeypatch, recorded):
    result, changes = run(pytester, monkeypatch, inexact=1e-9)  # float32 rounds at 6e-8
    result.assert_outcomes(passed=3, failed=1)
    assert changes["test_bit_exact"] == {"exact_max_abs_err": "regressed",
                                         "exact_rel_l2_err": "regressed",
                                         "exact_cosine_distance": "ok"}  # a scale: same direction
    # float64 rounding (a relative error of 1e-15) is under the floor
    run(pytester, monkeypatch, inexact=1e-15)[0].assert_outcomes(passed=4)


def test_rate_drop_of_3_points_fails(pytester, monkeypatch, recorded):
    result, changes = run(pytester, monkeypatch, rate=0.96)
    result.assert_outcomes(passed=3, failed=1)
    assert changes["test_rate"] == {"token_match": "regressed"}


def test_speed_20_percent_slower_is_regressed_and_fails_when_asked(pytester, monkeypatch,
                                                                    recorded):
    result, changes = run(pytester, monkeypatch, us=120.0)
    result.assert_outcomes(passed=4)  # --kvperf-speed=warn: reported, not failed
    assert changes["test_speed"] == {"median_us": "regressed"}
    result, _ = run(pytester, monkeypatch, "--kvperf-speed=fail", us=120.0)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*median_us 100 -> 120 (+20.0%) [speed*CI*"])


@pytest.mark.parametrize("env", [
    {"orth": 1.1, "spike": 1.1},  # errors x1.1 (1 - cosine x1.21)
    {"rate": 0.985},
    {"us": 102.0},  # 2 % slower, tolerance 5 %
])
def test_small_change_within_tolerance_is_ok(pytester, monkeypatch, recorded, env):
    result, changes = run(pytester, monkeypatch, **env)
    result.assert_outcomes(passed=4)
    assert {s for test in changes.values() for s in test.values()} == {"ok"}


def test_stored_value_outside_the_declared_domain_fails(pytester, monkeypatch, recorded):
    """A hand-edited entry without its domain: the run's declared domain still catches it."""
    (path,) = (pytester.path / "baselines").glob("*.json")
    data = json.loads(path.read_text())
    stored = data["entries"]["test_lab.py::test_rate"]["metrics"]["token_match"]
    stored["value"] = 1.04
    del stored["domain"]
    path.write_text(json.dumps(data))
    result, changes = run(pytester, monkeypatch)
    result.assert_outcomes(passed=3, failed=1)
    assert changes["test_rate"] == {"token_match": "invalid"}
    result.stdout.fnmatch_lines(["*token_match 1.04 -> 0.99*stored value 1.04 is outside the "
                                 "metric's domain ?0, 1?: the baseline file is wrong*"])


def test_recording_an_impossible_value_is_an_error(pytester):
    pytester.makepyfile("def test_x(kvperf):\n    kvperf.rate('token_match', 1.2)\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*metric 'token_match': value: 1.2 is outside the metric's "
                                 "domain ?0, 1?*"])
