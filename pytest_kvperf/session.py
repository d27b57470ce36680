"""One object per pytest run: hardware, baselines, every test's outcome and verdict.

Workers (xdist) and a plain run feed it the same way, from test reports; only the
controller (or the single process) classifies, writes results and updates baselines.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import baselines, ci_report, gpu_facts, jsonfile, provenance, report
from .bench_fixture import BENCHMARK_SELECTION_REASONS
from .compare import (
    MetricChange,
    change_line,
    compare_metrics,
    failure_message,
    mark_unreliable,
)
from .hardware import HardwareProfile, detect, named_profile
from .metric import Metric

# user_properties names: they travel from xdist workers and land in JUnit XML.
PROP_SKIP = "hw_skip_reason"
PROP_GPU = "kvperf_gpu"
PROP_METRICS = "kvperf_metrics"

# The status of a test that ran and passed but recorded no metric: nothing to compare.
# Not "passed", which stood beside pytest's own "passed" (which counts every test that ran).
RAN_NO_METRICS = "ran (no metrics)"

MAX_MESSAGE_CHARS = 4000  # the end of a failure's text: where pytest puts the assertion


SPEED_POLICIES = ("warn", "fail")


def _ini_path(config, name: str) -> str | None:
    """An ini path option, relative to the ini file's folder (None when not set)."""
    value = str(config.getini(name)).strip()
    if not value:
        return None
    base = Path(config.inipath).parent if config.inipath else Path(config.rootpath)
    return str(base / value)


@dataclass
class TestResult:
    nodeid: str
    # passed | failed | error | skipped; "interrupted" until a call report says otherwise
    # (a run stopped mid-test must not count that test as passed)
    outcome: str = "interrupted"
    skip_reason: str = ""
    hw_skip_reason: str = ""
    gpu_key: str = ""
    metrics: dict[str, Metric] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    verdict: str = ""  # new | ok | regressed | improved | invalid (from the comparison)
    changes: list[MetricChange] = field(default_factory=list)
    status: str = ""  # final classification, see classify()
    gpu_facts: dict = field(default_factory=dict)  # kv_bench label -> gpu_facts.window()
    message: str = ""  # a failure's or error's text (the report's longrepr), for the report


def status_of(outcome: str, skip_reason: str, hw_skip_reason: str, verdict: str,
              has_metrics: bool, measured_before: bool) -> str:
    """A test's kvperf status from its outcome, comparison verdict and stored entry."""
    if outcome == "skipped":
        if skip_reason in BENCHMARK_SELECTION_REASONS:
            return "skipped"  # --benchmark-only/-skip select, like -k
        if measured_before:
            return "lost coverage"
        return "n/a" if hw_skip_reason else "skipped"
    if outcome in ("failed", "error", "interrupted"):
        return "regressed" if verdict == "regressed" else outcome
    if has_metrics:
        return verdict or "new"
    return RAN_NO_METRICS


