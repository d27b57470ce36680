"""GPU facts from NVML: the throttle window, the unreliable verdict, storage with the
baselines, absent facts with a reason; recorded GPU states come in through the plugin's
pytest_kvperf_gpu_facts_reader hook (the CPU has no NVML)."""

import json
import subprocess
import sys
import types

import pytest

from pytest_kvperf import gpu_facts
from pytest_kvperf.gpu_facts import Sample, Unavailable, open_reader, window
from pytest_kvperf.hardware import detect

COOL = Sample(1980, 3201, ("gpu_idle",), 5_000_000, 7_000_000, 41, 120.0)


def test_window_of_a_cool_gpu_is_not_throttled():
    w = window(COOL, Sample(1980, 3201, (), 5_000_000, 7_000_000, 55, 600.0))
    assert w["throttled"] is False and w["why"] == "" and w["throttle_reasons"] == []
    assert w["power_violation_ns"] == 0 and w["thermal_violation_ns"] == 0
    assert w["start"]["sm_clock_mhz"] == 1980 and w["end"]["power_w"] == 600.0


@pytest.mark.parametrize(
    "end, why",
    [
        (Sample(1410, 3201, ("sw_thermal_slowdown",), 5_000_000, 7_000_000),
         "clocks limited: sw_thermal_slowdown at end"),
        (Sample(1980, 3201, (), 5_000_000, 19_500_000), "thermal limit for 12.5 ms"),
        (Sample(1700, 3201, ("sw_power_cap",), 8_000_000, 7_000_000),
         "clocks limited: sw_power_cap at end; power limit for 3 ms"),
    ],
)
def test_window_names_the_throttling(end, why):
    w = window(COOL, end)
    assert w["throttled"] is True and w["why"] == why


def test_unreadable_counters_do_not_count_as_throttling():
    w = window(Sample(None, None, (), None, None), Sample(None, None, (), None, None))
    assert w["throttled"] is False and w["thermal_violation_ns"] is None
    assert window(None, COOL)["throttled"] is None  # a failed read: unknown, not cool


def test_reason_bits_decode():
    assert gpu_facts.reason_names(0x1 | 0x4 | 0x40) == (
        "gpu_idle", "sw_power_cap", "hw_thermal_slowdown")
    assert gpu_facts.reason_names(0x1000) == ("other_0x1000",)


def _fake_pynvml(unsupported=()):
    """The functions of nvidia-ml-py that NvmlReader calls, with an H200's readings."""

    class NVMLError(Exception):
        pass

    def reading(name, value):
        def fn(handle, *args):
            assert handle == "handle0"
            if name in unsupported:
                raise NVMLError("Not Supported")
            return value(*args) if callable(value) else value
        return fn

    return types.SimpleNamespace(
        NVMLError=NVMLError, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0,
        NVML_PERF_POLICY_POWER=0, NVML_PERF_POLICY_THERMAL=1,
        nvmlSystemGetDriverVersion=lambda: b"570.124.06",
        nvmlDeviceGetName=reading("name", "NVIDIA H200"),
        nvmlDeviceGetEnforcedPowerLimit=reading("limit", 700_000),
        nvmlDeviceGetMaxClockInfo=reading("max", lambda c: {1: 1980, 2: 3201}[c]),
        nvmlDeviceGetClockInfo=reading("clock", lambda c: {1: 1755, 2: 3201}[c]),
        nvmlDeviceGetCurrentClocksEventReasons=reading("reasons", 0x4 | 0x1),
        nvmlDeviceGetViolationStatus=reading(
            "violation", lambda p: types.SimpleNamespace(violationTime=[11, 22][p])),
        nvmlDeviceGetTemperature=reading("temp", lambda s: 63),
        nvmlDeviceGetPowerUsage=reading("power", 512_345),
    )


def test_nvml_reader_reads_what_nvml_reports():
    reader = gpu_facts.NvmlReader(_fake_pynvml(), "handle0")
    assert reader.static() == {"driver": "570.124.06", "name": "NVIDIA H200",
                               "max_sm_clock_mhz": 1980, "max_mem_clock_mhz": 3201,
                               "power_limit_w": 700.0}
    assert reader.sample() == Sample(1755, 3201, ("gpu_idle", "sw_power_cap"), 11, 22, 63,
                                     512.345)


def test_nvml_reader_leaves_unsupported_readings_out():
    reader = gpu_facts.NvmlReader(_fake_pynvml(unsupported={"violation", "power", "max"}),
                                  "handle0")
    sample = reader.sample()
    assert sample.power_violation_ns is None and sample.power_w is None
    assert sample.sm_clock_mhz == 1755
    assert reader.static()["max_sm_clock_mhz"] is None


def test_without_nvidia_ml_py_the_reason_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    reader = open_reader()
    assert reader == Unavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    assert reader.sample() is None and reader.static() == {}


def test_without_a_driver_the_reason_is_nvmls():
    pytest.importorskip("pynvml")
    if detect().has_gpu:
        pytest.skip("this machine has an NVIDIA driver")
    reader = open_reader()
    assert not reader.available and reader.reason.startswith("NVML cannot start: "), reader


