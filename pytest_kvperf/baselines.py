"""Per-GPU stored baselines: file format, validation, comparison, atomic update.

One file per GPU model, ``baselines/<gpu-key>.json``::

    {"schema": "pytest-kvperf/baselines/1",
     "gpu": {"key": ..., "name": ..., "sm": ...},
     "entries": {
        "<test node id>": {
            "status": "measured",
            "metrics": {"cosine": {"value": 0.9995, "kind": "accuracy", "better": "higher",
                                   "rtol": 0.0005, "atol": 0.0, "unit": ""}, ...},
            "versions": {...}, "recorded": "<UTC time>"},
        "<other node id>": {"status": "n/a", "hw_skip_reason": "needs sm100 ...", ...}}}

A malformed file stops the run with the file and the problem named; it is never
overwritten. Writes go to a temporary file that replaces the old one, under a lock,
so a killed process leaves the old file whole and two writers lose no entries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import jsonfile

SCHEMA = "pytest-kvperf/baselines/1"
DIRECTIONS = ("higher", "lower")
KINDS = ("accuracy", "speed")
STATUSES = ("measured", "n/a")


class BaselineError(Exception):
    """A baseline file that cannot be trusted; the message names the file and the problem."""


def _fail(path: Path, where: str, problem: str) -> BaselineError:
    return BaselineError(f"malformed baseline file {path}: {where}: {problem}")


def _check_number(path: Path, where: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, where, f"expected a number, found {value!r}")
    if not math.isfinite(value):
        raise _fail(path, where, f"expected a finite number, found {value!r}")


def validate_metric(path: Path, where: str, metric) -> None:
    if not isinstance(metric, dict):
        raise _fail(path, where, f"expected an object, found {type(metric).__name__}")
    for key in ("value", "kind", "better"):
        if key not in metric:
            raise _fail(path, where, f"missing '{key}'")
    _check_number(path, f"{where}.value", metric["value"])
    if metric["better"] not in DIRECTIONS:
        raise _fail(
            path,
            f"{where}.better",
            f"unknown metric direction {metric['better']!r} (expected one of {DIRECTIONS})",
        )
    if metric["kind"] not in KINDS:
        raise _fail(path, f"{where}.kind", f"unknown kind {metric['kind']!r} (expected {KINDS})")
    for key in ("rtol", "atol"):
        if key in metric:
            _check_number(path, f"{where}.{key}", metric[key])
            if metric[key] < 0:
                raise _fail(path, f"{where}.{key}", f"must be >= 0, found {metric[key]}")


def validate(path: Path, data) -> None:
    if not isinstance(data, dict):
        raise _fail(path, "top level", f"expected an object, found {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise _fail(path, "schema", f"expected {SCHEMA!r}, found {data.get('schema')!r}")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise _fail(path, "entries", "missing or not an object")
    for nodeid, entry in entries.items():
        where = f"entries[{nodeid!r}]"
        if not isinstance(entry, dict):
            raise _fail(path, where, "expected an object")
        status = entry.get("status")
        if status not in STATUSES:
            raise _fail(path, f"{where}.status", f"expected one of {STATUSES}, found {status!r}")
        if status == "n/a":
            if not isinstance(entry.get("hw_skip_reason"), str) or not entry["hw_skip_reason"]:
                raise _fail(path, where, "an n/a entry needs a non-empty 'hw_skip_reason'")
            continue
        metrics = entry.get("metrics")
        if not isinstance(metrics, dict) or not metrics:
            raise _fail(path, f"{where}.metrics", "a measured entry needs a non-empty object")
        for name, metric in metrics.items():
            validate_metric(path, f"{where}.metrics[{name!r}]", metric)


def load(path: Path) -> dict:
    """The validated content of one baseline file, or an empty one when it does not exist."""
    path = Path(path)
    if not path.exists():
        return {"schema": SCHEMA, "entries": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BaselineError(f"malformed baseline file {path}: not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise BaselineError(f"malformed baseline file {path}: not UTF-8 text: {exc}") from None
    validate(path, data)
    return data


def validate_directory(directory: Path) -> dict[str, dict]:
    """Load every baseline file so a broken one stops the run on any machine, not only its GPU's."""
    return {p.stem: load(p) for p in sorted(Path(directory).glob("*.json"))}


# ---------------------------------------------------------------- comparison


@dataclass
class MetricChange:
    name: str
    kind: str
    better: str
    value: float
    base: float | None
    status: str  # ok | regressed | improved | new
    detail: str = ""


