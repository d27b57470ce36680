"""Per-GPU stored baselines: the file format, its validation, and merging updates into it.

One file per GPU model, ``baselines/<gpu-key>.json``::

    {"schema": "pytest-kvperf/baselines/2",
     "gpu": {"key": ..., "name": ..., "sm": ...},
     "versions": {"torch": "2.13.0+cpu", ...},
     "entries": {
        "<test node id>": {
            "status": "measured",
            "metrics": {"<name>": <metric.Metric.to_dict() without spread samples>, ...},
            "recorded": "<UTC time the entry's content last changed>"},
        "<other node id>": {"status": "n/a", "hw_skip_reason": "needs sm100 ...",
                            "versions": {"flashinfer": null}, "recorded": ...}}}

The software an entry was last recorded or confirmed with is the top-level ``versions``,
overridden by the entry's own ``versions`` where they differ (per package: the top level
holds each package's most common version), so a library upgrade is one change in the
diff. An update that changes no number keeps the file byte-identical: an entry whose
content is unchanged keeps its ``recorded`` time. Schema 1 files (full ``versions`` in
every entry) are read and migrated; the next update writes schema 2.

A malformed file stops the run with the file and the problem named; it is never
overwritten. Updates are merged under the file's lock and written atomically
(``jsonfile``), so a killed process leaves the old file whole and two writers lose no
entries. Comparing with the stored numbers is ``compare``'s business, not this module's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from . import jsonfile
from .metric import Metric, MetricError

SCHEMA = "pytest-kvperf/baselines/2"
_SCHEMA_1 = "pytest-kvperf/baselines/1"  # read and migrated: versions in every entry
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
    # the GPU around each timing when the numbers were recorded (gpu_facts.window per
    # kv_bench label): context, not content (a rerun with other clocks changes no byte)
    gpu_facts: Mapping[str, dict] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.status == "measured"

    def same_content(self, other: Entry | None) -> bool:
        """Same numbers and facts; the versions and time it was recorded with aside."""
        return other is not None and (self.status, dict(self.metrics), self.hw_skip_reason) == (
            other.status, dict(other.metrics), other.hw_skip_reason)


@dataclass
class BaselineFile:
    gpu: dict
    entries: dict[str, Entry]
    versions: dict = field(default_factory=dict)  # the top level, as read


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def measured_entry(metrics: Mapping[str, Metric], versions: Mapping,
                   gpu_facts: Mapping[str, dict] | None = None) -> Entry:
    return Entry("measured", {k: m.stored() for k, m in metrics.items()},
                 versions=dict(versions), recorded=_utc_now(), gpu_facts=dict(gpu_facts or {}))


def not_applicable_entry(reason: str, versions: Mapping) -> Entry:
    return Entry("n/a", hw_skip_reason=reason, versions=dict(versions), recorded=_utc_now())


# ---------------------------------------------------------------- file format


def _decode_entry(path: Path, nodeid: str, raw, top_versions: dict) -> Entry:
    where = f"entries[{nodeid!r}]"
    if not isinstance(raw, dict):
        raise _fail(path, where, "expected an object")
    status = raw.get("status")
    if status not in STATUSES:
        raise _fail(path, f"{where}.status", f"expected one of {STATUSES}, found {status!r}")
    versions = raw.get("versions", {})
    if not isinstance(versions, dict):
        raise _fail(path, f"{where}.versions", "expected an object")
    versions = {**top_versions, **versions}
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
    facts = raw.get("gpu_facts", {})
    if not isinstance(facts, dict) or not all(isinstance(w, dict) for w in facts.values()):
        raise _fail(path, f"{where}.gpu_facts", "expected an object of objects")
    return Entry("measured", decoded, versions=versions, recorded=recorded, gpu_facts=facts)


def decode(path: Path, data) -> BaselineFile:
    """The validated content of a file's JSON; raises BaselineError naming what is wrong."""
    if not isinstance(data, dict):
        raise _fail(path, "top level", f"expected an object, found {type(data).__name__}")
    if data.get("schema") not in (SCHEMA, _SCHEMA_1):
        raise _fail(path, "schema", f"expected {SCHEMA!r} (or the older {_SCHEMA_1!r}), "
                                    f"found {data.get('schema')!r}")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise _fail(path, "entries", "missing or not an object")
    top = data.get("versions", {}) if data["schema"] == SCHEMA else {}
    if not isinstance(top, dict):
        raise _fail(path, "versions", "expected an object")
    return BaselineFile(data.get("gpu", {}), {nodeid: _decode_entry(path, nodeid, raw, top)
                                              for nodeid, raw in entries.items()}, top)


def _common_versions(entries: Mapping[str, Entry], prefer: Mapping) -> dict:
    """Per package the version most entries have (a tie keeps `prefer`'s, the old top)."""
    packages = sorted({name for e in entries.values() for name in e.versions})
    top = {}
    for name in packages:
        counts = Counter(json.dumps(e.versions.get(name)) for e in entries.values())
        best = max(counts.values())
        tied = sorted(v for v, c in counts.items() if c == best)
        old = json.dumps(prefer.get(name))
        top[name] = json.loads(old if old in tied else tied[0])
    return top


def _encode_entry(entry: Entry, top: Mapping) -> dict:
    out = {"status": entry.status, "recorded": entry.recorded}
    if entry.measured:
        out["metrics"] = {name: m.stored().to_dict() for name, m in entry.metrics.items()}
        if entry.gpu_facts:
            out["gpu_facts"] = dict(entry.gpu_facts)
    else:
        out["hw_skip_reason"] = entry.hw_skip_reason
    differ = {k: v for k, v in entry.versions.items() if k not in top or top[k] != v}
    differ.update({k: None for k in top if k not in entry.versions and top[k] is not None})
    if differ:
        out["versions"] = differ
    return out


def encode(baseline: BaselineFile) -> dict:
    top = _common_versions(baseline.entries, baseline.versions)
    return {"schema": SCHEMA, "gpu": baseline.gpu, "versions": top,
            "entries": {k: _encode_entry(e, top) for k, e in baseline.entries.items()}}


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


@dataclass(frozen=True)
class Update:
    """What apply_updates did: the entries whose content changed, and whether it wrote."""

    changed: dict[str, tuple[Entry | None, Entry]]
    written: bool
    versions: tuple[dict, dict]  # the top-level versions before and after


def apply_updates(path: str | Path, gpu: dict, updates: Mapping[str, Entry]) -> Update:
    """Merge `updates` (node id -> new entry) into the file; every other entry is kept.

    An update with the stored content (same numbers) only confirms the entry with this
    run's versions and keeps its `recorded` time. The file is re-read under the lock, so
    entries another process wrote since this run started survive; it is not touched when
    its bytes would not change.
    """
    path = Path(path)
    with jsonfile.locked(path):
        baseline = load(path)
        before = encode(baseline)["versions"] if baseline.entries else {}
        baseline.gpu = gpu
        changed = {}
        for nodeid, new in updates.items():
            old = baseline.entries.get(nodeid)
            if new.same_content(old):  # confirmed: keeps when, and on what GPU state
                new = replace(new, recorded=old.recorded, gpu_facts=old.gpu_facts)
            else:
                changed[nodeid] = (old, new)
            baseline.entries[nodeid] = new
        data = encode(baseline)
        decode(path, data)  # never write what we would refuse to read
        written = jsonfile.replace(path, data)
    return Update(changed, written, (before, data["versions"]))
