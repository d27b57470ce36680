"""The `kvperf` fixture: what a test records for the baseline comparison.

Recording is not asserting: a test keeps its hard thresholds as asserts and records
the numbers so that drift against the stored baseline is caught as well.
"""

from __future__ import annotations

import math

import pytest

from .metric import DIRECTIONS, Metric, MetricError, Spread


class MetricRecorder:
    def __init__(self, item: pytest.Item):
        self.item = item
        self.metrics: dict[str, Metric] = {}
        self.info_values: dict[str, object] = {}

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

    def accuracy(self, name: str, value, *, better: str, rtol: float = 0.05,
                 atol: float = 0.0) -> float:
        """An accuracy metric; a regression beyond rtol*|base|+atol fails the test."""
        return self._record("accuracy", name, value, better, rtol, atol, unit="")

    def speed(self, name: str, value, *, better: str, unit: str = "us", rtol: float | None = None,
              atol: float = 0.0, spread: Spread | None = None) -> float:
        """A speed metric; a regression follows --kvperf-speed (warn or fail).

        `spread` (the distribution of the value over the timed rounds) lets the noise-aware
        verdict judge the change instead of a plain tolerance.
        """
        if rtol is None:
            rtol = self.speed_tolerance()
        return self._record("speed", name, value, better, rtol, atol, unit=unit, spread=spread)

    def speed_tolerance(self) -> float:
        marker = self.item.get_closest_marker("kvperf_tolerance")
        return float(marker.args[0]) if marker else 0.05

    def info(self, name: str, value) -> None:
        """Context for the report (which backend ran, shapes); stored, never compared."""
        self.info_values[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    def errors(self, out, ref, *, prefix: str = "", rtol: float = 0.05,
               atol: float = 0.0) -> dict[str, float]:
        """Record max_abs_err, rel_l2_err and cosine of `out` against `ref`; NaN/Inf fail."""
        from .accuracy import error_metrics

        values = error_metrics(out, ref)
        for name, value in values.items():
            self.accuracy(prefix + name, value, better="higher" if name == "cosine" else "lower",
                          rtol=rtol, atol=atol)
        return values

    def skip(self, reason: str) -> None:
        """Skip as not applicable on this hardware/software, with the reason recorded."""
        self.item.user_properties.append(("hw_skip_reason", reason))
        pytest.skip(f"hw_skip_reason: {reason}")
