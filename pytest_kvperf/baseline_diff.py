"""Two baseline files side by side: per test and metric the old and new value, their ratio and
the verdict that `compare.judge` gives the new number against the old one.

Used by `kvperf diff` (two files, or one file at two git revisions) and by the review of
`kvperf merge`. Tests that moved to another file are matched (`node_ids`); a schema-1
`cosine` is compared as the distance 1 - cosine that schema 2 stores as `cosine_distance`.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import baselines
from .baselines import BaselineError, BaselineFile
from .compare import judge
from .metric import Metric
from .node_ids import match_moved


@dataclass(frozen=True)
class MetricDiff:
    nodeid: str
    metric: str
    old: float | None
    new: float | None
    status: str  # ok | regressed | improved | invalid | added | removed
    kind: str = ""
    better: str = ""
    unit: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.old is None or self.new is None or self.old == 0:
            return None
        return self.new / self.old


@dataclass
class FileDiff:
    old_name: str
    new_name: str
    rows: list[MetricDiff] = field(default_factory=list)
    moved: dict[str, str] = field(default_factory=dict)  # old id -> new id
    only_old: dict[str, baselines.Entry] = field(default_factory=dict)
    only_new: dict[str, baselines.Entry] = field(default_factory=dict)
    na_changes: list[tuple[str, str, str]] = field(default_factory=list)  # id, old, new
    from_cosine: int = 0  # schema-1 cosines compared as their distance from 1

    def counts(self) -> Counter:
        return Counter(r.status for r in self.rows)


def read_spec(spec: str, cwd: str | Path = ".") -> tuple[str, BaselineFile]:
    """A baseline file from 'PATH' or 'PATH@REV' (the file as git has it at REV)."""
    path, rev = spec, None
    if "@" in spec and not (Path(cwd) / spec).is_file():
        path, _, rev = spec.rpartition("@")
    file = Path(cwd) / path
    if rev is None:
        if not file.is_file():
            raise BaselineError(f"{spec}: no such baseline file")
        return spec, baselines.load(file)
    folder = file.parent if file.parent.is_dir() else Path(cwd)
    out = subprocess.run(["git", "-C", str(folder), "show", f"{rev}:./{file.name}"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise BaselineError(f"{spec}: git cannot show {file.name} at {rev!r}: "
                            f"{out.stderr.strip()}")
    try:
        data = json.loads(out.stdout)
    except json.JSONDecodeError as exc:
        raise BaselineError(f"malformed baseline file {spec}: not valid JSON: {exc}") from None
    return spec, baselines.decode(Path(spec), data)


def _from_cosine(old: dict[str, Metric], new: dict[str, Metric]) -> dict[str, Metric]:
    """Schema 1 stored `X.cosine`; schema 2 stores `X.cosine_distance` = 1 - cosine."""
    old = dict(old)
    for name in list(old):
        dist = name + "_distance"
        if name.endswith("cosine") and dist in new and name not in new and dist not in old:
            m = old.pop(name)
            old[dist] = replace(new[dist], value=max(0.0, 1.0 - m.value), spread=None)
    return old


# 1 - cosine from a stored cosine is known only to float64's spacing near 1 (2.2e-16):
# such a row is judged with at least this atol, or 0.9999999999999999 vs a bit-exact 0
# would read as a change
_COSINE_RESOLUTION = 2 * 2.220446049250313e-16


def _metric_rows(nodeid: str, old: dict[str, Metric], new: dict[str, Metric],
                 converted: frozenset = frozenset()) -> list[MetricDiff]:
    rows = []
    for name in sorted(set(old) | set(new)):
        o, n = old.get(name), new.get(name)
        if o is None:
            rows.append(MetricDiff(nodeid, name, None, n.value, "added", n.kind, n.better,
                                   n.unit))
        elif n is None:
            rows.append(MetricDiff(nodeid, name, o.value, None, "removed", o.kind, o.better,
                                   o.unit))
        else:
            if name in converted:
                n = replace(n, atol=max(n.atol, _COSINE_RESOLUTION))
            status, detail, _ = judge(o, n)
            rows.append(MetricDiff(nodeid, name, o.value, n.value, status, n.kind, n.better,
                                   n.unit, detail))
    return rows


def diff_files(old: BaselineFile, new: BaselineFile, old_name: str = "A",
               new_name: str = "B") -> FileDiff:
    """Every measured test of both files, matched by node id (moved tests matched too)."""
    result = FileDiff(old_name, new_name)
    result.moved = match_moved(old.entries, new.entries)
    for old_id, o in sorted(old.entries.items()):
        new_id = result.moved.get(old_id, old_id)
        n = new.entries.get(new_id)
        if n is None:
            result.only_old[old_id] = o
        elif o.measured and n.measured:
            old_metrics = _from_cosine(o.metrics, n.metrics)
            converted = frozenset(set(old_metrics) - set(o.metrics))
            result.from_cosine += len(converted)
            result.rows += _metric_rows(new_id, old_metrics, n.metrics, converted)
        elif o.hw_skip_reason != n.hw_skip_reason or o.status != n.status:
            result.na_changes.append((new_id, _entry_text(o), _entry_text(n)))
    matched = {result.moved.get(i, i) for i in old.entries}
    result.only_new = {i: e for i, e in sorted(new.entries.items()) if i not in matched}
    return result


def _entry_text(entry: baselines.Entry) -> str:
    if entry.measured:
        return f"measured ({len(entry.metrics)} metrics)"
    return f"n/a: {entry.hw_skip_reason}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def speed_summary(d: FileDiff) -> list[tuple[str, float, int]]:
    """(metric, geometric mean of new/old, count) per speed metric name (a label's prefix
    dropped): how the new file's GPU or revision compares overall."""
    logs: dict[str, list[float]] = {}
    for r in d.rows:
        if r.kind == "speed" and r.ratio and r.ratio > 0:
            logs.setdefault(r.metric.rsplit(".", 1)[-1], []).append(math.log(r.ratio))
    return [(name, math.exp(sum(v) / len(v)), len(v)) for name, v in sorted(logs.items())]


