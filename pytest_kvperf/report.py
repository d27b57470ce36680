"""Terminal summary: what ran, how it compares with the baseline, what skipped and why."""

from __future__ import annotations

from collections import Counter

from .compare import MetricChange, change_line, format_change
from .xdist_gpus import describe_workers

STATUS_ORDER = (
    "invalid", "regressed", "failed", "error", "interrupted", "lost coverage", "unreliable",
    "improved", "new",
    "ok", "ran (no metrics)", "n/a", "skipped",
)


def verdict_counts(session) -> str:
    """'3 regressed, 10 ok, 2 skipped': each status's count, in STATUS_ORDER."""
    counts = Counter(r.status for r in session.results.values())
    return ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if counts[s])


def key_metric(result) -> MetricChange | None:
    """The one change to show per test: a failing one first, else the first speed metric."""
    if not result.changes:
        return None
    for change in result.changes:
        if change.status in ("invalid", "regressed"):
            return change
    speed = [c for c in result.changes if c.kind == "speed"]
    return (speed or result.changes)[0]


def describe_update(path, update) -> list[str]:
    """The update summary of one baseline file (a baselines.Update)."""
    if not update.written:
        return [f"{path}: unchanged (no number changed)"]
    lines = [f"{path}: {len(update.changed)} entries written"]
    before, after = update.versions
    for name in sorted(set(before) | set(after)):
        if before and before.get(name) != after.get(name):
            lines.append(f"versions: {name} {before.get(name)} -> {after.get(name)}")
    for nodeid, (old, new) in sorted(update.changed.items()):
        lines.extend(describe_change(nodeid, old, new))
    return lines


def describe_change(nodeid: str, old, new) -> list[str]:
    """Lines 'node: metric old -> new (+x%)' for the update summary (baselines.Entry)."""
    if not new.measured:
        return [f"{nodeid}: n/a ({new.hw_skip_reason})"]
    old_metrics = old.metrics if old else {}
    lines = []
    for name, metric in sorted(new.metrics.items()):
        prev = old_metrics.get(name)
        if prev is None:
            lines.append(f"{nodeid}: {name} new = {metric.value:.6g}")
        else:
            lines.append(f"{nodeid}: {name} {format_change(prev.value, metric.value)}")
    for name in sorted(set(old_metrics) - set(new.metrics)):
        lines.append(f"{nodeid}: {name} removed (was {old_metrics[name].value:.6g})")
    return lines


def terminal_summary(tr, session) -> None:
    if not session.results:
        return
    tr.write_sep("=", "kvperf summary")
    hw = session.real_hw
    tr.write_line(f"hardware: {hw.describe()}   baseline file: {session.baseline_file(hw.key)}")
    tr.write_line(f"verdicts: {verdict_counts(session)}")
    if session.workers:
        tr.write_line(f"xdist workers: {describe_workers(session.workers)}")
    verbose = tr.config.getoption("verbose") > 0
    compared = [r for r in session.results.values() if r.changes]
    if not verbose:  # an unchanged test is a count above; -v lists it too
        compared = [r for r in compared if r.status != "ok"]
    if compared:
        tr.write_line("")
        tr.write_line(f"{'verdict':<10} {'test':<60} key metric: baseline -> now")
        rank = {s: i for i, s in enumerate(STATUS_ORDER)}
        for r in sorted(compared, key=lambda r: (rank.get(r.status, 99), r.nodeid)):
            change = key_metric(r)
            tr.write_line(f"{r.status:<10} {r.nodeid:<60} {change_line(change)}")
    lost = [r.nodeid for r in session.results.values() if r.status == "lost coverage"]
    if lost:
        tr.write_line("")
        tr.write_line(f"lost coverage: {len(lost)} tests have baseline numbers but did not run:")
        for nodeid in sorted(lost):
            r = session.results[nodeid]
            tr.write_line(f"  {nodeid}: {r.hw_skip_reason or r.skip_reason}")
    groups = session.skip_groups()
    if groups:
        tr.write_line("")
        tr.write_line("skipped, grouped by reason:")
        for reason, nodeids in groups.items():
            tr.write_line(f"  {len(nodeids):4d} x {reason}")
    if session.update_lines:
        tr.write_line("")
        tr.write_line("baselines updated (old -> new):")
        for line in session.update_lines:
            tr.write_line(f"  {line}")
