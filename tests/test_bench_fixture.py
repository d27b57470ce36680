"""kv_bench on the CPU: metrics, pytest-benchmark JSON, disabled mode, xdist workers."""

import json

BENCH_TESTS = """
import pytest

def work(n):
    return sum(i * i for i in range(n))

@pytest.mark.parametrize("n", [2000, 4000])
def test_sum(kv_bench, n):
    res = kv_bench(work, n, bytes_moved=8 * n, tokens=n, max_time_s=0.2)
    assert res.value == sum(i * i for i in range(n))  # correctness runs either way
    if res.timing is not None:
        assert res.median_us > 0 and res.gbps > 0
"""


def load_json(pytester, name):
    return json.loads((pytester.path / name).read_text())


def test_records_speed_metrics_and_benchmark_json(pytester):
    pytester.makepyfile(BENCH_TESTS)
    result = pytester.runpytest("--benchmark-json=bench.json", "--kvperf-json=r.json")
    result.assert_outcomes(passed=2)
    bench = load_json(pytester, "bench.json")["benchmarks"]
    assert {b["param"] for b in bench} == {"2000", "4000"}
    for b in bench:
        assert b["extra_info"]["timing_method"] == "host-clock"
        assert b["stats"]["rounds"] >= 10 and b["stats"]["median"] > 0
        assert b["extra_info"]["gbps"] > 0 and b["extra_info"]["tokens_per_s"] > 0
    tests = load_json(pytester, "r.json")["tests"]
    metrics = tests["test_records_speed_metrics_and_benchmark_json.py::test_sum[4000]"]["metrics"]
    assert metrics["median_us"]["kind"] == "speed" and metrics["median_us"]["better"] == "lower"
    assert metrics["gbps"]["better"] == "higher"
    spread = metrics["median_us"]["spread"]
    assert spread["q1"] <= spread["median"] <= spread["q3"] and spread["n"] >= 10
    # the json's median (seconds) is the recorded median (microseconds)
    b4000 = next(b for b in bench if b["param"] == "4000")
    assert abs(b4000["stats"]["median"] * 1e6 - metrics["median_us"]["value"]) < 1e-6 * max(
        1.0, metrics["median_us"]["value"]
    )


def test_disabled_benchmarks_still_check_correctness(pytester):
    pytester.makepyfile(BENCH_TESTS)
    for flags in (["--benchmark-disable"], ["-p", "no:benchmark"]):
        result = pytester.runpytest(*flags, "--kvperf-json=r.json")
        result.assert_outcomes(passed=2)
        tests = load_json(pytester, "r.json")["tests"]
        assert all(not t["metrics"] for t in tests.values()), flags


def test_stored_baseline_keeps_quartiles_not_samples(pytester):
    pytester.makepyfile(BENCH_TESTS)
    pytester.runpytest("--update-baselines").assert_outcomes(passed=2)
    (path,) = (pytester.path / "baselines").glob("*.json")
    entries = json.loads(path.read_text())["entries"]
    spread = next(iter(entries.values()))["metrics"]["median_us"]["spread"]
    assert set(spread) == {"median", "q1", "q3", "n"}
    # an unchanged rerun is judged by the noise-aware verdict, not flagged
    result = pytester.runpytest("--kvperf-json=r.json")
    result.assert_outcomes(passed=2)


def test_xdist_workers_land_in_one_benchmark_json_and_one_update(pytester):
    tests = BENCH_TESTS + "\n".join(
        f"\ndef test_extra_{i}(kv_bench, kvperf):\n    kv_bench(work, 1000, max_time_s=0.05)\n"
        "    kvperf.info('worker', __import__('os').environ['PYTEST_XDIST_WORKER'])\n"
        for i in range(6)
    )
    pytester.makepyfile(tests)
    result = pytester.runpytest_subprocess(
        "-n", "2", "--benchmark-json=bench.json", "--update-baselines", "--kvperf-json=r.json"
    )
    result.assert_outcomes(passed=8)
    bench = load_json(pytester, "bench.json")["benchmarks"]
    assert len(bench) == 8 and len({b["fullname"] for b in bench}) == 8
    (path,) = (pytester.path / "baselines").glob("*.json")
    assert len(json.loads(path.read_text())["entries"]) == 8
    tests = load_json(pytester, "r.json")["tests"].values()
    assert {t["info"].get("method") for t in tests} == {"host-clock"}
    assert {t["info"]["worker"] for t in tests if "worker" in t["info"]} == {"gw0", "gw1"}


def test_autosave_and_compare_use_the_measured_times(pytester):
    pytester.makepyfile(BENCH_TESTS)
    pytester.runpytest("--benchmark-autosave").assert_outcomes(passed=2)
    (saved,) = (pytester.path / ".benchmarks").rglob("*.json")
    assert json.loads(saved.read_text())["benchmarks"][0]["extra_info"]["timing_method"]
    # an absolute 1 s: pytest-benchmark 5.1 parses percentages up to 99 % only
    result = pytester.runpytest("--benchmark-compare", "--benchmark-compare-fail=median:1.0")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_sum*(0001_*", "*test_sum*(NOW)*"])
    assert result.ret == 0
    cli = pytester.run("pytest-benchmark", "compare", str(saved))
    assert cli.ret == 0
    cli.stdout.fnmatch_lines(["*test_sum*"])
