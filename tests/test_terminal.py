"""The terminal summary (no skip listed twice, unambiguous statuses, what -v adds) and the
ini defaults of --kvperf-speed / --kvperf-baselines / --kvperf-report."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TESTS = """
import os, pytest

def test_speed(kvperf):
    kvperf.speed("median_us", float(os.environ.get("KV_US", "100")), better="lower")

def test_steady(kvperf):
    kvperf.accuracy("max_abs_err", 0.01, better="lower")

def test_plain():
    pass

def test_skips():
    pytest.skip("driver too old")
"""


def project_addopts() -> str:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["pytest"]["ini_options"]["addopts"]


def test_project_addopts_list_skips_once():
    opts = project_addopts().split()
    assert "-rfE" in opts  # failures and errors keep pytest's short summary
    assert not any(o.startswith("-r") and ("a" in o or "s" in o) for o in opts)


def test_a_skip_is_listed_once_with_the_project_addopts(pytester):
    pytester.makeini(f"[pytest]\naddopts = {project_addopts()}\n")
    pytester.makepyfile(TESTS)
    result = pytester.runpytest()
    result.assert_outcomes(passed=3, skipped=1)
    out = result.stdout.str()
    assert "SKIPPED [" not in out and "short test summary info" not in out
    assert out.count("driver too old") == 1
    result.stdout.fnmatch_lines(["*skipped, grouped by reason:*", "*1 x *driver too old*"])


def test_ran_without_metrics_is_not_called_passed(pytester):
    pytester.makepyfile(TESTS)
    result = pytester.runpytest("--kvperf-json=r.json", "--kvperf-report=r.html")
    result.assert_outcomes(passed=3, skipped=1)
    result.stdout.fnmatch_lines(["verdicts: 2 new, 1 ran (no metrics), 1 skipped"])
    doc = json.loads((pytester.path / "r.json").read_text())
    plain = doc["tests"]["test_ran_without_metrics_is_not_called_passed.py::test_plain"]
    assert plain["status"] == "ran (no metrics)" and plain["outcome"] == "passed"
    assert "passed" not in doc["summary"]
    page = (pytester.path / "r.html").read_text()
    assert "<tr data-status='ran (no metrics)'>" in page and "data-status='passed'" not in page
    assert "1 ran (no metrics)" in page


def test_summary_lists_not_ok_tests_and_all_with_v(pytester, monkeypatch):
    pytester.makepyfile(TESTS)
    pytester.runpytest("--update-baselines").assert_outcomes(passed=3, skipped=1)
    monkeypatch.setenv("KV_US", "130")
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["*regressed*::test_speed*median_us 100 -> 130*"])
    assert "::test_steady" not in result.stdout.str()  # ok: only counted
    result = pytester.runpytest("-v")
    result.stdout.fnmatch_lines(["*regressed*::test_speed*", "ok *::test_steady *max_abs_err*"])


# ------------------------------------------------------------------ ini defaults


@pytest.fixture
def recorded(pytester):
    pytester.makepyfile(TESTS)
    pytester.runpytest("--update-baselines").assert_outcomes(passed=3, skipped=1)


def test_ini_speed_policy_and_the_option_wins(pytester, monkeypatch, recorded):
    pytester.makeini("[pytest]\nkvperf_speed = fail\n")
    monkeypatch.setenv("KV_US", "130")
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*test_speed regressed against baseline*"])
    pytester.runpytest("--kvperf-speed=warn").assert_outcomes(passed=3, skipped=1)
    pytester.makeini("[pytest]\nkvperf_speed = warn\n")
    pytester.runpytest().assert_outcomes(passed=3, skipped=1)
    result = pytester.runpytest("--kvperf-speed=fail")
    result.assert_outcomes(passed=2, failed=1, skipped=1)


def test_ini_speed_policy_must_be_warn_or_fail(pytester):
    pytester.makeini("[pytest]\nkvperf_speed = loud\n")
    pytester.makepyfile(TESTS)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini option kvperf_speed = 'loud': use one of warn, fail*"])


def test_ini_baseline_folder_and_the_option_wins(pytester, monkeypatch):
    from pytest_kvperf.hardware import detect

    pytester.makeini("[pytest]\nkvperf_baselines = ini-baselines\n")
    pytester.makepyfile(TESTS)
    pytester.runpytest("--update-baselines").assert_outcomes(passed=3, skipped=1)
    name = f"{detect().key}.json"
    assert (pytester.path / "ini-baselines" / name).exists()
    assert not (pytester.path / "baselines").exists()
    result = pytester.runpytest()
    result.stdout.fnmatch_lines([f"*baseline file: *ini-baselines*{name}*", "verdicts: 2 ok*"])
    # relative to the ini file's folder, not to the current directory
    sub = pytester.mkdir("sub")
    monkeypatch.chdir(sub)
    result = pytester.runpytest(str(pytester.path))
    result.stdout.fnmatch_lines(["verdicts: 2 ok*"])
    monkeypatch.chdir(pytester.path)
    result = pytester.runpytest("--kvperf-baselines=cli-baselines", "--update-baselines")
    assert (pytester.path / "cli-baselines" / name).exists()


def test_ini_report_path_and_the_option_wins(pytester):
    pytester.makeini("[pytest]\nkvperf_report = out/ini.html\n")
    pytester.makepyfile(TESTS)
    pytester.runpytest().assert_outcomes(passed=3, skipped=1)
    assert (pytester.path / "out" / "ini.html").exists()
    assert (pytester.path / "out" / "ini.json").exists()
    pytester.runpytest("--kvperf-report=cli.html").assert_outcomes(passed=3, skipped=1)
    assert (pytester.path / "cli.html").exists() and (pytester.path / "cli.json").exists()
