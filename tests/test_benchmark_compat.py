"""pytest-benchmark's private API, as kv_bench uses it (pytest_kvperf/benchmark_compat.py):
fails loudly on a release that changed it, and the dependency's bound is the tested one."""

import importlib.metadata
import json
import pathlib
import types

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from pytest_kvperf import benchmark_compat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_installed_release_has_the_private_api_kv_bench_uses():
    version = importlib.metadata.version("pytest-benchmark")
    problems = benchmark_compat.problems()
    assert problems == [], (
        f"pytest-benchmark {version} changed the private API kv_bench uses: {problems}; "
        "adapt pytest_kvperf/benchmark_compat.py, then move the bound in pyproject.toml")


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_dependency_is_bounded_to_the_tested_releases_and_installed_within():
    deps = [Requirement(d) for d in _pyproject()["dependencies"]]
    (bench,) = [d for d in deps if d.name == "pytest-benchmark"]
    assert str(bench.specifier) == ",".join(sorted(benchmark_compat.TESTED.split(",")))
    assert any(s.operator == "<" for s in bench.specifier), "no upper bound"
    # what CI installed is inside the bound, so CI tests the bound (its newest release)
    installed = Version(importlib.metadata.version("pytest-benchmark"))
    assert bench.specifier.contains(installed), (installed, bench.specifier)
    assert not bench.specifier.contains(Version("6.0")), "an untested major release allowed"


def test_extras_report_and_lint_apart():
    # the --kvperf-report page draws inline SVG: no plotting library anywhere; `report` is
    # pytest-html, for kvperf's columns in its --html report
    extras = _pyproject()["optional-dependencies"]
    assert extras["report"] == ["pytest-html>=4"] and extras["lint"] == ["ruff"]
    names = {Requirement(d).name for d in extras["test"]}
    assert "matplotlib" not in names and "ruff" not in names


def _module(**attrs):
    return types.SimpleNamespace(**attrs)


def test_a_release_without_that_api_is_named_part_by_part():
    """Negative control: stand-in modules as an incompatible release would have them."""
    class BenchmarkSession:
        def __init__(self, config):
            self.only = self.skip = False  # no disabled, benchmarks, machine_id

    class Metadata:
        def __init__(self, fixture, rounds, options):
            self.name = fixture.name
            self.timer = fixture.timer  # a field the stand-in fixture lacks

    def pytest_configure(config):
        config.benchmark_session = BenchmarkSession(config)

    def pytest_collection_modifyitems(config, items):
        pass

    problems = benchmark_compat.problems(
        _module(pytest_configure=pytest_configure,
                pytest_collection_modifyitems=pytest_collection_modifyitems),
        _module(BenchmarkSession=BenchmarkSession),
        _module(Metadata=Metadata))
    text = "\n".join(problems)
    for expected in ("no longer sets config._benchmarksession",
                     "no longer skips with 'Skipping benchmark (--benchmark-skip active).'",
                     "has no attribute 'disabled'", "has no attribute 'benchmarks'",
                     "no longer reads the module's get_machine_id()",
                     "takes ['fixture', 'rounds', 'options']", "reads fixture.timer",
                     "has no update(duration)"):
        assert expected in text, (expected, problems)
    assert benchmark_compat.problems(_module(), _module(), _module()) != []


def test_plugin_refuses_an_incompatible_release(pytester, monkeypatch):
    monkeypatch.setattr(benchmark_compat, "problems", lambda: ["Metadata is gone"])
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-kvperf cannot use pytest-benchmark *(tested: "
                                 "pytest-benchmark>=5.1,<5.4): Metadata is gone*"])
    # without pytest-benchmark nothing of it is used: the run goes on
    pytester.runpytest_inprocess("-p", "no:benchmark").assert_outcomes(passed=1)


def test_kv_bench_reaches_pytest_benchmark_json_through_the_private_api(pytester):
    pytester.makepyfile(
        "def test_timed(kv_bench):\n"
        "    kv_bench(sum, range(1000), max_time_s=0.05)\n")
    pytester.runpytest("--benchmark-json=b.json", "--kvperf-json=r.json").assert_outcomes(
        passed=1)
    doc = json.loads((pytester.path / "b.json").read_text())
    (bench,) = doc["benchmarks"]
    assert bench["fullname"].endswith(".py::test_timed")
    stats = bench["stats"]
    # pytest-benchmark computed its statistics from our samples: the median kvperf stored
    (result,) = json.loads((pytester.path / "r.json").read_text())["tests"].values()
    median_us = result["metrics"]["median_us"]["value"]
    assert stats["median"] == pytest.approx(median_us * 1e-6, rel=1e-9)
    assert 0 < stats["min"] <= stats["median"] <= stats["max"] and stats["rounds"] >= 5
    assert doc["machine_info"]["kvperf"]["gpu"]["key"]
    assert "available" in doc["machine_info"]["kvperf"]["gpu_facts"]  # NVML's, or why not
