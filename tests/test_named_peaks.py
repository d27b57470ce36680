"""Named peaks (pytest_kvperf.named_peaks): kv_bench divides each transfer by the peak it
names; the link peaks are measured once per machine and cached. On the CPU the peaks come
in as recorded measurements through the pytest_kvperf_named_peaks hook."""

from __future__ import annotations

import json

import pytest

from pytest_kvperf import named_peaks as NP
from pytest_kvperf import report_model
from pytest_kvperf.hardware import detect
from pytest_kvperf.named_peaks import LINK_PEAKS, LinkPeaks, get_link_peaks, load_cached, store

RECORDED = """
def pytest_kvperf_named_peaks(config):
    return {"h2d_pinned": 50.0, "d2h_pinned": 40.0, "device_copy": 4000.0}
"""

TESTS = """
def work(n):
    return sum(range(n))

def test_transfers(kv_bench):
    for peak in ("h2d_pinned", "d2h_pinned", "device_copy", "bidir_pinned"):
        r = kv_bench(work, 2000, bytes_moved=16000, peak=peak, label=peak, max_time_s=0.05)
        assert r.value == sum(range(2000))
    kv_bench(work, 2000, bytes_moved=16000, max_time_s=0.05)  # default: device_copy
"""


# The sessions below are a CPU's, with peaks recorded through the hook. On a GPU machine a
# child session would measure the real peaks (and under xdist want a GPU per worker), so
# there it runs in a subprocess that sees no GPU, as tests/test_gpu_facts.py's run does.
ON_GPU = detect().has_gpu


def _session(pytester, monkeypatch, *args, subprocess=False):
    if ON_GPU:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        return pytester.runpytest_subprocess(*args)
    return (pytester.runpytest_subprocess if subprocess else pytester.runpytest)(*args)


def _run(pytester, monkeypatch, conftest=RECORDED, tests=TESTS):
    pytester.makeconftest(conftest)
    pytester.makepyfile(tests)
    return _session(pytester, monkeypatch, "--kvperf-json=r.json", "--benchmark-json=b.json")


def test_each_transfer_is_divided_by_the_peak_it_names(pytester, monkeypatch):
    _run(pytester, monkeypatch).assert_outcomes(passed=1)
    (t,) = json.loads((pytester.path / "r.json").read_text())["tests"].values()
    m = {k: v["value"] for k, v in t["metrics"].items()}
    for peak, gbps in (("h2d_pinned", 50.0), ("d2h_pinned", 40.0), ("device_copy", 4000.0)):
        assert m[f"{peak}.frac_of_peak_bw"] == pytest.approx(m[f"{peak}.gbps"] / gbps)
    # the default is the device copy, as before named peaks
    assert m["frac_of_peak_bw"] == pytest.approx(m["gbps"] / 4000.0)
    # negative control: an H2D rate read against the device copy would be 80x smaller
    assert m["h2d_pinned.frac_of_peak_bw"] != pytest.approx(m["h2d_pinned.gbps"] / 4000.0)
    # a peak nobody measured gives no fraction (never a fall-back to another peak)
    assert "bidir_pinned.gbps" in m and "bidir_pinned.frac_of_peak_bw" not in m
    info = t["info"]
    assert info["h2d_pinned.peak"] == "h2d_pinned" and info["h2d_pinned.peak_gbps"] == 50.0
    assert info["bidir_pinned.peak"] == "bidir_pinned" and "bidir_pinned.peak_gbps" not in info
    bench = {b["name"]: b for b in json.loads((pytester.path / "b.json").read_text())[
        "benchmarks"]}
    extra = bench["test_transfers[h2d_pinned]"]["extra_info"]
    assert extra["frac_of_peak_bw"] == pytest.approx(extra["gbps"] / 50.0)


