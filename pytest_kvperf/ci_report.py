"""What a CI system sees without this plugin: JUnit XML properties and a pytest warning.

Per test case (`--junitxml`), one property per metric, ``kvperf_metric:<name>`` =
``value=0.0344 baseline=0.0172 verdict=regressed change=+100.0% kind=accuracy
better=lower unit=``, and ``kvperf_verdict`` = the test's verdict (ok, regressed,
improved, new, unreliable, invalid); a regressed one also gets ``kvperf_regression``, the
summary's line. The metrics travel from the test to the controller as one JSON property
(xdist), which is taken out of the XML here.

Per test suite: the GPU (name, key, sm, count), the driver, clocks and power limit (NVML),
the software versions, the speed policy, the verdict counts and ``kvperf_regressed``, the
node ids of the regressed tests, so an XPath or a grep finds them.

A speed regression that does not fail the test (``--kvperf-speed=warn``) also raises a
`KvperfSpeedRegression` warning, which pytest lists in its warnings summary.
"""

from __future__ import annotations

import json

import pytest

from .compare import MetricChange, change_line

PROP_VERDICT = "kvperf_verdict"
PROP_REGRESSION = "kvperf_regression"
METRIC_PREFIX = "kvperf_metric:"


class KvperfSpeedRegression(pytest.PytestWarning):
    """A speed metric regressed against its baseline (reported, not failed: speed policy
    warn). `-W error::pytest_kvperf.ci_report.KvperfSpeedRegression` makes it fail."""


def metric_value(change: MetricChange, unit: str = "") -> str:
    """'value=... baseline=... verdict=... change=... kind=... better=... unit=...'."""
    base = "none" if change.base is None else f"{change.base:.6g}"
    pct = (f"{change.value / change.base - 1:+.1%}" if change.base else "none")
    return (f"value={change.value:.6g} baseline={base} verdict={change.status} change={pct} "
            f"kind={change.kind} better={change.better} unit={unit}")


def testcase_properties(user_properties, metrics_prop: str, drop: tuple[str, ...] = ()
                        ) -> list[tuple[str, str]]:
    """A test report's properties for the XML: the metrics JSON becomes one property per
    metric plus the verdict; properties named in `drop` (internal transport) go."""
    out = []
    for name, value in user_properties:
        if name in drop:
            continue
        if name != metrics_prop:
            out.append((name, value))
            continue
        payload = json.loads(value)
        units = {n: m.get("unit", "") for n, m in payload["metrics"].items()}
        changes = [MetricChange.from_dict(c) for c in payload["changes"]]
        out.append((PROP_VERDICT, payload["verdict"]))
        out.extend((f"{METRIC_PREFIX}{c.name}", metric_value(c, units.get(c.name, "")))
                   for c in changes)
        regressed = [c for c in changes if c.status in ("regressed", "invalid")]
        if regressed:
            out.append((PROP_REGRESSION, "; ".join(change_line(c) for c in regressed)))
    return out


def suite_properties(session, verdict_counts: str) -> list[tuple[str, str]]:
    """The run's environment and outcome, for the <testsuite> element."""
    hw = session.real_hw
    props = [("kvperf_gpu", hw.name), ("kvperf_gpu_key", hw.key), ("kvperf_sm", hw.sm),
             ("kvperf_gpu_count", str(hw.gpu_count))]
    facts = session.gpu_static_facts()
    if facts.get("available"):
        start = facts.get("at_start") or {}
        for name, value in (("driver", facts.get("driver")),
                            ("max_sm_clock_mhz", facts.get("max_sm_clock_mhz")),
                            ("max_mem_clock_mhz", facts.get("max_mem_clock_mhz")),
                            ("sm_clock_mhz_at_start", start.get("sm_clock_mhz")),
                            ("mem_clock_mhz_at_start", start.get("mem_clock_mhz")),
                            ("power_limit_w", facts.get("power_limit_w"))):
            if value is not None:
                props.append((f"kvperf_{name}", str(value)))
    else:
        props.append(("kvperf_gpu_facts", f"absent: {facts.get('reason', '')}"))
    for package, version in sorted(session.recorded_versions().items()):
        props.append((f"kvperf_version:{package}", "none" if version is None else version))
    regressed = sorted(r.nodeid for r in session.results.values() if r.status == "regressed")
    props += [("kvperf_speed_policy", session.speed_policy),
              ("kvperf_verdicts", verdict_counts),
              ("kvperf_regressed_count", str(len(regressed))),
              ("kvperf_regressed", " ".join(regressed))]
    return props


def add_suite_properties(config, props: list[tuple[str, str]]) -> None:
    """Hand the properties to pytest's JUnit writer (only where --junitxml is given; under
    xdist that is the controller). pytest has no public call for this outside a fixture."""
    from _pytest.junitxml import xml_key

    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    for name, value in props:
        xml.add_global_property(name, value)


def speed_regressions(changes, speed_policy: str) -> list[MetricChange]:
    """The regressed speed metrics that do not fail the test (policy warn)."""
    return [c for c in changes
            if c.kind == "speed" and c.status == "regressed" and speed_policy != "fail"]
