"""pytest -n N: one GPU per worker, and every worker's results reach one baseline update."""

import json

import pytest

pytest.importorskip("xdist")

SHOW_GPU = """
import os

def test_a(kvperf):
    kvperf.info("gpu", os.environ.get("CUDA_VISIBLE_DEVICES"))
    kvperf.info("worker", os.environ["PYTEST_XDIST_WORKER"])
    kvperf.accuracy("err", 0.5, better="lower")

def test_b(kvperf):
    kvperf.info("gpu", os.environ.get("CUDA_VISIBLE_DEVICES"))
    kvperf.info("worker", os.environ["PYTEST_XDIST_WORKER"])
    kvperf.accuracy("err", 0.25, better="lower")
"""


def infos(pytester):
    tests = json.loads((pytester.path / "r.json").read_text())["tests"]
    return {k.split("::")[1]: v["info"] for k, v in tests.items()}


def test_each_worker_pinned_to_its_own_gpu(pytester, monkeypatch):
    # The controller's GPU list comes from CUDA_VISIBLE_DEVICES: no GPU needed to test it.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    pytester.makepyfile(SHOW_GPU)
    pytester.makepyfile(test_more=SHOW_GPU.replace("test_a", "test_c").replace("test_b", "test_d"))
    result = pytester.runpytest_subprocess("-n", "2", "--dist=load", "--kvperf-json=r.json")
    result.assert_outcomes(passed=4)
    seen = {(i["worker"], i["gpu"]) for i in infos(pytester).values()}
    assert seen <= {("gw0", "5"), ("gw1", "7")}
    assert len({gpu for _, gpu in seen}) == len({w for w, _ in seen})


def test_more_workers_than_gpus_is_refused(pytester, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    pytester.makepyfile(SHOW_GPU)
    result = pytester.runpytest_subprocess("-n", "3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*-n 3 starts 3 workers but only 2 GPUs are visible (5,7)*"])


def test_sharing_when_allowed(pytester, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    pytester.makepyfile(SHOW_GPU)
    result = pytester.runpytest_subprocess(
        "-n", "2", "--kvperf-share-gpus", "--kvperf-json=r.json"
    )
    result.assert_outcomes(passed=2)
    assert {i["gpu"] for i in infos(pytester).values()} == {"5"}


def test_all_workers_land_in_one_baseline_update(pytester):
    tests = "\n".join(
        f"def test_{i}(kvperf):\n    kvperf.accuracy('err', {i + 1}.0, better='lower')\n"
        for i in range(12)
    )
    pytester.makepyfile(tests)
    result = pytester.runpytest_subprocess("-n", "2", "--update-baselines")
    result.assert_outcomes(passed=12)
    files = list((pytester.path / "baselines").glob("*.json"))
    assert len(files) == 1
    entries = json.loads(files[0].read_text())["entries"]
    assert {k.split("::")[1]: v["metrics"]["err"]["value"] for k, v in entries.items()} == {
        f"test_{i}": float(i + 1) for i in range(12)
    }
    result.stdout.fnmatch_lines(["*: 12 entries written*"])