# ------------------------------------------------------------ through pytest runs

CONFTEST = """
import os
from pytest_kvperf.gpu_facts import Sample

class RecordedGpu:
    '''A GPU's recorded states: THERMAL_NS_PER_READ > 0 is a GPU that spends that long
    thermally limited between two reads; REASONS the clocks-event reasons it reports.'''
    available = True

    def __init__(self):
        self.reads = 0

    def static(self):
        return {"driver": "570.124.06", "name": "NVIDIA H200", "max_sm_clock_mhz": 1980,
                "max_mem_clock_mhz": 3201, "power_limit_w": 700.0}

    def sample(self):
        self.reads += 1
        thermal = self.reads * int(os.environ.get("THERMAL_NS_PER_READ", "0"))
        reasons = tuple(r for r in os.environ.get("REASONS", "").split(",") if r)
        return Sample(1980, 3201, reasons, 0, thermal, 50, 300.0)

def pytest_kvperf_gpu_facts_reader(config):
    return RecordedGpu() if os.environ.get("RECORDED_GPU") else None
"""

TIMED = """
import os, time

def work():
    if os.environ.get("SLOW"):
        time.sleep(0.002)
    return sum(range(100))

def test_timed(kv_bench):
    assert kv_bench(work, max_time_s=0.05).value == 4950
"""


@pytest.fixture
def project(pytester, monkeypatch):
    for name in ("SLOW", "THERMAL_NS_PER_READ", "REASONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RECORDED_GPU", "1")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TIMED)
    return pytester


# On a GPU machine kv_bench would time this host-only work with CUDA events; these runs
# time it with the host clock instead, in a child that sees no GPU.
ON_GPU = detect().has_gpu


def run(pytester, monkeypatch, *args, **env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ON_GPU:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--kvperf-json=r.json",
                                               *args)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        result = pytester.runpytest("-p", "no:cacheprovider", "--kvperf-json=r.json", *args)
    doc = json.loads((pytester.path / "r.json").read_text())
    (test,) = doc["tests"].values()
    for name in env:
        monkeypatch.delenv(name)
    return result, doc, test


def test_facts_are_stored_with_the_baseline(project, monkeypatch):
    result, doc, test = run(project, monkeypatch, "--update-baselines")
    assert result.ret == 0
    assert doc["gpu_facts"]["available"] and doc["gpu_facts"]["driver"] == "570.124.06"
    (path,) = (project.path / "baselines").glob("*.json")
    stored = json.loads(path.read_text())
    assert stored["versions"]["nvidia_driver"] == "570.124.06"
    (entry,) = stored["entries"].values()
    w = entry["gpu_facts"][""]  # kv_bench's label: none
    assert w["throttled"] is False and w["start"]["sm_clock_mhz"] == 1980
    assert test["gpu_facts"][""] == w


def test_a_confirmed_entry_keeps_its_bytes_whatever_the_clocks(tmp_path):
    """Facts are context: an update with the same numbers on other clocks writes nothing."""
    from pytest_kvperf.baselines import apply_updates, load, measured_entry
    from pytest_kvperf.metric import Metric

    path = tmp_path / "nvidia-h200.json"
    metrics = {"median_us": Metric(12.5, "speed", "lower", 0.05, 0.0, unit="us")}
    first = {"": window(COOL, COOL)}
    apply_updates(path, {"key": "nvidia-h200"}, {"t::x": measured_entry(metrics, {}, first)})
    before = path.read_bytes()
    hot = {"": window(COOL, Sample(1410, 3201, ("hw_slowdown",), 0, 0))}
    update = apply_updates(path, {"key": "nvidia-h200"},
                           {"t::x": measured_entry(metrics, {}, hot)})
    assert not update.written and path.read_bytes() == before
    assert load(path).entries["t::x"].gpu_facts == first
    # a changed number rewrites the entry, with the facts it was measured under
    metrics = {"median_us": Metric(14.0, "speed", "lower", 0.05, 0.0, unit="us")}
    apply_updates(path, {"key": "nvidia-h200"}, {"t::x": measured_entry(metrics, {}, hot)})
    assert load(path).entries["t::x"].gpu_facts[""]["throttle_reasons"] == ["hw_slowdown"]


def test_a_throttled_timing_is_unreliable_not_regressed(project, monkeypatch):
    run(project, monkeypatch, "--update-baselines")
    # the control: the same slow-down on a cool GPU is a regression, and fails under 'fail'
    result, _, test = run(project, monkeypatch, "--kvperf-speed=fail", SLOW="1")
    assert test["status"] == "regressed" and result.ret == pytest.ExitCode.TESTS_FAILED
    for env, why in (({"THERMAL_NS_PER_READ": "4000000"}, "thermal limit for 4 ms"),
                     ({"REASONS": "sw_power_cap"}, "sw_power_cap at start and end")):
        result, _, test = run(project, monkeypatch, "--kvperf-speed=fail", SLOW="1", **env)
        assert result.ret == 0, result.outlines[-15:]  # unreliable never fails
        assert test["status"] == "unreliable"
        speed = [c for c in test["changes"] if c["kind"] == "speed"]
        assert speed and all(c["status"] == "unreliable" for c in speed)
        median = next(c for c in speed if c["name"] == "median_us")
        assert f"GPU throttled during timing (clocks limited: {why}" in median["detail"] \
            or f"GPU throttled during timing ({why}" in median["detail"], median["detail"]
        assert "would be regressed" in median["detail"]
        result.stdout.fnmatch_lines(["*unreliable*test_timed*median_us*GPU throttled*"])


