"""pytest -n N: one GPU per worker, and every worker's results reach one baseline update."""

import json
import os
import sys

import pytest

from pytest_kvperf import xdist_gpus

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
    # each worker's own record of what it ran on reaches the controller's results JSON
    workers = json.loads((pytester.path / "r.json").read_text())["workers"]
    assert {w: r["cuda_visible_devices"] for w, r in workers.items()} == {"gw0": "5",
                                                                         "gw1": "7"}
    assert not any(r["shared"] for r in workers.values())
    result.stdout.fnmatch_lines(["xdist workers: gw0 -> 5, gw1 -> 7"])


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
    workers = json.loads((pytester.path / "r.json").read_text())["workers"]
    assert {w: (r["cuda_visible_devices"], r["shared"]) for w, r in workers.items()} == {
        "gw0": ("5", True), "gw1": ("5", True)}


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


SHARED_SPEED = """
def test_timed(kv_bench):
    kv_bench(lambda: sum(range(500)), bytes_moved=4000, max_time_s=0.02)

def test_other(kvperf):
    kvperf.accuracy("err", 0.5, better="lower")
"""


def test_speed_on_shared_gpus_is_informational_only(pytester, monkeypatch):
    """As the README says: under --kvperf-share-gpus a timing is recorded as info, never
    compared or stored; accuracy metrics are compared and stored as usual."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    pytester.makepyfile(SHARED_SPEED)
    result = pytester.runpytest_subprocess("-n", "2", "--kvperf-share-gpus",
                                           "--kvperf-json=r.json", "--update-baselines")
    result.assert_outcomes(passed=2)
    tests = {k.split("::")[1]: v for k, v in
             json.loads((pytester.path / "r.json").read_text())["tests"].items()}
    timed = tests["test_timed"]
    assert timed["metrics"] == {} and timed["status"] == "ran (no metrics)"
    assert timed["info"]["median_us (GPU shared, not compared)"] > 0
    assert timed["info"]["gbps (GPU shared, not compared)"] > 0
    (file,) = (pytester.path / "baselines").glob("*.json")
    entries = json.loads(file.read_text())["entries"]
    assert [k.split("::")[1] for k in entries] == ["test_other"]  # the timing is not stored


# ------------------------------------------------------------------ the plan, unit by unit


@pytest.mark.parametrize("env, gpus", [("0,1", ["0", "1"]), (" 2, 3,,", ["2", "3"]),
                                       ("GPU-aa,GPU-bb", ["GPU-aa", "GPU-bb"]), ("", [])])
def test_the_controller_lists_cuda_visible_devices(monkeypatch, env, gpus):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert xdist_gpus.visible_gpus() == gpus


def _pinned(monkeypatch, plan, worker):
    for name in (xdist_gpus.GPU_LIST_ENV, xdist_gpus.SHARED_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in plan.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # the controller's, inherited
    got = xdist_gpus.pin_this_worker()
    return got, xdist_gpus.gpu_shared()


def test_one_gpu_per_worker_by_uuid(monkeypatch):
    plan = xdist_gpus.plan_for_workers(2, ["GPU-aa", "GPU-bb"], allow_sharing=False)
    assert plan == {xdist_gpus.GPU_LIST_ENV: "GPU-aa,GPU-bb", xdist_gpus.SHARED_ENV: ""}
    for worker, gpu in (("gw0", "GPU-aa"), ("gw1", "GPU-bb")):
        assert _pinned(monkeypatch, plan, worker) == (gpu, False)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == gpu


def test_sharing_is_round_robin_and_said(monkeypatch):
    plan = xdist_gpus.plan_for_workers(3, ["0", "1"], allow_sharing=True)
    assert [_pinned(monkeypatch, plan, w) for w in ("gw0", "gw1", "gw2")] == [
        ("0", True), ("1", True), ("0", True)]
    # allowed but not needed: every worker still has a GPU of its own, speed is compared
    plan = xdist_gpus.plan_for_workers(2, ["0", "1"], allow_sharing=True)
    assert _pinned(monkeypatch, plan, "gw1") == ("1", False)


def test_the_refusal_names_the_gpus_and_the_ways_out():
    with pytest.raises(xdist_gpus.GpuSharingError) as exc:
        xdist_gpus.plan_for_workers(3, ["GPU-aa", "GPU-bb"], allow_sharing=False)
    words = str(exc.value)
    assert "-n 3 starts 3 workers but only 2 GPUs are visible (GPU-aa,GPU-bb)" in words
    assert "Use -n 2, or --kvperf-share-gpus" in words


def test_no_gpu_no_plan_and_no_pin(monkeypatch):
    assert xdist_gpus.plan_for_workers(8, [], allow_sharing=False) == {}
    assert _pinned(monkeypatch, {}, "gw3") == (None, False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert xdist_gpus.pin_this_worker() is None  # the controller, a plain run: no pin
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"


def test_worker_record_without_torch_or_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert xdist_gpus.worker_gpu_record() == {"cuda_visible_devices": "1", "gpu_uuid": None,
                                              "gpu_name": None, "shared": False}
    workers = {"gw10": {"cuda_visible_devices": "3"}, "gw2": {"cuda_visible_devices": None,
                                                              "gpu_uuid": "GPU-x",
                                                              "shared": True}}
    assert xdist_gpus.describe_workers(workers) == "gw2 -> all GPUs (GPU-x) shared, gw10 -> 3"


def test_a_plain_run_has_no_workers(pytester):
    pytester.makepyfile("def test_a(kvperf):\n    kvperf.accuracy('e', 0.1, better='lower')\n")
    pytester.runpytest_inprocess("--kvperf-json=r.json").assert_outcomes(passed=1)
    assert json.loads((pytester.path / "r.json").read_text())["workers"] is None


# ------------------------------------------------------------------ on real GPUs

PROBE = """
import json, os, pathlib
import torch

