"""A test's metrics against its stored baseline entry: each metric's change, and what fails.

Accuracy metrics and speed metrics without a spread on both sides are judged by the plain
tolerance ``rtol*|base| + atol``; speed metrics with spreads by the noise-aware verdict
(``verdict.judge_speed_metric``). A stored value outside the domain this run declares
for the metric is ``invalid``: the file is wrong, and that fails the test too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

from .metric import Metric, format_domain, in_domain
from .verdict import RatioInterval, judge_speed_metric

# worst first: a test's verdict is its worst metric's status. "unreliable": a speed metric
# timed while the GPU throttled (gpu_facts): not judged, never failing, above improved so
# that a test with an unreliable timing is not reported as sped up.
_RANK = {"invalid": 5, "regressed": 4, "unreliable": 3, "improved": 2, "ok": 1, "new": 0}


@dataclass(frozen=True)
class MetricChange:
    name: str
    kind: str
    better: str
    value: float
    base: float | None
    status: str  # ok | regressed | improved | new | invalid | unreliable
    rtol: float = 0.0
    atol: float = 0.0
    detail: str = ""
    ci: RatioInterval | None = None  # the speed verdict's interval of the median ratio

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["ci"] = self.ci.to_dict() if self.ci is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> MetricChange:
        """The inverse of to_dict; a results JSON written before 'ci' existed reads as None."""
        ci = data.get("ci")
        return cls(**{**data, "ci": RatioInterval.from_dict(ci) if ci is not None else None})


class Judgement(NamedTuple):
    status: str
    detail: str
    ci: RatioInterval | None = None


@dataclass(frozen=True)
class TestVerdict:
    __test__ = False  # not a pytest test class

    status: str  # new | ok | regressed | improved | invalid | unreliable
    changes: tuple[MetricChange, ...] = ()


def format_change(base: float, value: float) -> str:
    """'0.01 -> 0.02 (+100.0%)': the one way a change is written, in summaries and reports."""
    pct = f" ({value / base - 1:+.1%})" if base else ""
    return f"{base:.6g} -> {value:.6g}{pct}"


def change_line(change: MetricChange) -> str:
    """'max_abs_err 0.01 -> 0.02 (+100.0%) [accuracy, lower is better; rtol 0.5, atol 0]'."""
    c = change
    text = f"{c.name} " + (f"{c.value:.6g} (new)" if c.base is None
                           else format_change(c.base, c.value))
    text += f" [{c.kind}, {c.better} is better; rtol {c.rtol:g}, atol {c.atol:g}]"
    return f"{text} {c.detail}" if c.detail else text


def compare_value(value: float, base: float, better: str, rtol: float, atol: float) -> str:
    """ok / regressed / improved for one metric: outside rtol*|base| + atol in either direction."""
    slack = rtol * abs(base) + atol
    worse = value > base + slack if better == "lower" else value < base - slack
    if worse:
        return "regressed"
    better_by = value < base - slack if better == "lower" else value > base + slack
    return "improved" if better_by else "ok"


def judge(base: Metric, metric: Metric) -> Judgement:
    """(status, detail, ci) of one metric against its stored counterpart; ci only for a
    speed metric with a spread on both sides."""
    if not in_domain(base.value, metric.domain):
        return Judgement("invalid", f"stored value {base.value!r} is outside the metric's "
                         f"domain {format_domain(metric.domain)}: the baseline file is wrong")
    if metric.kind == "speed" and base.spread is not None and metric.spread is not None:
        return Judgement(*judge_speed_metric(base, metric))
    status = compare_value(metric.value, base.value, metric.better, metric.rtol, metric.atol)
    if metric.kind == "speed":
        return Judgement(status, "no spread recorded on both sides: plain tolerance "
                         f"rtol={metric.rtol}")
    return Judgement(status, "")


def compare_metrics(base_metrics: Mapping[str, Metric] | None,
                    metrics: Mapping[str, Metric]) -> TestVerdict:
    """This run's metrics against the stored ones (None or empty: nothing stored)."""
    base_metrics = base_metrics or {}
    changes = []
    for name, metric in metrics.items():
        base = base_metrics.get(name)
        j = Judgement("new", "") if base is None else judge(base, metric)
        changes.append(MetricChange(name, metric.kind, metric.better, metric.value,
                                    None if base is None else base.value, j.status,
                                    metric.rtol, metric.atol, j.detail, j.ci))
    if not base_metrics:
        return TestVerdict("new", tuple(changes))
    return TestVerdict(_worst(changes), tuple(changes))


def _worst(changes) -> str:
    compared = [c.status for c in changes if c.status != "new"]
    return max(compared, key=_RANK.__getitem__) if compared else "new"


def mark_unreliable(verdict: TestVerdict, reason: str) -> TestVerdict:
    """The speed metrics of a timing during which the GPU throttled: 'unreliable' instead of
    ok / regressed / improved (what they would have been is kept in the detail)."""
    if not reason:
        return verdict
    changes = tuple(
        replace(c, status="unreliable", detail=f"{reason}; would be {c.status}"
                + (f" ({c.detail})" if c.detail else ""))
        if c.kind == "speed" and c.status in ("ok", "regressed", "improved") else c
        for c in verdict.changes)
    return TestVerdict(verdict.status if verdict.status == "new" else _worst(changes), changes)


def failing_changes(verdict: TestVerdict, speed_policy: str) -> list[MetricChange]:
    """What fails the test: accuracy regressions, invalid baselines, speed with 'fail'."""
    return [c for c in verdict.changes
            if c.status == "invalid"
            or (c.status == "regressed" and (c.kind == "accuracy" or speed_policy == "fail"))]


def failure_message(nodeid: str, verdict: TestVerdict, baseline_file, speed_policy: str) -> str:
    """The short text a failing comparison gives the test; '' when nothing fails."""
    failures = failing_changes(verdict, speed_policy)
    if not failures:
        return ""
    lines = [f"{nodeid} regressed against baseline {baseline_file}:"]
    lines += [f"  {change_line(c)}" for c in failures]
    lines.append("if intended: review the change, then rerun with --update-baselines")
    return "\n".join(lines)
