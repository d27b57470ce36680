"""The `kvperf` fixture: what a test records for the baseline comparison.

Recording is not asserting: a test keeps its hard thresholds as asserts and records
the numbers so that drift against the stored baseline is caught as well.
"""

from __future__ import annotations

import math

import pytest

from .accuracy import ERROR_DOMAINS, ERROR_RTOL, RATE_ATOL, RELATIVE_FLOOR, errors_and_floors
from .metric import DIRECTIONS, Metric, MetricError, Spread


class MetricRecorder:
    def __init__(self, item: pytest.Item):
        self.item = item
        self.metrics: dict[str, Metric] = {}
        self.info_values: dict[str, object] = {}
        self.timing_windows: dict[str, dict] = {}  # kv_bench label -> gpu_facts.window()
        self.link_peaks: dict[str, float] = {}  # named link peak -> GB/s a transfer used

    def _record(self, kind: str, name: str, value, better: str, rtol: float, atol: float,
                **fields) -> float:
        if better not in DIRECTIONS:
            raise ValueError(f"metric {name!r}: better must be one of {DIRECTIONS}, got {better!r}")
        if isinstance(value, bool):
            raise TypeError(f"metric {name!r}: expected a number, got a bool")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {name!r}: expected a number, got {value!r}") from None
        if not math.isfinite(value):
            raise AssertionError(f"metric {name!r} is {value}: NaN or Inf never pass")
        if name in self.metrics:
            raise ValueError(f"metric {name!r} recorded twice in one test")
        try:
            self.metrics[name] = Metric(value, kind, better, rtol, atol, **fields)
        except MetricError as exc:
            raise ValueError(f"metric {name!r}: {exc}") from None
        return value

    def accuracy(self, name: str, value, *, better: str, rtol: float | None = None,
                 atol: float | None = None, domain=None) -> float:
        """An accuracy metric; a regression beyond rtol*|base| + atol fails the test.

        Defaults, so that a realistic regression fails: better="lower" (an error or a
        distance) rtol 0.5, atol 1e-12, failing at 1.5x; better="higher" (a rate or a
        score in [0, 1]) rtol 0, atol 0.02, failing 0.02 below. Give rtol for other
        scales. domain=(low, high) (None: unbounded) declares where a value can lie;
        error() and rate() declare it for you.
        """
        default_rtol, default_atol = (ERROR_RTOL, RELATIVE_FLOOR) if better == "lower" else (
            0.0, RATE_ATOL)
        return self._record("accuracy", name, value, better,
                            default_rtol if rtol is None else rtol,
                            default_atol if atol is None else atol, domain=domain)

    def error(self, name: str, value, *, rtol: float = ERROR_RTOL,
              atol: float = RELATIVE_FLOOR) -> float:
        """An error or distance (>= 0, lower is better); fails above base*(1+rtol) + atol."""
        return self.accuracy(name, value, better="lower", rtol=rtol, atol=atol,
                             domain=(0.0, None))

    def rate(self, name: str, value, *, atol: float = RATE_ATOL) -> float:
        """A fraction in [0, 1], higher is better (token match, task accuracy); a drop of
        more than atol below the baseline fails."""
        return self.accuracy(name, value, better="higher", rtol=0.0, atol=atol,
                             domain=(0.0, 1.0))

    def speed(self, name: str, value, *, better: str, unit: str = "us", rtol: float | None = None,
              atol: float = 0.0, spread: Spread | None = None) -> float:
        """A speed metric; a regression follows --kvperf-speed (warn or fail).

        `spread` (the distribution of the value over the timed rounds) lets the noise-aware
        verdict judge the change instead of a plain tolerance.
        """
        if rtol is None:
            rtol = self.speed_tolerance()
        return self._record("speed", name, value, better, rtol, atol, unit=unit,
                            domain=(0.0, None), spread=spread)  # times and rates are >= 0

    def speed_tolerance(self) -> float:
        marker = self.item.get_closest_marker("kvperf_tolerance")
        return float(marker.args[0]) if marker else 0.05

    def info(self, name: str, value) -> None:
        """Context for the report (which backend ran, shapes); stored, never compared."""
        self.info_values[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    def timing_window(self, label: str, window: dict) -> None:
        """The GPU's state around one kv_bench timing (gpu_facts.window); stored with the
        baseline, and a throttled one makes the test's speed verdict unreliable."""
        self.timing_windows[label] = window

    def link_peak(self, name: str, gbps: float) -> None:
        """The named link peak (named_peaks LINK_PEAKS, PEER_PEAKS) a kv_bench transfer was
        divided by; the session lists those its tests used with its peaks (results JSON,
        machine_info)."""
        self.link_peaks[name] = float(gbps)

    def errors(self, out, ref, *, prefix: str = "", rtol: float = ERROR_RTOL) -> dict[str, float]:
        """Record max_abs_err, rel_l2_err and cosine_distance of `out` against `ref`.

        Each fails above base*(1+rtol) + a floor of float64 rounding (a relative error of
        1e-12, see accuracy.py). Returns those and the cosine, for hard asserts. NaN/Inf
        in out fail.
        """
        values, floors = errors_and_floors(out, ref)
        for name, domain in ERROR_DOMAINS.items():
            self.accuracy(prefix + name, values[name], better="lower", rtol=rtol,
                          atol=floors[name], domain=domain)
        return values

    def skip(self, reason: str) -> None:
        """Skip as not applicable on this hardware/software, with the reason recorded."""
        self.item.user_properties.append(("hw_skip_reason", reason))
        pytest.skip(f"hw_skip_reason: {reason}")