def format_change(base: float, value: float) -> str:
    """'0.01 -> 0.02 (+100.0%)': the one way a change is written, in summaries and reports."""
    pct = f" ({value / base - 1:+.1%})" if base else ""
    return f"{base:.6g} -> {value:.6g}{pct}"


def compare_value(value: float, base: float, better: str, rtol: float, atol: float) -> str:
    """ok / regressed / improved for one metric: outside rtol*|base| + atol in either direction."""
    slack = rtol * abs(base) + atol
    worse = value > base + slack if better == "lower" else value < base - slack
    if worse:
        return "regressed"
    better_by = value < base - slack if better == "lower" else value > base + slack
    return "improved" if better_by else "ok"


@dataclass
class TestVerdict:
    status: str  # new | ok | regressed | improved
    changes: list[MetricChange] = field(default_factory=list)

    def regressed(self, kind: str) -> list[MetricChange]:
        return [c for c in self.changes if c.status == "regressed" and c.kind == kind]


def worst_status(statuses) -> str:
    order = {"regressed": 3, "improved": 2, "ok": 1, "new": 0}
    statuses = list(statuses)
    return max(statuses, key=order.__getitem__) if statuses else "new"


def compare_metrics(entry: dict | None, metrics: dict[str, dict], speed_judge=None) -> TestVerdict:
    """Compare this run's metrics with a stored entry.

    `speed_judge(base_metric, metric) -> (status, detail)` lets the noise-aware verdict
    judge speed metrics that carry samples; without it, speed uses rtol like accuracy.
    """
    base_metrics = entry.get("metrics", {}) if entry and entry["status"] == "measured" else {}
    changes = []
    for name, metric in metrics.items():
        base = base_metrics.get(name)
        if base is None:
            changes.append(
                MetricChange(name, metric["kind"], metric["better"], metric["value"], None, "new")
            )
            continue
        detail = ""
        if metric["kind"] == "speed" and speed_judge is not None:
            status, detail = speed_judge(base, metric)
        else:
            status = compare_value(
                metric["value"], base["value"], metric["better"], metric["rtol"], metric["atol"]
            )
        changes.append(
            MetricChange(
                name, metric["kind"], metric["better"], metric["value"], base["value"], status,
                detail,
            )
        )
    if not base_metrics:
        return TestVerdict("new", changes)
    return TestVerdict(worst_status(c.status for c in changes if c.status != "new"), changes)


# ---------------------------------------------------------------- update


def without_samples(metrics: dict[str, dict]) -> dict[str, dict]:
    """Stored speed spreads keep quartiles and n; raw samples stay in the run's results."""
    stored = {}
    for name, metric in metrics.items():
        metric = dict(metric)
        if "spread" in metric:
            metric["spread"] = {k: v for k, v in metric["spread"].items() if k != "samples"}
        stored[name] = metric
    return stored


def measured_entry(metrics: dict[str, dict], versions: dict) -> dict:
    return {
        "status": "measured",
        "metrics": metrics,
        "versions": versions,
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def not_applicable_entry(reason: str, versions: dict) -> dict:
    return {
        "status": "n/a",
        "hw_skip_reason": reason,
        "versions": versions,
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def apply_updates(path: Path, gpu: dict, updates: dict[str, dict]) -> dict[str, tuple]:
    """Merge `updates` (node id -> new entry) into the file; every other entry is kept.

    Returns {node id: (old entry or None, new entry)} for what changed. The file is re-read
    under the lock, so entries another process wrote since this run started survive.
    """
    path = Path(path)
    with jsonfile.locked(path):
        data = load(path)
        data["schema"] = SCHEMA
        data["gpu"] = gpu
        changed = {}
        for nodeid, new in updates.items():
            old = data["entries"].get(nodeid)
            changed[nodeid] = (old, new)
            data["entries"][nodeid] = new
        validate(path, data)  # never write what we would refuse to read
        jsonfile.replace(path, data)
    return changed


def describe_change(nodeid: str, old: dict | None, new: dict) -> list[str]:
    """Lines 'node: metric old -> new (+x%)' for the update summary."""
    if new["status"] == "n/a":
        return [f"{nodeid}: n/a ({new['hw_skip_reason']})"]
    old_metrics = old.get("metrics", {}) if old else {}
    lines = []
    for name, metric in sorted(new["metrics"].items()):
        prev = old_metrics.get(name)
        if prev is None:
            lines.append(f"{nodeid}: {name} new = {metric['value']:.6g}")
        else:
            lines.append(f"{nodeid}: {name} {format_change(prev['value'], metric['value'])}")
    return lines