SESSION_TESTS = """
def test_h2d(kv_bench):
    kv_bench(lambda: sum(range(2000)), bytes_moved=16000, peak="h2d_pinned", max_time_s=0.02)

def test_others(kv_bench):
    for peak in ("bidir_pinned", "device_copy"):
        kv_bench(lambda: sum(range(2000)), bytes_moved=16000, peak=peak, label=peak,
                 max_time_s=0.02)
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_session_peaks_list_the_link_peaks_its_tests_used(pytester, monkeypatch, workers):
    """The results JSON's peaks record and pytest-benchmark's machine_info name the link
    peaks this session's transfers were divided by: h2d_pinned. Not d2h_pinned (recorded,
    used by no test), not bidir_pinned (used, but nobody measured it), not device_copy (a
    device peak, not a link). Under xdist the workers' tests report them to the controller."""
    pytester.makeconftest(RECORDED)
    pytester.makepyfile(SESSION_TESTS)
    _session(pytester, monkeypatch, "--kvperf-json=r.json", "--benchmark-json=b.json", *workers,
             subprocess=bool(workers)).assert_outcomes(passed=2)  # xdist: its own process
    doc = json.loads((pytester.path / "r.json").read_text())
    assert doc["peaks"] == {"link_gbps": {"h2d_pinned": 50.0}}  # a CPU: no device peaks
    # the same number each test was divided by
    assert doc["tests"]["test_session_peaks_list_the_link_peaks_its_tests_used.py::test_h2d"][
        "info"]["peak_gbps"] == 50.0
    machine = json.loads((pytester.path / "b.json").read_text())["machine_info"]["kvperf"]
    assert machine["peaks"] == doc["peaks"]
    env = dict(report_model.environment(report_model.run_from_results(doc, "r.json")))
    assert env["link peaks"] == "h2d_pinned 50 GB/s" and "measured peaks" not in env


def test_session_without_link_transfers_has_no_link_peaks(pytester, monkeypatch):
    """Negative control: recorded link peaks that no test used are not the session's."""
    _run(pytester, monkeypatch, tests="def test_k(kv_bench):\n"
         "    kv_bench(lambda: 1, bytes_moved=8, max_time_s=0.02)\n").assert_outcomes(passed=1)
    assert json.loads((pytester.path / "r.json").read_text())["peaks"] is None
    machine = json.loads((pytester.path / "b.json").read_text())["machine_info"]["kvperf"]
    assert machine["peaks"] is None


def test_without_recorded_peaks_a_cpu_run_has_no_fractions(pytester, monkeypatch):
    _run(pytester, monkeypatch, conftest="").assert_outcomes(passed=1)
    (t,) = json.loads((pytester.path / "r.json").read_text())["tests"].values()
    assert not [k for k in t["metrics"] if "frac_of_peak" in k]
    assert [k for k in t["metrics"] if k.endswith(".gbps")]  # the rates are there


@pytest.mark.parametrize(
    "conftest, tests, words",
    [
        ("", "def test_x(kv_bench):\n    kv_bench(lambda: 1, peak='h2d')\n",
         "peak must be one of device_copy, h2d_pinned"),
        ("def pytest_kvperf_named_peaks(config):\n    return {'pcie': 50.0}\n",
         "def test_x(kv_bench):\n    kv_bench(lambda: 1, max_time_s=0.02)\n",
         "peak must be one of"),
        ("def pytest_kvperf_named_peaks(config):\n    return {'h2d_pinned': float('nan')}\n",
         "def test_x(kv_bench):\n    kv_bench(lambda: 1, max_time_s=0.02)\n",
         "h2d_pinned must be finite GB/s > 0"),
        ("def pytest_kvperf_named_peaks(config):\n    return [50.0]\n",
         "def test_x(kv_bench):\n    kv_bench(lambda: 1, max_time_s=0.02)\n",
         "must return a dict"),
    ],
    ids=["unknown-name", "unknown-recorded-name", "nan-recorded", "not-a-dict"],
)
def test_bad_peak_names_and_recorded_values_are_clear_errors(pytester, monkeypatch, conftest,
                                                             tests, words):
    result = _run(pytester, monkeypatch, conftest=conftest, tests=tests)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{words}*"])


