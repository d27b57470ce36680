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


def test_regression_message_is_short_and_shows_no_plugin_frames(pytester, monkeypatch, recorded):
    result = run(pytester, monkeypatch, "--tb=long", err=0.02)
    result.assert_outcomes(passed=4, failed=1, skipped=1)
    path = baseline_path(pytester)
    result.stdout.fnmatch_lines([
        "*_ test_err _*",
        f"test_lab.py::test_err regressed against baseline {path}:",
        "  max_abs_err 0.01 -> 0.02 (+100.0%) ?accuracy, lower is better; rtol 0.1, atol 1e-12?",
        "if intended: review the change, then rerun with --update-baselines",
    ])
    assert "pytest_kvperf/" not in result.stdout.str()  # no frame of the plugin's code


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
        (
            json.dumps({"schema": SCHEMA, "entries": {"t::a": {"status": "measured", "metrics": {
                "x.cosine_distance": {"value": -0.04, "kind": "accuracy", "better": "lower",
                                      "domain": [0, 2]}}}}}),
            "entries?'t::a'?.metrics?'x.cosine_distance'?.value: -0.04 is outside the metric's "
            "domain ?0, 2?",
        ),
        (
            json.dumps({"schema": SCHEMA, "entries": {"t::a": {"status": "measured", "metrics": {
                "token_match": {"value": 1.04, "kind": "accuracy", "better": "higher",
                                "domain": [0, 1]}}}}}),
            "entries?'t::a'?.metrics?'token_match'?.value: 1.04 is outside the metric's "
            "domain ?0, 1?",
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


def test_update_that_changes_no_number_leaves_the_file_byte_identical(
        pytester, monkeypatch, recorded):
    from pytest_kvperf import baselines

    path = baseline_path(pytester)
    before = path.read_bytes()
    # a later clock: an entry rewritten for nothing would show a new `recorded` time
    monkeypatch.setattr(baselines, "_utc_now", lambda: "2099-01-01T00:00:00+00:00")
    result = run(pytester, monkeypatch, "--update-baselines", "--kvperf-hw=h100")
    result.assert_outcomes(passed=5, skipped=1)
    assert path.read_bytes() == before
    result.stdout.fnmatch_lines(["*cpu.json: unchanged (no number changed)*"])
    # one number changed: only that entry (its value and its time) differs
    run(pytester, monkeypatch, "--update-baselines", "--kvperf-hw=h100", err=0.02)
    old, new = json.loads(before), json.loads(path.read_text())
    assert {k for k in new["entries"] if new["entries"][k] != old["entries"][k]} == {
        "test_lab.py::test_err"}
    assert new["entries"]["test_lab.py::test_err"]["recorded"] == "2099-01-01T00:00:00+00:00"


def test_library_upgrade_is_one_line_of_the_diff(pytester, monkeypatch, recorded):
    import difflib

    from pytest_kvperf import hardware

    path = baseline_path(pytester)
    before = path.read_text()
    real = hardware.package_versions
    monkeypatch.setattr(hardware, "package_versions",
                        lambda: {**real(), "pytest_benchmark": "99.1"})
    result = run(pytester, monkeypatch, "--update-baselines", "--kvperf-hw=h100")
    result.assert_outcomes(passed=5, skipped=1)
    old_version = real()["pytest_benchmark"]
    result.stdout.fnmatch_lines(["*cpu.json: 0 entries written*",
                                 f"*versions: pytest_benchmark {old_version} -> 99.1*"])
    diff = [line for line in difflib.unified_diff(before.splitlines(), path.read_text()
                                                   .splitlines(), n=0, lineterm="")
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert diff == [f'-  "pytest_benchmark": "{old_version}",', '+  "pytest_benchmark": "99.1",']
    assert all(e.versions["pytest_benchmark"] == "99.1" for e in load(path).entries.values())


def test_entry_recorded_with_other_versions_names_only_what_differs(tmp_path):
    from pytest_kvperf import baselines
    from pytest_kvperf.metric import Metric

    def entry(torch):
        return baselines.measured_entry({"e": Metric(1.0, "accuracy", "lower", 0.5, 0.0)},
                                        {"torch": torch, "triton": "3.9.0"})

    path = tmp_path / "gpu.json"
    baselines.apply_updates(path, {"key": "gpu"}, {"t::a": entry("2.13"), "t::b": entry("2.13"),
                                                   "t::c": entry("2.12")})
    data = json.loads(path.read_text())
    assert data["versions"] == {"torch": "2.13", "triton": "3.9.0"}
    assert "versions" not in data["entries"]["t::a"]
    assert data["entries"]["t::c"]["versions"] == {"torch": "2.12"}
    assert load(path).entries["t::c"].versions == {"torch": "2.12", "triton": "3.9.0"}


SCHEMA_1_FILE = {
    "schema": "pytest-kvperf/baselines/1",
    "gpu": {"key": "cpu", "name": "cpu", "sm": "cpu"},
    "entries": {"test_old.py::test_roundtrip": {
        "status": "measured", "recorded": "2026-11-23T13:30:24+00:00",
        "versions": {"torch": "2.13.0+cpu", "pytest_benchmark": "5.2.3"},
        "metrics": {
            "max_abs_err": {"value": 0.01, "kind": "accuracy", "better": "lower", "rtol": 0.05,
                            "atol": 0.0, "unit": ""},
            "cosine": {"value": 0.9997, "kind": "accuracy", "better": "higher", "rtol": 0.05,
                       "atol": 0.0, "unit": ""}}}}}


def test_schema_1_file_is_read_and_its_cosine_becomes_a_removed_metric(pytester):
    from pytest_kvperf.hardware import detect

    if detect().has_gpu:
        pytest.skip("the schema-1 file below is a CPU baseline")
    pytester.makepyfile(test_old="""
        def test_roundtrip(kvperf):
            kvperf.accuracy("max_abs_err", 0.01, better="lower")
            kvperf.accuracy("cosine_distance", 3e-4, better="lower")
    """)
    path = pytester.path / "baselines" / "cpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps(SCHEMA_1_FILE))
    result = pytester.runpytest("-p", "no:cacheprovider", "--kvperf-json=r.json", "-v")
    result.assert_outcomes(passed=1)
    changes = json.loads((pytester.path / "r.json").read_text())["tests"][
        "test_old.py::test_roundtrip"]["changes"]
    assert {c["name"]: c["status"] for c in changes} == {"max_abs_err": "ok",
                                                         "cosine_distance": "new"}
    result = pytester.runpytest("-p", "no:cacheprovider", "--update-baselines")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_roundtrip: cosine_distance new = 0.0003*",
                                 "*test_roundtrip: cosine removed (was 0.9997)*"])
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and "versions" in data
    assert set(data["entries"]["test_old.py::test_roundtrip"]["metrics"]) == {
        "max_abs_err", "cosine_distance"}
