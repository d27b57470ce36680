"""The two-GPU evidence scripts on recorded runs (a CPU has no two GPUs to run them on):
tests/evidence/xdist_walls.py, the checks of a -n 1 / -n 2 pair (each shown to fail on its
own), and tests/evidence/two_gpu_table.py, the note's worker GPUs and transfer table."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest


def _script(name: str):
    path = Path(__file__).parent / "evidence" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kvperf_evidence_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


xw = _script("xdist_walls")
table = _script("two_gpu_table")

IDS = [f"suites/x/test_q.py::test_speed[{i}]" for i in range(3)] + [
    "suites/x/test_q.py::test_speed[a b]"]  # a parameter id with a space


def speed_change(status="ok"):
    return {"name": "median_us", "kind": "speed", "status": status, "base": 10.0,
            "value": 10.1}


def results(workers=None, changes=True, outcome="passed"):
    metric = {"median_us": {"value": 10.1, "kind": "speed"}}
    return {"hardware": {"key": "nvidia-h200"}, "workers": workers,
            "tests": {i: {"outcome": outcome, "metrics": metric,
                          "changes": [speed_change()] if changes else []} for i in IDS}}


WORKERS = {"gw0": {"cuda_visible_devices": "0", "gpu_uuid": "GPU-a", "gpu_name": "H200",
                   "shared": False},
           "gw1": {"cuda_visible_devices": "1", "gpu_uuid": "GPU-b", "gpu_name": "H200",
                   "shared": False}}
LOG2 = "\n".join(f"[gw{k % 2}] [ {25 * (k + 1)}%] PASSED {i} " for k, i in enumerate(IDS)) + (
    "\nbaselines updated (old -> new):\n  /tmp/b/nvidia-h200.json: 4 entries written\n")


def pair(wall1=100.0, wall2=50.0):
    bench = [{"fullname": i} for i in IDS]
    serial = xw.Run("-n 1", results({"gw0": WORKERS["gw0"]}, changes=False), bench, "",
                    wall1, 0)
    parallel = xw.Run("-n 2", results(copy.deepcopy(WORKERS)), list(bench), LOG2, wall2, 0)
    written = {"entries": {i: {"metrics": {"median_us": {"value": 10.1}}} for i in IDS}}
    return serial, parallel, written


def test_a_good_pair_holds():
    facts, problems = xw.check(*pair())
    assert problems == []
    assert facts["speedup"] == 2.0 and facts["measured"] == 4
    assert facts["speed_verdicts_per_worker"] == {"gw0": {"ok": 2}, "gw1": {"ok": 2}}
    assert facts["workers"]["gw1"]["gpu_uuid"] == "GPU-b"


def _broken(how):
    serial, parallel, written = pair()
    how(serial, parallel, written)
    return xw.check(serial, parallel, written)[1]


@pytest.mark.parametrize("how, words", [
    (lambda s, p, w: setattr(p, "wall_s", 60.0), "1.67x faster .* the goal is >= 1.8x"),
    (lambda s, p, w: p.results["workers"]["gw1"].update(gpu_uuid="GPU-a"),
     "two workers on two distinct GPUs"),
    (lambda s, p, w: p.results["workers"].pop("gw1"), "two workers on two distinct GPUs"),
    (lambda s, p, w: p.benchmarks.pop(), "benchmark JSON differs: 1 missing"),
    (lambda s, p, w: w["entries"].pop(IDS[2]), "1 measured tests not written"),
    (lambda s, p, w: w["entries"][IDS[1]]["metrics"]["median_us"].update(value=9.0),
     "1 measured tests not written"),
    (lambda s, p, w: setattr(p, "log", LOG2 + "  /tmp/b/nvidia-h200.json: unchanged\n"),
     "wanted one baseline update, the log has 2"),
    (lambda s, p, w: p.tests[IDS[0]]["changes"][0].update(status="regressed"),
     "1 speed metrics beyond the noise"),
    (lambda s, p, w: p.tests.pop(IDS[3]), "1 tests lost"),
    (lambda s, p, w: p.tests[IDS[3]].update(outcome="interrupted"),
     "1 tests failed or did not finish"),
    (lambda s, p, w: setattr(p, "log", "\n".join(LOG2.splitlines()[2:])),
     "speed verdicts from workers .* run with -v"),
    (lambda s, p, w: p.results["workers"]["gw0"].update(shared=True), "GPUs shared"),
], ids=["speedup", "same-uuid", "one-worker", "benchmark-lost", "entry-lost",
        "entry-stale", "two-writes", "speed-off", "test-lost", "interrupted", "no-v",
        "shared"])
def test_each_check_can_fail(how, words):
    problems = _broken(how)
    assert any(re.search(words, p) for p in problems), problems


def test_unreliable_speed_is_listed_not_counted_against():
    serial, parallel, written = pair()
    parallel.tests[IDS[0]]["changes"][0]["status"] = "unreliable"
    facts, problems = xw.check(serial, parallel, written)
    assert problems == [] and facts["speed_verdicts_per_worker"]["gw0"] == {
        "unreliable": 1, "ok": 1}


def test_the_script_reads_gpu_suite_folders(tmp_path, capsys):
    serial, parallel, written = pair()
    for run, d in ((serial, tmp_path / "n1"), (parallel, tmp_path / "n2")):
        d.mkdir()
        (d / "results.json").write_text(json.dumps(run.results))
        (d / "benchmark.json").write_text(json.dumps({"benchmarks": run.benchmarks}))
        (d / "pytest.log").write_text(run.log)
        (d / "wall").write_text(f"1000.0 {1000.0 + run.wall_s} 0\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "nvidia-h200.json").write_text(json.dumps(written))
    out = tmp_path / "walls.json"
    args = [str(tmp_path / "n1"), str(tmp_path / "n2"), "--baselines", str(tmp_path / "b"),
            "--out", str(out)]
    assert xw.main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["facts"]["walls_s"] == {"-n 1": 100.0, "-n 2": 50.0}
    assert "gw1: CUDA_VISIBLE_DEVICES=1 GPU-b H200" in capsys.readouterr().out
    (tmp_path / "n2" / "wall").unlink()  # a run without its wall is no evidence
    assert xw.main(args) == 1
    assert "no wall file" in json.loads(out.read_text())["problems"][0]


def test_the_table_lists_worker_gpus_and_transfers(tmp_path, capsys):
    def metrics(prefix, us, gbps, frac=None):
        out = {f"{prefix}median_us": {"value": us}, f"{prefix}gbps": {"value": gbps}}
        if frac is not None:
            out[f"{prefix}frac_of_peak_bw"] = {"value": frac}
        return out

    doc = {"peaks": {"link_gbps": {"peer": 391.24}}, "tests": {
        table.PROBE: {"info": {"gw0.gpu_uuid": "GPU-a", "gw0.cuda_visible_devices": "0",
                               "gw1.gpu_uuid": "GPU-b", "gw1.cuda_visible_devices": "1"}},
        table.TRANSFERS + "test_peer_copy_speed[4K]": {"metrics": {
            **metrics("staged.", 100.0, 335.5, 0.858), **metrics("per_page.", 9e4, 0.37)}},
        table.TRANSFERS + "test_peer_peak_is_measured_between_the_gpus": {
            "metrics": metrics("", 170.0, 390.0, 0.997)},
        "suites/other/test_x.py::test_y": {"metrics": metrics("", 1.0, 2.0)}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert table.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "gw0: CUDA_VISIBLE_DEVICES=0 GPU-a" in out and "gw1: CUDA_VISIBLE_DEVICES=1 GPU-b" in out
    assert "peer peak (cuda:0 -> cuda:1): 391.2 GB/s" in out
    assert "| test_peer_copy_speed[4K] | staged | 100.0 | 335.5 | 0.86 |" in out
    assert "| test_peer_copy_speed[4K] | per_page | 90000.0 | 0.4 |  |" in out
    assert "| test_peer_peak_is_measured_between_the_gpus | copy | 170.0 | 390.0 | 1.00 |" in out
    assert "test_y" not in out
    path.write_text(json.dumps({"tests": {}}))  # nothing to show: said, exit 1
    assert table.main([str(path)]) == 1
    assert "(the probe did not run)" in capsys.readouterr().out