# ------------------------------------------------------------------ cache of link peaks


def links_of(key, h2d=55.0):
    rates = {"h2d_pinned": h2d, "h2d_pageable": 20.0, "d2h_pinned": 54.0, "bidir_pinned": 90.0}
    return LinkPeaks(gbps=rates, machine=key, measured_at="2026-12-02T00:00:00+00:00")


def test_link_peaks_measured_once_per_machine_then_reused(tmp_path, monkeypatch):
    """Cache logic with the GPU part substituted (a CPU has no link): measure, memoise,
    reload in a new process, refresh, and a second host measures its own."""
    measured = []

    def fake_measure(torch, index, key):
        measured.append(key)
        return links_of(key, h2d=55.0 + len(measured))

    monkeypatch.setattr(NP, "_MEMO", {})
    monkeypatch.setattr(NP, "measure_links", fake_measure)
    monkeypatch.setattr("pytest_kvperf.peaks._resolve_gpu", lambda d: (None, 0, "NVIDIA H200"))
    monkeypatch.setattr(NP.socket, "gethostname", lambda: "host-a")
    path = tmp_path / "host_links.json"
    first = get_link_peaks(cache_path=path)
    assert measured == ["NVIDIA H200 @ host-a"] and first.gbps["h2d_pinned"] == 56.0
    assert get_link_peaks(cache_path=path) is first  # memo
    monkeypatch.setattr(NP, "_MEMO", {})  # a new process reads the file
    assert get_link_peaks(cache_path=path) == first and len(measured) == 1
    assert get_link_peaks(cache_path=path, refresh=True).gbps["h2d_pinned"] == 57.0
    monkeypatch.setattr(NP.socket, "gethostname", lambda: "host-b")  # another machine
    get_link_peaks(cache_path=path)
    assert measured[-1] == "NVIDIA H200 @ host-b"
    data = json.loads(path.read_text())
    assert set(data["machines"]) == {"NVIDIA H200 @ host-a", "NVIDIA H200 @ host-b"}


@pytest.mark.parametrize(
    "text",
    ["{oops", '{"format": 9, "machines": {}}',
     json.dumps({"format": 1, "machines": {"G @ h": {"machine": "G @ h",
                                                     "gbps": {"h2d_pinned": 50.0}}}}),
     json.dumps({"format": 1, "machines": {"G @ h": {"machine": "G @ h", "gbps": {
         **{n: 50.0 for n in LINK_PEAKS}, "h2d_pageable": -1.0}}}})],
)
def test_unusable_link_cache_is_ignored(tmp_path, text):
    path = tmp_path / "host_links.json"
    path.write_text(text)
    assert load_cached(path, "G @ h") is None
    store(path, links_of("G @ h"))
    assert load_cached(path, "G @ h") == links_of("G @ h")


def test_no_link_peaks_on_the_cpu():
    torch = pytest.importorskip("torch")
    assert get_link_peaks("cpu") is None
    if not torch.cuda.is_available():
        assert get_link_peaks() is None


@pytest.mark.gpu
def test_gpu_link_peaks_are_plausible(tmp_path, monkeypatch):
    monkeypatch.setattr(NP, "_MEMO", {})
    links = get_link_peaks(cache_path=tmp_path / "l.json", refresh=True)
    g = links.gbps
    # PCIe Gen3 x16 (~12 GB/s) .. NVLink-C2C (450 GB/s per direction) bound every link
    assert all(5.0 < g[n] < 500.0 for n in LINK_PEAKS), g
    # pinned is DMA straight from host memory; pageable is staged through a pinned buffer
    assert g["h2d_pinned"] > g["h2d_pageable"], g
    # the link is full duplex: both directions at once beat either alone
    assert g["bidir_pinned"] > 1.2 * max(g["h2d_pinned"], g["d2h_pinned"]), g
    assert load_cached(tmp_path / "l.json", links.machine) == links