def _by_file(ids) -> Counter:
    return Counter(i.partition("::")[0] for i in ids)


def format_diff(d: FileDiff, changed_only: bool = False, verbose: bool = False) -> list[str]:
    """The text `kvperf diff` prints: a block per test (a line per metric), then what did
    not pair; moved and unpaired tests are counted per file (listed one by one with
    verbose)."""
    lines = [f"old: {d.old_name}", f"new: {d.new_name}"]
    if d.moved:
        pairs = Counter((o.partition("::")[0], n.partition("::")[0]) for o, n in d.moved.items())
        lines.append(f"{len(d.moved)} tests moved to another file since the old one "
                     "(matched by folder, test name and parameters):")
        lines += [f"  {n:4d} x {a} -> {b}" for (a, b), n in sorted(pairs.items())]
    if d.from_cosine:
        lines.append(f"{d.from_cosine} schema-1 'cosine' values compared as 1 - cosine "
                     "(schema 2's 'cosine_distance')")
    moved_to = {n: o for o, n in d.moved.items()}
    header = f"{'verdict':<9} {'metric':<40} {'old':>11} {'new':>11} {'new/old':>8}"
    current = None
    for r in d.rows:
        if changed_only and r.status == "ok":
            continue
        if r.nodeid != current:
            current = r.nodeid
            lines += ["", r.nodeid]
            if r.nodeid in moved_to:
                lines.append(f"  (old id {moved_to[r.nodeid]})")
            lines.append("  " + header)
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        unit = f" [{r.unit}]" if r.unit else ""
        lines.append(f"  {r.status:<9} {r.metric + unit:<40} {_num(r.old):>11} "
                     f"{_num(r.new):>11} {ratio:>8}"
                     + (f"  {r.note}" if r.note and r.status != "ok" else ""))
    for title, entries in ((f"only in old ({d.old_name})", d.only_old),
                           (f"only in new ({d.new_name})", d.only_new)):
        if not entries:
            continue
        measured = sum(e.measured for e in entries.values())
        lines += ["", f"{title}: {len(entries)} tests ({measured} measured, "
                      f"{len(entries) - measured} n/a)"]
        if verbose:
            lines += [f"  {i}: {_entry_text(e)}" for i, e in entries.items()]
        else:
            lines += [f"  {n:4d} x {f}" for f, n in sorted(_by_file(entries).items())]
    if d.na_changes:
        lines += ["", "status changed:"]
        lines += [f"  {i}: {o} -> {n}" for i, o, n in d.na_changes]
    speed = speed_summary(d)
    if speed:
        lines += ["", "speed, geometric mean of new/old over the metrics both files hold:"]
        lines += [f"  {name:<20} {ratio:.3f}  ({n})" for name, ratio, n in speed]
    counts = d.counts()
    tests = len({r.nodeid for r in d.rows})
    lines += ["", f"{tests} tests compared ({len(d.moved)} moved); metrics: "
              + ", ".join(f"{counts[s]} {s}" for s in
                          ("regressed", "improved", "ok", "invalid", "added", "removed")
                          if counts[s])
              + f"; {len(d.only_old)} tests only in old, {len(d.only_new)} only in new"]
    return lines
