"""pytest-benchmark's options for kv_bench tests: --benchmark-only / --benchmark-skip select
them as benchmarks (no lost coverage), autosaves are kept apart per GPU, the histogram extra."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("ok", "regressed", "improved")

TESTS = """
def work(n):
    return sum(i * i for i in range(n))

def test_timed(kv_bench):
    assert kv_bench(work, 2000, max_time_s=0.1).value == work(2000)

def test_accuracy(kvperf):
    kvperf.accuracy("max_abs_err", 0.01, better="lower")

def test_plain():
    pass
"""


@pytest.fixture
def recorded(pytester):
    pytester.makepyfile(TESTS)
    pytester.runpytest("--update-baselines").assert_outcomes(passed=3)
    return pytester


def statuses(pytester):
    doc = json.loads((pytester.path / "r.json").read_text())["tests"]
    return {k.split("::")[1]: (v["outcome"], v["status"], v["skip_reason"]) for k, v in doc.items()}


def test_benchmark_only_runs_kv_bench_tests_and_skips_the_others(recorded):
    result = recorded.runpytest("--benchmark-only", "--kvperf-json=r.json")
    result.assert_outcomes(passed=1, skipped=2)
    only = "Skipping non-benchmark (--benchmark-only active)."
    got = statuses(recorded)
    assert got.pop("test_timed")[:2] in {("passed", s) for s in COMPARED}  # CPU timing: noisy
    assert got == {
        "test_accuracy": ("skipped", "skipped", only),  # measured before: not lost coverage
        "test_plain": ("skipped", "skipped", only),
    }
    assert "lost coverage" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*2 x (not hardware) Skipping non-benchmark*"])


def test_benchmark_skip_skips_kv_bench_tests(recorded):
    result = recorded.runpytest("--benchmark-skip", "--kvperf-json=r.json")
    result.assert_outcomes(passed=2, skipped=1)
    assert statuses(recorded)["test_timed"] == (
        "skipped", "skipped", "Skipping benchmark (--benchmark-skip active)."
    )
    assert "lost coverage" not in result.stdout.str()
    # and the skip is no reason to touch the test's baseline entry
    recorded.runpytest("--benchmark-skip", "--update-baselines").assert_outcomes(
        passed=2, skipped=1
    )
    recorded.runpytest("--kvperf-json=r.json")
    assert statuses(recorded)["test_timed"][1] in COMPARED  # the entry is still there


def test_a_skip_without_the_options_is_still_lost_coverage(recorded):
    recorded.makepyfile(TESTS.replace("def test_timed(kv_bench):",
                                      "def test_timed(kv_bench):\n    import pytest; "
                                      "pytest.skip('driver too old')"))
    result = recorded.runpytest("--kvperf-json=r.json")
    assert statuses(recorded)["test_timed"][1] == "lost coverage"
    result.stdout.fnmatch_lines(["*lost coverage: 1 tests*"])


def test_autosaves_are_kept_apart_per_gpu(pytester):
    import pytest_benchmark.session as bench_session
    from pytest_benchmark.utils import get_machine_id

    from pytest_kvperf.hardware import detect

    before = bench_session.get_machine_id
    pytester.makepyfile(TESTS)
    pytester.runpytest("--benchmark-autosave").assert_outcomes(passed=3)
    assert bench_session.get_machine_id is before  # put back at the end of the run
    (saved,) = (pytester.path / ".benchmarks").rglob("*.json")
    assert saved.parent.name == f"{get_machine_id()}-{detect().key}"
    # another GPU's later run in the same .benchmarks/: never the one compared with
    other = pytester.path / ".benchmarks" / f"{get_machine_id()}-nvidia-b200"
    other.mkdir()
    shutil.copy(saved, other / "0007_b200run.json")
    result = pytester.runpytest("--benchmark-compare")
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    assert "0001_" in out and "0007_b200run" not in out


def test_histogram_extra():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["histogram"] == ["pytest-benchmark[histogram]>=5.1,<5.4"]
    assert extras["histogram"][0] in extras["test"]  # so CI draws one (next test)


def test_histogram_of_kv_bench_tests(pytester):
    # pygal found, not imported, and the run in a child: once pygal is imported under
    # pytester, its module restore leaves importlib.metadata finding no distributions, and
    # the later pytester runs start without their entry-point plugins (kvperf among them)
    if importlib.util.find_spec("pygal") is None:
        pytest.skip("could not import 'pygal': not installed (the histogram extra's)")
    pytester.makepyfile(TESTS)
    pytester.runpytest_subprocess("--benchmark-histogram=h").assert_outcomes(passed=3)
    assert list(pytester.path.glob("h*.svg"))