def test_probe(kvperf):
    props = torch.cuda.get_device_properties(0)
    uuid = str(props.uuid)
    rec = {"worker": os.environ["PYTEST_XDIST_WORKER"], "count": torch.cuda.device_count(),
           "uuid": uuid if uuid.startswith("GPU-") else "GPU-" + uuid,
           "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    x = torch.ones(1 << 20, device="cuda")
    assert int(x.sum()) == 1 << 20  # work really runs on this worker's GPU
    out = pathlib.Path(os.environ["KVPERF_PROBE_DIR"]) / (rec["worker"] + ".json")
    out.write_text(json.dumps(rec))
    kvperf.info("uuid", rec["uuid"])
"""


def _real_uuids() -> list[str]:
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        uuid = str(torch.cuda.get_device_properties(i).uuid)
        out.append(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    return out


def _probe(pytester, monkeypatch, *args):
    """Run the probe once in every worker (--dist each); {worker: its record}."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # all of this machine's GPUs
    probe_dir = pytester.path / "probe"
    probe_dir.mkdir()
    monkeypatch.setenv("KVPERF_PROBE_DIR", str(probe_dir))
    pytester.makepyfile(PROBE)
    result = pytester.runpytest_subprocess("--dist=each", "--kvperf-json=r.json", *args)
    return result, {p.stem: json.loads(p.read_text()) for p in probe_dir.glob("*.json")}


@pytest.mark.multi_gpu(2)
@pytest.mark.gpu
def test_workers_run_on_distinct_gpus(pytester, monkeypatch, kvperf):
    """pytest -n 2 on two real GPUs: from inside each worker, torch sees one GPU, and the
    two workers' GPUs are the machine's two different devices (UUIDs); the controller's
    record of the workers says the same."""
    uuids = _real_uuids()[:2]
    result, seen = _probe(pytester, monkeypatch, "-n", "2")
    result.assert_outcomes(passed=2)
    assert sorted(seen) == ["gw0", "gw1"]
    assert all(r["count"] == 1 for r in seen.values()), seen
    assert seen["gw0"]["uuid"] != seen["gw1"]["uuid"], seen
    assert [seen[w]["uuid"] for w in ("gw0", "gw1")] == uuids  # worker K: the K-th GPU
    workers = json.loads((pytester.path / "r.json").read_text())["workers"]
    assert {w: r["gpu_uuid"] for w, r in workers.items()} == {
        w: r["uuid"] for w, r in seen.items()}
    for w in ("gw0", "gw1"):
        kvperf.info(f"{w}.gpu_uuid", seen[w]["uuid"])
        kvperf.info(f"{w}.cuda_visible_devices", seen[w]["visible"])


@pytest.mark.multi_gpu(2)
@pytest.mark.gpu
def test_more_workers_than_real_gpus(pytester, monkeypatch):
    """One worker more than the GPUs: refused (a usage error naming them); with
    --kvperf-share-gpus the workers share them round-robin and say so."""
    n = len(_real_uuids())
    result, seen = _probe(pytester, monkeypatch, "-n", str(n + 1))
    assert result.ret == pytest.ExitCode.USAGE_ERROR and not seen
    result.stderr.fnmatch_lines([f"*-n {n + 1} starts {n + 1} workers but only {n} GPUs "
                                 "are visible*"])
    (pytester.path / "probe").rmdir()
    result, seen = _probe(pytester, monkeypatch, "-n", str(n + 1), "--kvperf-share-gpus")
    result.assert_outcomes(passed=n + 1)
    assert seen[f"gw{n}"]["uuid"] == seen["gw0"]["uuid"]  # round-robin
    assert len({r["uuid"] for r in seen.values()}) == n
    workers = json.loads((pytester.path / "r.json").read_text())["workers"]
    assert all(r["shared"] for r in workers.values())