GPU_SESSION_TESTS = """
import torch

def test_h2d(kv_bench):
    host = torch.ones(1 << 22, pin_memory=True)
    dev = torch.empty(1 << 22, device="cuda")
    kv_bench(lambda: dev.copy_(host, non_blocking=True), bytes_moved=16 << 20,
             peak="h2d_pinned", max_time_s=0.2)
"""


@pytest.mark.gpu
def test_gpu_session_peaks_carry_the_measured_link_peak(pytester):
    """On a GPU (no recorded peaks): the session's peaks record holds the device peaks and
    the link peak its transfer was divided by, the value get_link_peaks measured."""
    pytester.makepyfile(GPU_SESSION_TESTS)
    pytester.runpytest("-p", "no:cacheprovider", "--kvperf-json=r.json",
                       "--benchmark-json=b.json").assert_outcomes(passed=1)
    doc = json.loads((pytester.path / "r.json").read_text())
    links = get_link_peaks()  # memoised by the run above: the session's own numbers
    assert doc["peaks"]["link_gbps"] == {"h2d_pinned": links.gbps["h2d_pinned"]}
    assert doc["peaks"]["copy_gbps"] > 2 * links.gbps["h2d_pinned"]  # HBM beats any host link
    (t,) = doc["tests"].values()
    assert t["info"]["peak_gbps"] == round(links.gbps["h2d_pinned"], 1)
    machine = json.loads((pytester.path / "b.json").read_text())["machine_info"]["kvperf"]
    assert machine["peaks"] == doc["peaks"]


# ------------------------------------------------------------------ GPU to GPU: `peer`

PEER_TESTS = """
def test_peer(kv_bench):
    kv_bench(lambda: sum(range(2000)), bytes_moved=16000, peak="peer", max_time_s=0.02)
"""


def test_a_peer_transfer_is_divided_by_the_peer_peak(pytester, monkeypatch):
    pytester.makeconftest("def pytest_kvperf_named_peaks(config):\n"
                          "    return {'peer': 300.0, 'h2d_pinned': 50.0}\n")
    pytester.makepyfile(PEER_TESTS)
    _session(pytester, monkeypatch, "--kvperf-json=r.json").assert_outcomes(passed=1)
    doc = json.loads((pytester.path / "r.json").read_text())
    (t,) = doc["tests"].values()
    m = {k: v["value"] for k, v in t["metrics"].items()}
    assert m["frac_of_peak_bw"] == pytest.approx(m["gbps"] / 300.0)
    assert m["frac_of_peak_bw"] != pytest.approx(m["gbps"] / 50.0)  # not another link's
    assert t["info"]["peak"] == "peer" and t["info"]["peak_gbps"] == 300.0
    assert "peak_absent" not in t["info"]
    assert doc["peaks"] == {"link_gbps": {"peer": 300.0}}


@pytest.mark.parametrize("conftest, why", [
    ("def pytest_kvperf_named_peaks(config):\n    return {'h2d_pinned': 50.0}\n",
     "peer is not among the recorded peaks (h2d_pinned)"),
    ("", "timed by the host clock: a GPU's peak does not divide it"),
], ids=["not-recorded", "host-clock"])
def test_without_a_peer_peak_the_fraction_is_absent_with_its_reason(pytester, monkeypatch,
                                                                    conftest, why):
    pytester.makeconftest(conftest)
    pytester.makepyfile(PEER_TESTS)
    _session(pytester, monkeypatch, "--kvperf-json=r.json").assert_outcomes(passed=1)
    (t,) = json.loads((pytester.path / "r.json").read_text())["tests"].values()
    assert "gbps" in t["metrics"] and "frac_of_peak_bw" not in t["metrics"]
    assert t["info"]["peak_absent"] == why and "peak_gbps" not in t["info"]


class _Cuda:
    def __init__(self, count):
        self.count = count

    def is_available(self):
        return self.count > 0

    def device_count(self):
        return self.count