class KvperfSession:
    def __init__(self, config):
        self.config = config
        opt = config.getoption
        self.baseline_dir = Path(
            opt("kvperf_baselines") or _ini_path(config, "kvperf_baselines")
            or Path(config.rootpath) / "baselines"
        )
        self.update = bool(opt("update_baselines"))
        self.speed_policy = (
            opt("kvperf_speed") or str(config.getini("kvperf_speed")).strip() or "warn"
        )
        if self.speed_policy not in SPEED_POLICIES:
            raise pytest.UsageError(
                f"ini option kvperf_speed = {self.speed_policy!r}: use one of "
                + ", ".join(SPEED_POLICIES)
            )
        self.json_path = opt("kvperf_json")
        self.report_path = opt("kvperf_report") or _ini_path(config, "kvperf_report")
        self.hw_spec = opt("kvperf_hw")
        self.results: dict[str, TestResult] = {}
        self.update_lines: list[str] = []
        self._real: HardwareProfile | None = None
        self._decision: HardwareProfile | None = None
        self._files: dict[str, baselines.BaselineFile] = {}
        self._peaks = None
        self._peaks_measured = False
        # named link peaks the session's transfers were divided by, from the tests' reports
        # (so under xdist the controller has the workers' too)
        self.link_peaks: dict[str, float] = {}
        # xdist worker id -> what it ran on (xdist_gpus.worker_gpu_record), controller only
        self.workers: dict[str, dict] = {}
        self._facts_reader = None
        self._static_facts: dict | None = None

    def peaks(self):
        """Measured copy bandwidth and bf16 rate of this GPU, once per session (None on CPU)."""
        if not self._peaks_measured:
            from .peaks import get_peaks

            self._peaks = get_peaks()
            self._peaks_measured = True
        return self._peaks

    def peaks_record(self) -> dict | None:
        """For the run's metadata (results JSON, pytest-benchmark's machine_info): the device
        peaks (under xdist the workers measured and cached them) and, as link_gbps, the
        named link peaks this session's tests used; None when there is neither."""
        from dataclasses import asdict

        from .peaks import default_cache_path, load_cached

        peaks = self._peaks
        if peaks is None and self.real_hw.has_gpu:
            peaks = load_cached(default_cache_path(), self.real_hw.name)
        record = asdict(peaks) if peaks is not None else {}
        if self.link_peaks:
            record["link_gbps"] = dict(sorted(self.link_peaks.items()))
        return record or None

    # -------------------------------------------------------------- GPU facts (NVML)
    def gpu_facts_reader(self):
        """This process's GPU facts reader, opened once: a conftest's or plugin's
        (hook pytest_kvperf_gpu_facts_reader), else NVML on the GPU, else Unavailable."""
        if self._facts_reader is None:
            reader = self.config.hook.pytest_kvperf_gpu_facts_reader(config=self.config)
            if reader is None:
                hw = self.real_hw
                reader = (gpu_facts.open_reader(0) if hw.has_gpu
                          else gpu_facts.Unavailable(f"no CUDA GPU ({hw.why_no_gpu})"))
            self._facts_reader = reader
        return self._facts_reader

    def gpu_static_facts(self) -> dict:
        """{'available': True, driver, name, max clocks, power limit, 'at_start': sample} or
        {'available': False, 'reason': ...}: for the results JSON and JUnit."""
        reader = self.gpu_facts_reader()
        if not reader.available:
            return {"available": False, "reason": reader.reason}
        if self._static_facts is None:
            sample = reader.sample()
            self._static_facts = {"available": True, **reader.static(),
                                  "at_start": sample.as_dict() if sample else None}
        return self._static_facts

    def recorded_versions(self) -> dict:
        """The software a baseline entry is recorded with: packages, CUDA, and the NVIDIA
        driver where NVML reads it (absent, not null, without: the CPU file is unchanged)."""
        versions = dict(self.real_hw.versions)
        facts = self.gpu_static_facts()
        if facts.get("driver"):
            versions["nvidia_driver"] = facts["driver"]
        return versions

    # -------------------------------------------------------------- hardware
    @property
    def real_hw(self) -> HardwareProfile:
        if self._real is None:
            self._real = detect()
        return self._real

    @property
    def decision_hw(self) -> HardwareProfile:
        """The profile skip decisions are made for: --kvperf-hw's, else the real one."""
        if self._decision is None:
            self._decision = named_profile(self.hw_spec) if self.hw_spec else self.real_hw
        return self._decision

    # -------------------------------------------------------------- baselines
    def load_all(self) -> None:
        """Validate every baseline file up front (raises BaselineError)."""
        self._files = baselines.validate_directory(self.baseline_dir)

    def baseline_file(self, key: str) -> Path:
        return self.baseline_dir / f"{key}.json"

    def entry(self, key: str, nodeid: str) -> baselines.Entry | None:
        if key not in self._files:
            self._files[key] = baselines.load(self.baseline_file(key))
        return self._files[key].entries.get(nodeid)

    # -------------------------------------------------------------- in the test's process
    def after_call(self, item, recorder, test_failed: bool) -> str:
        """Compare the test's metrics with its baseline and attach them to its report.

        Returns the failure message when the comparison fails the test, else ''. A test
        that failed by itself gets no second error; an update run accepts new numbers.
        """
        if recorder is None or not (recorder.metrics or recorder.info_values):
            return ""
        key = self.real_hw.key
        entry = self.entry(key, item.nodeid)
        verdict = compare_metrics(entry.metrics if entry else None, recorder.metrics)
        verdict = mark_unreliable(verdict, gpu_facts.unreliable_reason(recorder.timing_windows))
        payload = {
            "metrics": {name: m.to_dict() for name, m in recorder.metrics.items()},
            "info": recorder.info_values,
            "verdict": verdict.status,
            "changes": [c.to_dict() for c in verdict.changes],
            "gpu_facts": recorder.timing_windows,
            "link_peaks": recorder.link_peaks,
        }
        item.user_properties.append((PROP_METRICS, json.dumps(payload)))
        if test_failed or self.update:
            return ""
        slow = ci_report.speed_regressions(verdict.changes, self.speed_policy)
        if slow:  # a green test, so say it where CI logs show warnings too
            warnings.warn(ci_report.KvperfSpeedRegression(
                f"speed regressed against {self.baseline_file(key)} (not failed: "
                f"--kvperf-speed=warn): " + "; ".join(change_line(c) for c in slow)), stacklevel=2)
        return failure_message(item.nodeid, verdict, self.baseline_file(key), self.speed_policy)

    # -------------------------------------------------------------- reports
    def on_report(self, report) -> None:
        result = self.results.setdefault(report.nodeid, TestResult(report.nodeid))
        props = dict(report.user_properties)
        result.gpu_key = props.get(PROP_GPU, result.gpu_key)
        if PROP_SKIP in props:
            result.hw_skip_reason = props[PROP_SKIP]
        if PROP_METRICS in props:
            payload = json.loads(props[PROP_METRICS])
            result.metrics = {k: Metric.from_dict(m) for k, m in payload["metrics"].items()}
            result.info = payload["info"]
            result.verdict = payload["verdict"]
            result.changes = [MetricChange.from_dict(c) for c in payload["changes"]]
            result.gpu_facts = payload.get("gpu_facts", {})
            self.link_peaks.update(payload.get("link_peaks") or {})
        if report.skipped:
            result.outcome = "skipped"
            longrepr = report.longrepr
            text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            result.skip_reason = text.removeprefix("Skipped: ")
        elif report.failed:
            result.outcome = "failed" if report.when == "call" else "error"
            result.message = report.longreprtext[-MAX_MESSAGE_CHARS:]
        elif report.when == "call" and result.outcome not in ("failed", "error"):
            result.outcome = "passed"

    def classify(self) -> None:
        """ok / regressed / improved / new / ran (no metrics) / n/a / lost coverage / skipped /
        failed, per test."""
        for result in self.results.values():
            entry = self.entry(result.gpu_key, result.nodeid) if result.gpu_key else None
            result.status = status_of(result.outcome, result.skip_reason,
                                      result.hw_skip_reason, result.verdict,
                                      bool(result.metrics), bool(entry and entry.measured))

    # -------------------------------------------------------------- update
    def baseline_updates(self) -> dict[str, dict[str, baselines.Entry]]:
        """{gpu key: {node id: new entry}}: passed tests' metrics, and n/a for hw skips."""
        versions = self.recorded_versions()
        updates: dict[str, dict[str, baselines.Entry]] = defaultdict(dict)
        for r in self.results.values():
            if not r.gpu_key:
                continue
            if r.outcome == "passed" and r.metrics:
                updates[r.gpu_key][r.nodeid] = baselines.measured_entry(r.metrics, versions,
                                                                        r.gpu_facts)
            elif r.outcome == "skipped" and r.hw_skip_reason and not self.hw_spec:
                # (an injected profile's reasons describe another machine: never stored)
                entry = self.entry(r.gpu_key, r.nodeid)
                # A test that was measured before and now skips keeps its numbers:
                # that is lost coverage to look at, not a fact to record.
                if entry is None or not entry.measured:
                    updates[r.gpu_key][r.nodeid] = baselines.not_applicable_entry(
                        r.hw_skip_reason, versions
                    )
        return updates

    def write_baselines(self) -> None:
        for key, updates in sorted(self.baseline_updates().items()):
            gpu = {"key": key}
            if key == self.real_hw.key:
                gpu.update(name=self.real_hw.name, sm=self.real_hw.sm)
            path = self.baseline_file(key)
            update = baselines.apply_updates(path, gpu, updates)
            self.update_lines.extend(report.describe_update(path, update))

    # -------------------------------------------------------------- output
    def results_document(self) -> dict:
        counts = Counter(r.status for r in self.results.values())
        return {
            "hardware": self.real_hw.as_dict(),
            "decision_profile": self.decision_hw.as_dict() if self.hw_spec else None,
            "peaks": self.peaks_record(),
            "gpu_facts": self.gpu_static_facts(),
            "summary": dict(sorted(counts.items())),
            "run": provenance.run_facts(self.config.rootpath),
            "workers": dict(sorted(self.workers.items())) or None,
            "tests": {
                r.nodeid: {
                    "outcome": r.outcome,
                    "status": r.status,
                    "hw_skip_reason": r.hw_skip_reason or None,
                    "skip_reason": r.skip_reason or None,
                    "gpu_key": r.gpu_key or None,
                    "metrics": {name: m.to_dict() for name, m in r.metrics.items()},
                    "changes": [c.to_dict() for c in r.changes],
                    "info": r.info,
                    "gpu_facts": r.gpu_facts or None,
                    "message": r.message or None,
                }
                for r in sorted(self.results.values(), key=lambda r: r.nodeid)
            },
        }

    def write_json(self, path: str | Path) -> None:
        jsonfile.write(path, self.results_document())

    def skip_groups(self) -> dict[str, list[str]]:
        """Skipped tests by reason, the largest group first."""
        groups: dict[str, list[str]] = defaultdict(list)
        for r in self.results.values():
            if r.outcome == "skipped":
                groups[r.hw_skip_reason or f"(not hardware) {r.skip_reason}"].append(r.nodeid)
        return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))
