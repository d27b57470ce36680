"""Compare outcomes, update semantics and malformed files, through real pytest runs."""

import json

import pytest

from pytest_kvperf.baselines import SCHEMA, load

# Each test records one metric whose value comes from the environment of the run, so a
# second run can move it relative to the stored baseline.
RECORDING_TESTS = """
import os
import pytest

def value(name, default):
    return float(os.environ.get("KV_" + name.upper(), default))

def test_err(kvperf):
    kvperf.accuracy("max_abs_err", value("err", 0.010), better="lower", rtol=0.1)

def test_cos(kvperf):
    kvperf.accuracy("cosine", value("cos", 0.990), better="higher", rtol=0.0, atol=0.001)

def test_speed(kvperf):
    kvperf.speed("median_us", value("us", 100.0), better="lower", rtol=0.05)

@pytest.mark.sm100
def test_blackwell(kvperf):
    kvperf.accuracy("max_abs_err", 0.1, better="lower")

def test_maybe_skips(kvperf):
    if os.environ.get("KV_SKIP"):
        pytest.skip("driver too old")
    kvperf.accuracy("max_abs_err", 0.5, better="lower")

def test_fails_when_asked(kvperf):
    kvperf.accuracy("max_abs_err", value("fail_err", 0.2), better="lower")
    assert not os.environ.get("KV_FAIL"), "lab threshold broken"
"""


def baseline_path(pytester):
    from pytest_kvperf.hardware import detect

    return pytester.path / "baselines" / f"{detect().key}.json"


def run(pytester, monkeypatch, *args, **env):
    for name in ("err", "cos", "us", "skip", "fail", "fail_err"):
        monkeypatch.delenv("KV_" + name.upper(), raising=False)
    for name, val in env.items():
        monkeypatch.setenv("KV_" + name.upper(), str(val))
    return pytester.runpytest("-p", "no:cacheprovider", "--kvperf-json=r.json", *args)


def statuses(pytester):
    doc = json.loads((pytester.path / "r.json").read_text())["tests"]
    return {k.split("::")[1]: v["status"] for k, v in doc.items()}


@pytest.fixture
def recorded(pytester, monkeypatch):
    """A project whose baseline was recorded by a first --update-baselines run."""
    pytester.makepyfile(test_lab=RECORDING_TESTS)
    result = run(pytester, monkeypatch, "--update-baselines", "--kvperf-hw=h100")
    result.assert_outcomes(passed=5, skipped=1)
    return load(baseline_path(pytester))


def test_first_update_records_measured_and_na(pytester, recorded):
    entries = recorded.entries
    assert entries["test_lab.py::test_err"].metrics["max_abs_err"].value == 0.010
    assert entries["test_lab.py::test_speed"].metrics["median_us"].kind == "speed"
    # Reasons found under an injected profile describe another machine: not stored.
    assert "test_lab.py::test_blackwell" not in entries
    assert entries["test_lab.py::test_err"].versions["pytest_benchmark"]


def test_unchanged_rerun_is_ok(pytester, monkeypatch, recorded):
    result = run(pytester, monkeypatch)
    result.assert_outcomes(passed=5, skipped=1)
    s = statuses(pytester)
    assert s["test_err"] == s["test_cos"] == s["test_speed"] == "ok"