@pytest.mark.parametrize("count", [0, 1])
def test_peer_peak_needs_two_gpus(monkeypatch, count):
    """One GPU (or an xdist worker's one visible GPU): not measurable, and said so; the
    resolver gives the same reason to kv_bench for a device-timed transfer."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch, "cuda", _Cuda(count))
    monkeypatch.setattr(NP, "measure_peer", lambda *a: pytest.fail("measured on one GPU"))
    why = f"needs 2 CUDA GPUs (a GPU-to-GPU copy); found {count}"
    assert NP.get_peer_peaks() == (None, why)

    class Config:
        class hook:
            @staticmethod
            def pytest_kvperf_named_peaks(config):
                return None

    resolver = NP.Resolver(Config, lambda: None)
    assert resolver.lookup("peer", device_timed=True) == (None, why)
    assert resolver.gbps("peer", device_timed=True) is None


def peers_of(key, gbps=380.0):
    return LinkPeaks(gbps={"peer": gbps}, machine=key, measured_at="2026-12-09T00:00:00+00:00",
                     notes=("cuda:0 -> cuda:1", "peer access on"))


def test_peer_peak_measured_once_per_gpu_pair_then_reused(tmp_path, monkeypatch):
    """Cached per pair (UUIDs in the key) beside the host links, neither section lost when
    the other is written; a new process reads it, refresh measures again."""
    measured = []
    pair = {"key": "NVIDIA H200 GPU-a -> NVIDIA H200 GPU-b @ host-a"}

    def fake_measure(torch, key):
        measured.append(key)
        return peers_of(key, 380.0 + len(measured))

    monkeypatch.setattr(NP, "_MEMO", {})
    monkeypatch.setattr(NP, "_peer_devices", lambda: (object(), pair["key"]))
    monkeypatch.setattr(NP, "measure_peer", fake_measure)
    path = tmp_path / "host_links.json"
    store(path, links_of("NVIDIA H200 @ host-a"))
    first, why = NP.get_peer_peaks(cache_path=path)
    assert why is None and first.gbps == {"peer": 381.0} and measured == [pair["key"]]
    assert NP.get_peer_peaks(cache_path=path)[0] is first  # memo
    monkeypatch.setattr(NP, "_MEMO", {})  # a new process reads the file
    assert NP.get_peer_peaks(cache_path=path)[0] == first and len(measured) == 1
    store(path, links_of("NVIDIA H200 @ host-b"))  # a host-link write keeps the pair
    assert load_cached(path, pair["key"], section="peers") == first
    assert load_cached(path, "NVIDIA H200 @ host-a") == links_of("NVIDIA H200 @ host-a")
    assert NP.get_peer_peaks(cache_path=path, refresh=True)[0].gbps == {"peer": 382.0}
    pair["key"] = "NVIDIA H200 GPU-c -> NVIDIA H200 GPU-d @ host-a"  # another pair
    NP.get_peer_peaks(cache_path=path)
    assert measured[-1] == pair["key"]
    data = json.loads(path.read_text())
    assert len(data["peers"]) == 2 and len(data["machines"]) == 2
    # a pair's entry is no host-link entry and the other way round
    assert load_cached(path, pair["key"]) is None
    assert load_cached(path, "NVIDIA H200 @ host-a", section="peers") is None


@pytest.mark.multi_gpu(2)
@pytest.mark.gpu
def test_gpu_peer_peak_is_plausible(tmp_path, monkeypatch):
    monkeypatch.setattr(NP, "_MEMO", {})
    peers, why = NP.get_peer_peaks(cache_path=tmp_path / "l.json", refresh=True)
    assert why is None, why
    # PCIe Gen3 peer to peer (~10 GB/s) .. NVLink 5 (900 GB/s per direction)
    assert 5.0 < peers.gbps["peer"] < 1000.0, peers
    assert "cuda:0 -> cuda:1" in peers.notes and " -> " in peers.machine
    assert load_cached(tmp_path / "l.json", peers.machine, section="peers") == peers
