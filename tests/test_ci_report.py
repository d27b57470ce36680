"""Regressions visible to CI without the plugin: JUnit properties per metric and per suite,
the speed-regression warning, and the exit status under each speed policy."""

import xml.etree.ElementTree as ET

import pytest

TESTS = """
import os

def test_speed(kvperf):
    kvperf.speed("median_us", float(os.environ.get("KV_US", "100")), better="lower", rtol=0.05)

def test_err(kvperf):
    kvperf.error("rel_l2_err", float(os.environ.get("KV_ERR", "0.01")))

def test_plain():
    assert 1 + 1 == 2
"""


@pytest.fixture
def recorded(pytester, monkeypatch):
    """A project whose baselines hold median_us 100 and rel_l2_err 0.01."""
    for name in ("KV_US", "KV_ERR"):
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(TESTS)
    pytester.runpytest("--update-baselines", "-p", "no:cacheprovider").assert_outcomes(passed=3)
    return pytester


def junit(pytester, monkeypatch, *args, **env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = pytester.runpytest("--junitxml=j.xml", "-p", "no:cacheprovider", *args)
    root = ET.parse(pytester.path / "j.xml").getroot()
    suite = root.find("testsuite")
    suite_props = {p.get("name"): p.get("value") for p in suite.findall("properties/property")}
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    return result, suite_props, cases


def props(case):
    return {p.get("name"): p.get("value") for p in case.findall("properties/property")}


def test_a_speed_regression_is_findable_in_plain_junit(recorded, monkeypatch):
    result, suite, cases = junit(recorded, monkeypatch, KV_US="150")
    assert result.ret == 0  # policy warn: reported, not failed
    speed = props(cases["test_speed"])
    assert speed["kvperf_verdict"] == "regressed"
    assert speed["kvperf_metric:median_us"] == (
        "value=150 baseline=100 verdict=regressed change=+50.0% kind=speed better=lower unit=us")
    assert speed["kvperf_regression"].startswith("median_us 100 -> 150 (+50.0%) [speed")
    assert "kvperf_metrics" not in speed and "kvperf_benchmark" not in speed  # no JSON blob
    assert cases["test_speed"].find("failure") is None
    err = props(cases["test_err"])
    assert err["kvperf_verdict"] == "ok" and "kvperf_regression" not in err
    assert err["kvperf_metric:rel_l2_err"].startswith("value=0.01 baseline=0.01 verdict=ok")
    assert "kvperf_verdict" not in props(cases["test_plain"])  # recorded nothing
    # the suite: the regressed node ids, the counts, the environment
    assert suite["kvperf_regressed"] == "test_a_speed_regression_is_findable_in_plain_junit.py" \
                                        "::test_speed"
    assert suite["kvperf_regressed_count"] == "1" and suite["kvperf_speed_policy"] == "warn"
    assert suite["kvperf_verdicts"] == "1 regressed, 1 ok, 1 ran (no metrics)"
    from pytest_kvperf.hardware import detect

    hw = detect()
    assert suite["kvperf_gpu"] == hw.name and suite["kvperf_gpu_key"] == hw.key
    assert suite["kvperf_version:torch"] == hw.versions["torch"]
    assert suite["kvperf_version:pytest_benchmark"] == hw.versions["pytest_benchmark"]
    if not hw.has_gpu:
        assert suite["kvperf_gpu_facts"].startswith("absent: no CUDA GPU (")
    # and pytest's own warnings summary names it, plugin or not
    result.stdout.fnmatch_lines(["*warnings summary*", "*::test_speed*",
                                 "*KvperfSpeedRegression: speed regressed against *"
                                 "(not failed: --kvperf-speed=warn): median_us 100 -> 150*"])


def test_an_unchanged_rerun_has_no_regression_anywhere(recorded, monkeypatch):
    result, suite, cases = junit(recorded, monkeypatch)
    assert result.ret == 0
    assert props(cases["test_speed"])["kvperf_verdict"] == "ok"
    assert suite["kvperf_regressed"] == "" and suite["kvperf_regressed_count"] == "0"
    assert "KvperfSpeedRegression" not in result.stdout.str()


def test_speed_fail_is_the_ci_setting(recorded, monkeypatch):
    result, suite, cases = junit(recorded, monkeypatch, "--kvperf-speed=fail", KV_US="150")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    failure = cases["test_speed"].find("failure")
    assert failure is not None and "median_us 100 -> 150 (+50.0%)" in failure.get("message")
    assert props(cases["test_speed"])["kvperf_verdict"] == "regressed"
    assert suite["kvperf_speed_policy"] == "fail"
    assert "KvperfSpeedRegression" not in result.stdout.str()  # it failed instead


def test_accuracy_regression_fails_under_either_policy(recorded, monkeypatch):
    result, suite, cases = junit(recorded, monkeypatch, KV_ERR="0.03")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert cases["test_err"].find("failure") is not None
    assert props(cases["test_err"])["kvperf_verdict"] == "regressed"
    assert suite["kvperf_regressed_count"] == "1"


def test_properties_survive_xdist(recorded, monkeypatch):
    pytest.importorskip("xdist")
    result, suite, cases = junit(recorded, monkeypatch, "-n", "2", KV_US="150")
    assert result.ret == 0
    speed = props(cases["test_speed"])
    assert speed["kvperf_verdict"] == "regressed" and "kvperf_metrics" not in speed
    assert speed["kvperf_metric:median_us"].startswith("value=150 baseline=100 verdict=regressed")
    assert suite["kvperf_regressed"].endswith("::test_speed")
