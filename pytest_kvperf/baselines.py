"""Per-GPU stored baselines: the file format, its validation, and merging updates into it.

One file per GPU model, ``baselines/<gpu-key>.json``::

    {"schema": "pytest-kvperf/baselines/1",
     "gpu": {"key": ..., "name": ..., "sm": ...},
     "entries": {
        "<test node id>": {
            "status": "measured",
            "metrics": {"<name>": <metric.Metric.to_dict() without spread samples>, ...},
            "versions": {...}, "recorded": "<UTC time>"},
        "<other node id>": {"status": "n/a", "hw_skip_reason": "needs sm100 ...", ...}}}

A malformed file stops the run with the file and the problem named; it is never
overwritten. Updates are merged under the file's lock and written atomically
(``jsonfile``), so a killed process leaves the old file whole and two writers lose no
entries. Comparing with the stored numbers is ``compare``'s business, not this module's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import jsonfile
from .metric import Metric, MetricError

SCHEMA = "pytest-kvperf/baselines/1"
STATUSES = ("measured", "n/a")


class BaselineError(Exception):
    """A baseline file that cannot be trusted; the message names the file and the problem."""


def _fail(path: Path, where: str, problem: str) -> BaselineError:
    return BaselineError(f"malformed baseline file {path}: {where}: {problem}")


@dataclass(frozen=True)
class Entry:
    """One test's stored record: its metrics, or n/a with the reason it cannot run here."""

    status: str  # measured | n/a
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    hw_skip_reason: str = ""
    versions: Mapping[str, str | None] = field(default_factory=dict)
    recorded: str = ""  # UTC time the entry's content last changed

    @property
    def measured(self) -> bool:
        return self.status == "measured"


@dataclass
class BaselineFile:
    gpu: dict
    entries: dict[str, Entry]


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def measured_entry(metrics: Mapping[str, Metric], versions: Mapping) -> Entry:
    return Entry("measured", {k: m.stored() for k, m in metrics.items()},
                 versions=dict(versions), recorded=_utc_now())


def not_applicable_entry(reason: str, versions: Mapping) -> Entry:
    return Entry("n/a", hw_skip_reason=reason, versions=dict(versions), recorded=_utc_now())


# ---------------------------------------------------------------- file format


def _decode_entry(path: Path, nodeid: str, raw) -> Entry:
    where = f"entries[{nodeid!r}]"
    if not isinstance(raw, dict):
        raise _fail(path, where, "expected an object")
    status = raw.get("status")
    if status not in STATUSES:
        raise _fail(path, f"{where}.status", f"expected one of {STATUSES}, found {status!r}")
    versions = raw.get("versions", {})
    if not isinstance(versions, dict):
        raise _fail(path, f"{where}.versions", "expected an object")
    recorded = raw.get("recorded", "")
    if status == "n/a":
        if not isinstance(raw.get("hw_skip_reason"), str) or not raw["hw_skip_reason"]:
            raise _fail(path, where, "an n/a entry needs a non-empty 'hw_skip_reason'")
        return Entry("n/a", hw_skip_reason=raw["hw_skip_reason"], versions=versions,
                     recorded=recorded)
    metrics = raw.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise _fail(path, f"{where}.metrics", "a measured entry needs a non-empty object")
    decoded = {}
    for name, metric in metrics.items():
        try:
            decoded[name] = Metric.from_dict(metric)
        except MetricError as exc:
            raise _fail(path, f"{where}.metrics[{name!r}].{exc.field}", exc.problem) from None
    return Entry("measured", decoded, versions=versions, recorded=recorded)


def decode(path: Path, data) -> BaselineFile:
    """The validated content of a file's JSON; raises BaselineError naming what is wrong."""
    if not isinstance(data, dict):
        raise _fail(path, "top level", f"expected an object, found {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise _fail(path, "schema", f"expected {SCHEMA!r}, found {data.get('schema')!r}")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise _fail(path, "entries", "missing or not an object")
    return BaselineFile(data.get("gpu", {}), {nodeid: _decode_entry(path, nodeid, raw)
                                              for nodeid, raw in entries.items()})


def _encode_entry(entry: Entry) -> dict:
    out = {"status": entry.status, "versions": dict(entry.versions), "recorded": entry.recorded}
    if entry.measured:
        out["metrics"] = {name: m.stored().to_dict() for name, m in entry.metrics.items()}
    else:
        out["hw_skip_reason"] = entry.hw_skip_reason
    return out


def encode(baseline: BaselineFile) -> dict:
    return {"schema": SCHEMA, "gpu": baseline.gpu,
            "entries": {k: _encode_entry(e) for k, e in baseline.entries.items()}}


def load(path: str | Path) -> BaselineFile:
    """The validated content of one baseline file, or an empty one when it does not exist."""
    path = Path(path)
    if not path.exists():
        return BaselineFile({}, {})
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BaselineError(f"malformed baseline file {path}: not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise BaselineError(f"malformed baseline file {path}: not UTF-8 text: {exc}") from None
    return decode(path, data)


def validate_directory(directory: Path) -> dict[str, BaselineFile]:
    """Load every baseline file so a broken one stops the run on any machine, not only its GPU's."""
    return {p.stem: load(p) for p in sorted(Path(directory).glob("*.json"))}


# ---------------------------------------------------------------- update


def apply_updates(path: str | Path, gpu: dict,
                  updates: Mapping[str, Entry]) -> dict[str, tuple[Entry | None, Entry]]:
    """Merge `updates` (node id -> new entry) into the file; every other entry is kept.

    Returns {node id: (old entry or None, new entry)}. The file is re-read under the lock,
    so entries another process wrote since this run started survive.
    """
    path = Path(path)
    with jsonfile.locked(path):
        baseline = load(path)
        baseline.gpu = gpu
        changed = {}
        for nodeid, new in updates.items():
            changed[nodeid] = (baseline.entries.get(nodeid), new)
            baseline.entries[nodeid] = new
        data = encode(baseline)
        decode(path, data)  # never write what we would refuse to read
        jsonfile.replace(path, data)
    return changed