def test_idle_and_other_reasons_are_not_throttling(project, monkeypatch):
    run(project, monkeypatch, "--update-baselines")
    _, _, test = run(project, monkeypatch, REASONS="gpu_idle,applications_clocks_setting")
    assert test["gpu_facts"][""]["throttled"] is False
    # judged as usual (CPU timing noise may make it ok, improved or regressed)
    assert test["status"] in ("ok", "improved", "regressed")
    assert all(c["status"] != "unreliable" for c in test["changes"])


def test_junit_suite_carries_driver_and_clocks(project, monkeypatch):
    import xml.etree.ElementTree as ET

    run(project, monkeypatch, "--junitxml=j.xml")
    suite = ET.parse(project.path / "j.xml").getroot().find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.findall("properties/property")}
    assert props["kvperf_driver"] == "570.124.06"
    assert props["kvperf_max_sm_clock_mhz"] == "1980" and props["kvperf_power_limit_w"] == "700.0"
    assert props["kvperf_sm_clock_mhz_at_start"] == "1980"
    assert props["kvperf_version:nvidia_driver"] == "570.124.06"


def test_no_gpu_means_facts_absent_with_the_reason(project, monkeypatch):
    if detect().has_gpu:
        pytest.skip("needs a machine without a CUDA GPU")
    monkeypatch.delenv("RECORDED_GPU")
    result, doc, test = run(project, monkeypatch, "--update-baselines")
    assert result.ret == 0 and test["status"] == "new"
    assert doc["gpu_facts"] == {"available": False,
                                "reason": f"no CUDA GPU ({detect().why_no_gpu})"}
    assert test["gpu_facts"] is None
    (path,) = (project.path / "baselines").glob("*.json")
    stored = json.loads(path.read_text())
    assert "nvidia_driver" not in stored["versions"]
    assert "gpu_facts" not in next(iter(stored["entries"].values()))


GPU_TIMED = """
import torch

def test_copy(kv_bench):
    x = torch.randn(64 << 20, device="cuda")
    res = kv_bench(torch.clone, x, bytes_moved=2 * x.nbytes, max_time_s=0.5)
    assert torch.equal(res.value, x)
"""


@pytest.mark.gpu
def test_a_real_timing_stores_nvml_facts(pytester):
    """On a GPU: a kv_bench run through the plugin, facts from the real NVML."""
    pytest.importorskip("pynvml")
    pytester.makepyfile(GPU_TIMED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--kvperf-json=r.json",
                                           "--update-baselines", "-s")
    result.assert_outcomes(passed=1)
    doc = json.loads((pytester.path / "r.json").read_text())
    facts = doc["gpu_facts"]
    assert facts["available"] and facts["driver"] and facts["max_sm_clock_mhz"] > 0, facts
    (test,) = doc["tests"].values()
    w = test["gpu_facts"][""]
    assert 0 < w["start"]["sm_clock_mhz"] <= facts["max_sm_clock_mhz"]
    assert 0 < w["end"]["sm_clock_mhz"] <= facts["max_sm_clock_mhz"]
    assert isinstance(w["throttled"], bool)
    (path,) = (pytester.path / "baselines").glob("*.json")
    stored = json.loads(path.read_text())
    assert stored["versions"]["nvidia_driver"] == facts["driver"]
    assert next(iter(stored["entries"].values()))["gpu_facts"][""]["start"] == w["start"]
    # compared with that baseline: unreliable exactly when this timing throttled
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--kvperf-json=r.json")
    (again,) = json.loads((pytester.path / "r.json").read_text())["tests"].values()
    w2 = again["gpu_facts"][""]
    assert (again["status"] == "unreliable") == w2["throttled"], again
    print("\nNVML facts:", json.dumps(facts), "\ntiming window:", json.dumps(w),
          "\nrerun:", again["status"], json.dumps(w2))


@pytest.mark.gpu
def test_real_nvml_matches_nvidia_smi():
    """On a GPU: the driver and maximum SM clock NVML gives us, against nvidia-smi's."""
    import torch

    reader = open_reader(torch.cuda.current_device())
    assert reader.available, reader
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,driver_version,clocks.max.sm", "--format=csv,noheader"],
        capture_output=True, text=True, check=True).stdout.splitlines()
    static = reader.static()
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    (line,) = [row for row in smi if uuid in row]
    _, driver, max_sm = (x.strip() for x in line.split(","))
    assert static["driver"] == driver
    assert f"{static['max_sm_clock_mhz']} MHz" == max_sm
    sample = reader.sample()
    assert 0 < sample.sm_clock_mhz <= static["max_sm_clock_mhz"]
    assert sample.thermal_violation_ns is None or sample.thermal_violation_ns >= 0