def test_accuracy_regression_fails_and_improvement_is_reported(pytester, monkeypatch, recorded):
    result = run(pytester, monkeypatch, err=0.02, cos=0.995)
    result.assert_outcomes(passed=4, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*regressed against baseline*", "*max_abs_err 0.01 -> 0.02 (+100.0%) [accuracy*"]
    )
    s = statuses(pytester)
    assert s["test_err"] == "regressed" and s["test_cos"] == "improved"


def test_within_tolerance_is_ok(pytester, monkeypatch, recorded):
    run(pytester, monkeypatch, err=0.0109, cos=0.9895).assert_outcomes(passed=5, skipped=1)
    assert statuses(pytester)["test_err"] == "ok" and statuses(pytester)["test_cos"] == "ok"


def test_speed_regression_policy(pytester, monkeypatch, recorded):
    run(pytester, monkeypatch, us=120).assert_outcomes(passed=5, skipped=1)
    assert statuses(pytester)["test_speed"] == "regressed"
    result = run(pytester, monkeypatch, "--kvperf-speed=fail", us=120)
    result.assert_outcomes(passed=4, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*median_us 100 -> 120 (+20.0%) ?speed, lower is better?*"])


def test_lost_coverage_and_new(pytester, monkeypatch, recorded):
    pytester.makepyfile(
        test_more="def test_added(kvperf):\n    kvperf.accuracy('e', 1.0, better='lower')\n"
    )
    result = run(pytester, monkeypatch, skip=1)
    result.assert_outcomes(passed=5, skipped=2)
    doc = json.loads((pytester.path / "r.json").read_text())["tests"]
    assert doc["test_lab.py::test_maybe_skips"]["status"] == "lost coverage"
    assert doc["test_more.py::test_added"]["status"] == "new"
    result.stdout.fnmatch_lines(["*lost coverage: 1 tests*", "*test_maybe_skips: driver too old*"])


def test_hw_skip_recorded_as_na_then_reported_na(pytester, monkeypatch, recorded):
    from pytest_kvperf.hardware import detect

    if detect().capability and detect().capability[0] == 10:
        pytest.skip("the sm100 test runs here")
    run(pytester, monkeypatch, "--update-baselines").assert_outcomes(passed=5, skipped=1)
    entry = load(baseline_path(pytester)).entries["test_lab.py::test_blackwell"]
    assert entry.status == "n/a" and entry.hw_skip_reason.startswith("needs sm100")
    run(pytester, monkeypatch)
    assert statuses(pytester)["test_blackwell"] == "n/a"


def test_update_rewrites_only_passed_tests_and_keeps_others(pytester, monkeypatch, recorded):
    path = baseline_path(pytester)
    data = json.loads(path.read_text())
    data["entries"]["test_gone.py::test_elsewhere"] = {
        "status": "measured",
        "metrics": {"x": {"value": 1.0, "kind": "accuracy", "better": "lower"}},
    }
    path.write_text(json.dumps(data))
    result = run(
        pytester, monkeypatch, "--update-baselines", err=0.02, fail=1, fail_err=0.9, skip=1
    )
    result.assert_outcomes(passed=3, failed=1, skipped=2)
    result.stdout.fnmatch_lines(["*test_err: max_abs_err 0.01 -> 0.02 (+100.0%)*"])
    entries = load(path).entries
    assert entries["test_lab.py::test_err"].metrics["max_abs_err"].value == 0.02
    # failed: old numbers kept; skipped (lost coverage): old numbers kept; unrelated: kept
    assert entries["test_lab.py::test_fails_when_asked"].metrics["max_abs_err"].value == 0.2
    assert entries["test_lab.py::test_maybe_skips"].metrics["max_abs_err"].value == 0.5
    assert entries["test_gone.py::test_elsewhere"].metrics["x"].value == 1.0


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"schema": "other/1", "entries": {}}), "schema: expected"),
        (
            json.dumps({"schema": SCHEMA, "entries": {"t::a": {"status": "measured", "metrics": {
                "m": {"value": 1.0, "kind": "accuracy", "better": "sideways"}}}}}),
            "unknown metric direction 'sideways'",
        ),
        (
            json.dumps({"schema": SCHEMA, "entries": {"t::a": {"status": "measured", "metrics": {
                "m": {"value": "fast", "kind": "speed", "better": "lower"}}}}}),
            "expected a number, found 'fast'",
        ),
        (
            json.dumps({"schema": SCHEMA, "entries": {"t::a": {"status": "n/a"}}}),
            "needs a non-empty 'hw_skip_reason'",
        ),
    ],
)
def test_malformed_file_stops_run_and_is_never_overwritten(pytester, content, problem):
    pytester.makepyfile(RECORDING_TESTS)
    bad = pytester.path / "baselines" / "nvidia-h100-80gb-hbm3.json"
    bad.parent.mkdir()
    bad.write_text(content)
    result = pytester.runpytest("--update-baselines")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*malformed baseline file {bad}*{problem}*"])
    assert bad.read_text() == content
    assert sorted(p.name for p in bad.parent.iterdir()) == [bad.name]


def test_nan_metric_fails_the_test(pytester):
    pytester.makepyfile(
        "def test_nan(kvperf):\n    kvperf.accuracy('err', float('nan'), better='lower')\n"
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*metric 'err' is nan: NaN or Inf never pass*"])


def test_failing_test_keeps_its_own_error_and_metrics(pytester, monkeypatch, recorded):
    result = run(pytester, monkeypatch, fail=1, fail_err=0.9)
    result.assert_outcomes(passed=4, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*AssertionError: lab threshold broken*"])
    result.stdout.no_fnmatch_line("*regressed against baseline*")
    doc = json.loads((pytester.path / "r.json").read_text())["tests"]
    failed = doc["test_lab.py::test_fails_when_asked"]
    assert failed["status"] == "regressed" and failed["metrics"]["max_abs_err"]["value"] == 0.9


def test_run_stopped_by_sigterm_still_records_completed_tests(pytester):
    """`timeout` sends SIGTERM: tests that passed before it still reach the baseline file."""
    pytester.makepyfile(
        """
        import os, signal, time

        def test_a(kvperf):
            kvperf.accuracy("err", 0.5, better="lower")

        def test_b(kvperf):
            kvperf.accuracy("err", 0.25, better="lower")

        def test_c():
            os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` does mid-run
            time.sleep(30)

        def test_d(kvperf):
            kvperf.accuracy("err", 1.0, better="lower")
        """
    )
    result = pytester.runpytest_subprocess("--update-baselines", "--kvperf-json=r.json",
                                           timeout=60)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    (path,) = (pytester.path / "baselines").glob("*.json")
    entries = load(path).entries
    assert sorted(k.split("::")[1] for k in entries) == ["test_a", "test_b"]
    # the test that was running is reported as interrupted, never as passed
    doc = json.loads((pytester.path / "r.json").read_text())["tests"]
    (running,) = (v for k, v in doc.items() if k.endswith("::test_c"))
    assert running["status"] == "interrupted"
    result.stdout.fnmatch_lines(["*verdicts:*1 interrupted*"])
