"""Metrics derived from a Timing's median: GB/s, TFLOP/s, tokens/s and fractions of peak.

All rates use the median per-call time. ``frac_of_peak_bw`` compares with the measured
device-to-device copy bandwidth (bytes read + written, see peaks.py), so callers pass
bytes_moved = bytes read + bytes written by one call; a transfer over a host link passes
its own named peak instead (``bw_peak_gbps``, named_peaks.py: bytes crossing the link).
It can exceed 1 when the working set is served from L2 (no flush_l2), which is itself
worth seeing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Derived:
    time_us: float
    gbps: float | None = None
    frac_of_peak_bw: float | None = None
    tflops: float | None = None
    frac_of_peak_flops: float | None = None
    tokens_per_s: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The computed metrics only (None dropped), e.g. for extra_info."""
        return {k: v for k, v in asdict(self).items() if v is not None}


_COPY_PEAK = object()  # derive's default: divide by the device copy peak


def gbps(bytes_moved: float, time_us: float) -> float:
    """Decimal GB/s (1e9 bytes per second), the unit HBM bandwidth is quoted in."""
    return _amount(bytes_moved, "bytes_moved") / _time(time_us) / 1e3


def tflops(flops: float, time_us: float) -> float:
    return _amount(flops, "flops") / _time(time_us) / 1e6


def tokens_per_s(tokens: float, time_us: float) -> float:
    return _amount(tokens, "tokens") / _time(time_us) * 1e6


def derive(timing: Any, *, bytes_moved: float | None = None, flops: float | None = None,
           tokens: float | None = None, peaks: Any = None,
           bw_peak_gbps: Any = _COPY_PEAK) -> Derived:
    """Derived metrics for a Timing (or a median time in microseconds).

    peaks: a peaks.Peaks (or None on a CPU / when unknown: fractions stay None).
    bw_peak_gbps: the GB/s frac_of_peak_bw divides by (None: no fraction); by default the
        device copy peak of ``peaks``.
    """
    t = _time(timing.median_us if hasattr(timing, "median_us") else timing)
    bw = gbps(bytes_moved, t) if bytes_moved is not None else None
    tf = tflops(flops, t) if flops is not None else None
    return Derived(
        time_us=t,
        gbps=bw,
        frac_of_peak_bw=_fraction(bw, getattr(peaks, "copy_gbps", None)
                                  if bw_peak_gbps is _COPY_PEAK else bw_peak_gbps),
        tflops=tf,
        frac_of_peak_flops=_fraction(tf, getattr(peaks, "bf16_tflops", None)),
        tokens_per_s=tokens_per_s(tokens, t) if tokens is not None else None,
    )


def _fraction(value: float | None, peak: float | None) -> float | None:
    if value is None or peak is None or not (math.isfinite(peak) and peak > 0):
        return None
    return value / peak


def _amount(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(x).__name__}")
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{what} must be finite and >= 0, got {x!r}")
    return float(x)


def _time(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"time must be a number of microseconds, got {type(t).__name__}")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"time must be finite and > 0 microseconds, got {t!r}")
    return float(t)
