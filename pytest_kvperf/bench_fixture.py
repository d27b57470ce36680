"""The `kv_bench` fixture: device-accurate timing recorded for the baseline and pytest-benchmark.

A call measures with `timing.measure` (CUDA events / graph replay on a GPU, host clock
on a CPU), records speed metrics with the test's `kvperf` recorder (each with its spread,
for the noise-aware verdict), and adds a pytest-benchmark entry whose samples are the
device times, so --benchmark-json/--benchmark-autosave/--benchmark-compare see them.

With --benchmark-disable (or -p no:benchmark) the function runs once, untimed, so every
correctness check of the test still runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from . import benchmark_compat, gpu_facts, role
from . import named_peaks as named_peaks_mod
from . import timing as timing_mod
from .derived import derive
from .metric import Spread
from .xdist_gpus import gpu_shared

PROP_BENCH = "kvperf_benchmark"

# (pytest-benchmark's private API is used in benchmark_compat only)
SKIP_BENCH_REASON = benchmark_compat.SKIP_BENCH_REASON
SKIP_OTHER_REASON = benchmark_compat.SKIP_OTHER_REASON
BENCHMARK_SELECTION_REASONS = benchmark_compat.SELECTION_REASONS


@dataclass
class BenchResult:
    """What one kv_bench call measured; rates are None where not computable."""

    value: Any  # what fn returned on its last call
    timing: timing_mod.Timing | None
    median_us: float | None = None
    gbps: float | None = None
    frac_of_peak: float | None = None
    tflops: float | None = None
    tokens_per_s: float | None = None


def benchmarks_disabled(config) -> bool:
    if benchmark_compat.session(config) is None:  # -p no:benchmark
        return True
    return bool(config.getoption("benchmark_disable")) and not config.getoption(
        "benchmark_enable"
    )


def select_for_benchmark_options(config, items) -> None:
    """--benchmark-only / --benchmark-skip mean for `kv_bench` tests what they mean for
    pytest-benchmark's `benchmark` ones: a kv_bench test is a benchmark.

    Runs after pytest-benchmark's pytest_collection_modifyitems, which skipped kv_bench
    tests as non-benchmarks under --benchmark-only and did not skip them under
    --benchmark-skip.
    """
    bs = benchmark_compat.session(config)
    if bs is None:  # -p no:benchmark
        return
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "kv_bench" not in names or "benchmark" in names:
            continue  # pytest-benchmark decided a `benchmark` test itself
        if benchmark_compat.deselects_only(bs):
            item.own_markers[:] = [
                m for m in item.own_markers
                if not (m.name == "skip" and m.kwargs.get("reason") == SKIP_OTHER_REASON)
            ]
        if benchmark_compat.deselects_benchmarks(bs):
            item.add_marker(pytest.mark.skip(reason=SKIP_BENCH_REASON))


def keep_gpus_apart(config, gpu_key: str) -> None:
    """pytest-benchmark's machine id, and so its storage folder (`.benchmarks/<id>/`),
    gets the GPU key: --benchmark-compare then compares with runs on the same GPU model
    only, even on a shared `.benchmarks/`.

    pytest-benchmark has no hook for the id: benchmark_compat wraps the function its
    session reads, from the plugin's earlier pytest_configure until unconfigure.
    """
    if not config.pluginmanager.has_plugin("benchmark"):
        return
    benchmark_compat.wrap_machine_id(benchmark_compat.machine_id_suffix(gpu_key),
                                     config.add_cleanup)


class KvBench:
    def __init__(self, request, recorder, peaks_for, facts_reader=None, named_peaks=None):
        self.request = request
        self.recorder = recorder
        self.peaks_for = peaks_for  # callable(device) -> Peaks | None, cached per session
        # callable() -> gpu_facts reader (NVML, or Unavailable), opened once per session
        self.facts_reader = facts_reader
        self.named_peaks = named_peaks  # named_peaks.Resolver: the peak per transfer
        self.labels: set[str] = set()

    def __call__(self, fn, *args, bytes_moved=None, flops=None, tokens=None, args_sets=None,
                 flush_l2=False, label: str = "", max_time_s: float = 1.0,
                 peak: str = named_peaks_mod.DEVICE_COPY, **kwargs) -> BenchResult:
        """Time fn(*args, **kwargs); bytes_moved (read + written), flops, tokens give rates.

        peak names the peak frac_of_peak is taken of (named_peaks.NAMES): device_copy for
        kernels (bytes read + written), h2d_pinned, h2d_pageable, d2h_pinned or
        bidir_pinned for host transfers, peer for GPU to GPU (bytes crossing the link).

        args_sets rotates among several argument tuples (instead of args) so that caches
        are not what is measured; label names the metrics when a test times several things.
        """
        named_peaks_mod.check_name(peak)
        if label in self.labels:
            raise ValueError(f"kv_bench label {label!r} used twice in one test")
        self.labels.add(label)
        if args_sets is not None and args:
            raise ValueError("pass either positional args or args_sets, not both")
        sets = [tuple(a) for a in args_sets] if args_sets is not None else [args]
        last = {}

        def call(*a):
            last["value"] = fn(*a, **kwargs)

        if benchmarks_disabled(self.request.config):
            call(*sets[0])
            return BenchResult(last["value"], None)
        reader = self.facts_reader() if self.facts_reader else None
        before = reader.sample() if reader is not None and reader.available else None
        timing = timing_mod.measure(call, args_sets=sets, flush_l2=flush_l2,
                                    max_time_s=max_time_s)
        if reader is not None and reader.available:  # the GPU's state at start and end
            self.recorder.timing_window(label, gpu_facts.window(before, reader.sample()))
        device_timed = timing.method != "host-clock"
        peaks = self.peaks_for() if device_timed else None
        absent = None
        if self.named_peaks is not None:
            bw_peak, absent = self.named_peaks.lookup(peak, device_timed=device_timed)
        else:
            bw_peak = peaks.copy_gbps if peaks is not None and peak == "device_copy" else None
        derived = derive(timing, bytes_moved=bytes_moved, flops=flops, tokens=tokens,
                         peaks=peaks, bw_peak_gbps=bw_peak)
        result = BenchResult(
            last["value"], timing, timing.median_us, derived.gbps, derived.frac_of_peak_bw,
            derived.tflops, derived.tokens_per_s,
        )
        self._record(label, timing, derived, peaks)
        if peak != named_peaks_mod.DEVICE_COPY:  # the copy peak: peak_copy_gbps as before
            prefix = f"{label}." if label else ""
            self.recorder.info(f"{prefix}peak", peak)
            if bw_peak is not None:
                self.recorder.info(f"{prefix}peak_gbps", round(bw_peak, 1))
                self.recorder.link_peak(peak, bw_peak)
            elif absent:  # e.g. peer on one GPU: no fraction, and why
                self.recorder.info(f"{prefix}peak_absent", absent)
        self._add_to_pytest_benchmark(label, timing, derived)
        return result

    def _record(self, label, timing, derived, peaks) -> None:
        prefix = f"{label}." if label else ""
        rec = self.recorder
        rec.info(f"{prefix}method", timing.method)
        if timing.peak_mem_bytes is not None:
            rec.info(f"{prefix}peak_mem_bytes", timing.peak_mem_bytes)
        if peaks is not None:
            rec.info("peak_copy_gbps", round(peaks.copy_gbps, 1))
        metrics = {"median_us": (timing.median_us, "us", "lower", list(timing.samples_us))}
        rates = {
            "gbps": (derived.gbps, "GB/s"),
            "frac_of_peak_bw": (derived.frac_of_peak_bw, ""),
            "tflops": (derived.tflops, "TFLOP/s"),
            "tok_per_s": (derived.tokens_per_s, "tok/s"),
        }
        for name, (rate, unit) in rates.items():
            if rate is not None:
                # rate = work / time: its samples are the same work over each sample's time
                work = rate * timing.median_us
                metrics[name] = (rate, unit, "higher", [work / t for t in timing.samples_us])
        for name, (value, unit, better, samples) in metrics.items():
            if gpu_shared():
                rec.info(f"{prefix}{name} (GPU shared, not compared)", value)
            else:
                rec.speed(f"{prefix}{name}", value, better=better, unit=unit,
                          spread=Spread.of(samples))

    def _add_to_pytest_benchmark(self, label, timing, derived) -> None:
        config = self.request.config
        node = self.request.node
        suffix = f"[{label}]" if label else ""
        callspec = getattr(node, "callspec", None)
        marker = node.get_closest_marker("benchmark")
        record = {
            "name": node.name + suffix,
            "fullname": node.nodeid + suffix,
            "group": (marker.kwargs.get("group") if marker else None),
            "param": callspec.id if callspec else None,
            "params": {k: str(v) for k, v in callspec.params.items()} if callspec else None,
            "extra_info": {"timing_method": timing.method,
                           "inner_iterations": timing.inner_iterations,
                           **derived.as_dict()},
            "samples_s": [s * 1e-6 for s in timing.samples_us],
        }
        if role.is_worker(config):
            # xdist worker: the controller adds it to the one benchmark JSON.
            node.user_properties.append((PROP_BENCH, json.dumps(record)))
        else:
            add_benchmark_record(config, record)


def add_benchmark_record(config, record: dict) -> None:
    """Append a measured record to pytest-benchmark's session as one of its own benchmarks."""
    benchmark_compat.add_record(config, record)
