"""One recorded metric, as it flows from the recorder through the comparison into the baseline.

Built once, by the recorder, and never changed. ``to_dict``/``from_dict`` are its only
(de)serialisation, used for the results JSON, the xdist user_properties and the baseline
file, so the metric's schema and its checks are written here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .stats import quartiles, thin

KINDS = ("accuracy", "speed")
DIRECTIONS = ("higher", "lower")
MAX_SPREAD_SAMPLES = 400  # enough for the bootstrap; keeps reports and JUnit small


class MetricError(ValueError):
    """A metric that cannot be; ``field`` names the part that is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _number(field: str, value, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetricError(field, f"expected a number, found {value!r}")
    if not math.isfinite(value):
        raise MetricError(field, f"expected a finite number, found {value!r}")
    return float(value)


def _fields(data, cls, required: tuple[str, ...], where: str = "") -> dict:
    if not isinstance(data, dict):
        raise MetricError(where or "metric", f"expected an object, found {type(data).__name__}")
    missing = [f for f in required if f not in data]
    if missing:
        raise MetricError(where + missing[0], "missing")
    unknown = sorted(set(data) - set(cls.__dataclass_fields__))
    if unknown:
        raise MetricError(where + unknown[0], "unknown field")
    return data


def _set_float(obj, name: str, where: str = "") -> float:
    value = _number(where + name, getattr(obj, name))
    object.__setattr__(obj, name, value)  # 1 and 1.0 must serialise alike
    return value


def format_domain(domain: tuple[float | None, float | None]) -> str:
    lo, hi = domain
    return f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"


def in_domain(value: float, domain: tuple[float | None, float | None] | None) -> bool:
    if domain is None:
        return True
    lo, hi = domain
    return (lo is None or value >= lo) and (hi is None or value <= hi)


@dataclass(frozen=True)
class Spread:
    """The distribution of a speed metric's own value: quartiles, rounds, thinned samples."""

    median: float
    q1: float
    q3: float
    n: int
    samples: tuple[float, ...] = ()

    def __post_init__(self):
        for name in ("median", "q1", "q3"):
            _set_float(self, name, "spread.")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise MetricError("spread.n", f"expected an int >= 1, found {self.n!r}")
        if not self.q1 <= self.median <= self.q3:
            raise MetricError("spread", f"needs q1 <= median <= q3, found "
                                        f"{self.q1}, {self.median}, {self.q3}")
        object.__setattr__(self, "samples", tuple(_number("spread.samples", x)
                                                  for x in self.samples))

    @classmethod
    def of(cls, samples) -> Spread:
        q1, med, q3 = quartiles(samples)
        return cls(med, q1, q3, len(samples), tuple(thin(samples, MAX_SPREAD_SAMPLES)))

    def to_dict(self) -> dict:
        out = {"median": self.median, "q1": self.q1, "q3": self.q3, "n": self.n}
        if self.samples:
            out["samples"] = list(self.samples)
        return out

    @classmethod
    def from_dict(cls, data) -> Spread:
        d = _fields(data, cls, ("median", "q1", "q3", "n"), "spread.")
        samples = d.get("samples", ())
        if not isinstance(samples, (list, tuple)):
            raise MetricError("spread.samples", f"expected a list, found {samples!r}")
        return cls(d["median"], d["q1"], d["q3"], d["n"], tuple(samples))


@dataclass(frozen=True)
class Metric:
    """A recorded number with what it takes to judge it against a stored one.

    domain: the closed interval [lo, hi] (None: unbounded on that side) where the value
    can lie at all, e.g. [0, None] for an error, [0, 1] for a rate; None when unknown.
    """

    value: float
    kind: str
    better: str
    rtol: float
    atol: float
    unit: str = ""
    domain: tuple[float | None, float | None] | None = None
    spread: Spread | None = None

    def __post_init__(self):
        _set_float(self, "value")
        if self.kind not in KINDS:
            raise MetricError("kind", f"unknown kind {self.kind!r} (expected one of {KINDS})")
        if self.better not in DIRECTIONS:
            raise MetricError("better", f"unknown metric direction {self.better!r} "
                                        f"(expected one of {DIRECTIONS})")
        for name in ("rtol", "atol"):
            if _set_float(self, name) < 0:
                raise MetricError(name, f"must be >= 0, found {getattr(self, name)}")
        if not isinstance(self.unit, str):
            raise MetricError("unit", f"expected a string, found {self.unit!r}")
        if self.domain is not None:
            if not (isinstance(self.domain, (tuple, list)) and len(self.domain) == 2):
                raise MetricError("domain", f"expected [low, high], found {self.domain!r}")
            lo, hi = (_number("domain", b, allow_none=True) for b in self.domain)
            if lo is not None and hi is not None and lo > hi:
                raise MetricError("domain", f"low {lo} > high {hi}")
            object.__setattr__(self, "domain", (lo, hi))
            if not in_domain(self.value, self.domain):
                raise MetricError("value", f"{self.value!r} is outside the metric's domain "
                                           f"{format_domain(self.domain)}")

    def stored(self) -> Metric:
        """What a baseline keeps: the spread's quartiles and n, not its samples."""
        if self.spread is None or not self.spread.samples:
            return self
        return replace(self, spread=replace(self.spread, samples=()))

    def to_dict(self) -> dict:
        out = {"value": self.value, "kind": self.kind, "better": self.better,
               "rtol": self.rtol, "atol": self.atol, "unit": self.unit}
        if self.domain is not None:
            out["domain"] = list(self.domain)
        if self.spread is not None:
            out["spread"] = self.spread.to_dict()
        return out

    @classmethod
    def from_dict(cls, data) -> Metric:
        """The inverse of to_dict; raises MetricError naming the field that is wrong."""
        d = _fields(data, cls, ("value", "kind", "better"))
        domain = d.get("domain")
        if domain is not None and not isinstance(domain, list):
            raise MetricError("domain", f"expected [low, high], found {domain!r}")
        spread = Spread.from_dict(d["spread"]) if d.get("spread") is not None else None
        return cls(d["value"], d["kind"], d["better"], d.get("rtol", 0.0), d.get("atol", 0.0),
                   d.get("unit", ""), tuple(domain) if domain is not None else None, spread)
