"""Derived metrics (pytest_kvperf.derived) and the peak measurements they divide by
(pytest_kvperf.peaks: cache file, once-per-process reuse, GPU measurement)."""

from __future__ import annotations

import json
import math
import time

import pytest

from pytest_kvperf import peaks as P
from pytest_kvperf.derived import Derived, derive, gbps, tflops, tokens_per_s
from pytest_kvperf.peaks import Peaks, get_peaks, load_cached, store
from pytest_kvperf.timing import measure

H100 = "NVIDIA H100 80GB HBM3"


def peaks_of(name=H100, copy=3000.0, flops=750.0) -> Peaks:
    return Peaks(copy_gbps=copy, bf16_tflops=flops, gpu_name=name,
                 measured_at="2026-01-01T00:00:00+00:00")


# ----------------------------------------------------------------- units


def test_units_are_decimal_rates_per_second():
    assert gbps(3e9, 1e6) == pytest.approx(3.0)  # 3 GB in 1 s
    assert gbps(60e6, 20.0) == pytest.approx(3000.0)  # 60 MB in 20 us = 3 TB/s
    assert tflops(2 * 8192**3, 1500.0) == pytest.approx(2 * 8192**3 / 1.5e-3 / 1e12)
    assert tokens_per_s(128, 64.0) == pytest.approx(2e6)


def test_derive_from_a_timing_with_peaks():
    t = measure(lambda: time.sleep(0.001), device="cpu", max_time_s=0.2)
    d = derive(t, bytes_moved=4e6, flops=2e9, tokens=16, peaks=peaks_of())
    assert d.time_us == t.median_us
    assert d.gbps == pytest.approx(4e6 / (t.median_us * 1e-6) / 1e9)
    assert d.frac_of_peak_bw == pytest.approx(d.gbps / 3000.0)
    assert d.tflops == pytest.approx(2e9 / (t.median_us * 1e-6) / 1e12)
    assert d.frac_of_peak_flops == pytest.approx(d.tflops / 750.0)
    assert d.tokens_per_s == pytest.approx(16 / (t.median_us * 1e-6))
    assert all(math.isfinite(v) and v > 0 for v in d.as_dict().values())


def test_without_peaks_or_declared_amounts_the_metrics_stay_none():
    d = derive(250.0, bytes_moved=1e6)
    assert d.frac_of_peak_bw is None and d.tflops is None and d.tokens_per_s is None
    assert d.as_dict() == {"time_us": 250.0, "gbps": pytest.approx(4.0)}
    assert derive(250.0).as_dict() == {"time_us": 250.0}
    assert isinstance(d, Derived)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: gbps(-1, 1.0), ValueError, "bytes_moved"),
        (lambda: gbps(math.nan, 1.0), ValueError, "bytes_moved"),
        (lambda: gbps(True, 1.0), TypeError, "bytes_moved"),
        (lambda: tflops(1.0, 0.0), ValueError, "time"),
        (lambda: tokens_per_s(1, math.inf), ValueError, "time"),
        (lambda: derive("12us"), TypeError, "time"),
        (lambda: derive(10.0, flops="1e9"), TypeError, "flops"),
    ],
)
def test_bad_amounts_raise_a_clear_error(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


# ----------------------------------------------------------------- peaks cache file


def test_store_then_load_round_trips(tmp_path):
    path = tmp_path / "sub" / "peaks.json"
    store(path, peaks_of())
    assert load_cached(path, H100) == peaks_of()
    assert load_cached(path, "NVIDIA H200") is None
    assert [p.name for p in path.parent.iterdir()] == ["peaks.json"]  # no temp file left


def test_store_keeps_other_gpu_models(tmp_path):
    path = tmp_path / "peaks.json"
    store(path, peaks_of("NVIDIA H200", copy=4200.0))
    store(path, peaks_of(H100, copy=3100.0))
    store(path, peaks_of(H100, copy=3050.0))  # replaces its own entry only
    data = json.loads(path.read_text())
    assert set(data["gpus"]) == {"NVIDIA H200", H100}
    assert load_cached(path, H100).copy_gbps == 3050.0
    assert load_cached(path, "NVIDIA H200").copy_gbps == 4200.0


@pytest.mark.parametrize(
    "text",
    ["{not json", "[]", '{"format": 99, "gpus": {}}',
     json.dumps({"format": 1, "gpus": {H100: {"copy_gbps": -5, "bf16_tflops": 700,
                                             "gpu_name": H100, "measured_at": "x"}}}),
     json.dumps({"format": 1, "gpus": {H100: {"copy_gbps": 3000}}})],
)
def test_unusable_cache_is_ignored_and_then_overwritten(tmp_path, text):
    path = tmp_path / "peaks.json"
    path.write_text(text)
    assert load_cached(path, H100) is None
    store(path, peaks_of())
    assert load_cached(path, H100) == peaks_of()


def test_no_peaks_on_the_cpu():
    assert get_peaks("cpu") is None
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        assert get_peaks() is None


def test_peaks_measured_once_per_process_then_reused_from_the_cache(tmp_path, monkeypatch):
    """Cache logic with the GPU part substituted: measure, memoise, reload, refresh."""
    measured = []

    def fake_measure(torch, index, name):
        measured.append(name)
        return peaks_of(name, copy=3000.0 + len(measured))

    monkeypatch.setattr(P, "_resolve_gpu", lambda device: (None, 0, H100))
    monkeypatch.setattr(P, "_measure", fake_measure)
    monkeypatch.setattr(P, "_MEMO", {})
    path = tmp_path / "peaks.json"
    first = get_peaks(cache_path=path)
    assert measured == [H100] and load_cached(path, H100) == first
    assert get_peaks(cache_path=path) is first and len(measured) == 1  # memo
    monkeypatch.setattr(P, "_MEMO", {})  # a new process: read from the file
    assert get_peaks(cache_path=path) == first and len(measured) == 1
    again = get_peaks(cache_path=path, refresh=True)
    assert len(measured) == 2 and again.copy_gbps == 3002.0
    assert load_cached(path, H100) == again


def test_default_cache_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert P.default_cache_path() == tmp_path / "pytest-kvperf" / "peaks.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert P.default_cache_path().parts[-3:] == (".cache", "pytest-kvperf", "peaks.json")


@pytest.mark.gpu
def test_gpu_peaks_are_plausible_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_MEMO", {})
    path = tmp_path / "peaks.json"
    pk = get_peaks(cache_path=path)
    # Any CUDA GPU of the last decade lies inside these bands; an H100 SXM copies at
    # roughly 2.5-3.2 TB/s (read + write) and reaches ~500-800 bf16 TFLOP/s on 8192^3.
    assert 50.0 < pk.copy_gbps < 20_000.0
    assert 1.0 < pk.bf16_tflops < 5_000.0
    assert pk.copy_bytes >= (256 << 20)
    assert load_cached(path, pk.gpu_name) == pk
