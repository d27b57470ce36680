"""Saved runs over time: pytest-benchmark's autosaves and kvperf results JSONs, per GPU.

A series is one timed thing (a `kv_bench` call: node id, plus `[label]` when a test times
several) on one GPU model: its median time in microseconds per saved run, oldest first.
pytest-benchmark stores seconds per benchmark (`stats.median`) and, through the plugin's
machine-info hook, the GPU (`machine_info.kvperf.gpu.key`); a results JSON
(`--kvperf-json`) stores `median_us` / `<label>.median_us` metrics and `run.date`.
Files of another kind are ignored; a file that cannot be read is reported, never fatal.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    date: str  # ISO time of the run
    median_us: float
    commit: str = ""
    source: str = ""  # the file it came from


def _benchmark_points(data: dict, source: str):
    gpu = ((data.get("machine_info") or {}).get("kvperf") or {}).get("gpu") or {}
    date = str(data.get("datetime") or "")
    commit = str((data.get("commit_info") or {}).get("id") or "")[:12]
    for bench in data.get("benchmarks") or ():
        median = (bench.get("stats") or {}).get("median")
        if isinstance(median, (int, float)) and median > 0 and bench.get("fullname"):
            yield gpu.get("key", ""), bench["fullname"], Point(date, median * 1e6, commit, source)


def _results_points(data: dict, source: str):
    key = (data.get("hardware") or {}).get("key", "")
    run = data.get("run") or {}
    date, commit = str(run.get("date") or ""), str(run.get("commit") or "")[:12]
    for nodeid, test in (data.get("tests") or {}).items():
        for name, metric in (test.get("metrics") or {}).items():
            if name == "median_us" or name.endswith(".median_us"):
                label = name[: -len(".median_us")] if "." in name else ""
                full = f"{nodeid}[{label}]" if label else nodeid
                yield key, full, Point(date, float(metric["value"]), commit, source)


def read_runs(paths) -> tuple[dict[tuple[str, str], list[Point]], list[str]]:
    """({(gpu key, timed thing): points oldest first}, problems) from the given files."""
    series: dict[tuple[str, str], list[Point]] = defaultdict(list)
    problems = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{path}: not readable as JSON ({exc.__class__.__name__})")
            continue
        if not isinstance(data, dict):
            continue
        points = (_benchmark_points(data, str(path)) if "benchmarks" in data
                  else _results_points(data, str(path)) if "tests" in data else ())
        for key, full, point in points:
            series[(key, full)].append(point)
    for points in series.values():
        points.sort(key=lambda p: p.date)
    return dict(series), problems


def benchmark_storage_files(config) -> list[Path]:
    """pytest-benchmark's saved runs (its --benchmark-storage folder, file:// only)."""
    try:
        storage = str(config.getoption("benchmark_storage"))
    except ValueError:  # pytest-benchmark not loaded
        return []
    if "://" in storage and not storage.startswith("file://"):
        return []
    folder = Path(storage.removeprefix("file://"))
    if not folder.is_absolute():
        folder = Path(config.invocation_params.dir) / folder
    return sorted(folder.glob("*/*.json")) if folder.is_dir() else []
