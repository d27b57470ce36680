"""GPU facts from NVML (nvidia-ml-py): driver, clocks, and power/thermal throttling while
`kv_bench` times.

A reader gives the GPU's fixed facts once (`static()`: driver, maximum clocks, power limit)
and a `sample()` at the start and at the end of each timing (clocks, throttle reasons,
the power and thermal violation counters, temperature, power). `window(before, after)`
turns the two samples into what is stored with the test: a timing during which the GPU
was power- or thermal-limited (a throttle reason at either end, or a violation counter
that advanced in between) is `throttled`, and its speed verdict is "unreliable".

Without nvidia-ml-py, without an NVIDIA driver or without a CUDA GPU the reader is
`Unavailable(reason)`: the facts are absent, with that reason, and nothing fails. Tests
(and users with another source) give their own reader through the
`pytest_kvperf_gpu_facts_reader` hook (hookspec.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Protocol

# nvmlClocksEventReason* bits (formerly nvmlClocksThrottleReason*), by their meaning
REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# The reasons that mean power or thermal limits lowered the clocks (idle, application
# clocks, sync boost and display settings do not make a timing unreliable).
THROTTLING = frozenset({"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown",
                        "hw_thermal_slowdown", "hw_power_brake_slowdown"})


def reason_names(mask: int) -> tuple[str, ...]:
    names = tuple(name for bit, name in REASON_BITS.items() if mask & bit)
    rest = mask & ~sum(REASON_BITS)
    return names + ((f"other_0x{rest:x}",) if rest else ())


@dataclass(frozen=True)
class Sample:
    """The GPU at one moment; None where NVML does not report it on this GPU."""

    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    reasons: tuple[str, ...]  # reason_names() of the clocks-event mask
    power_violation_ns: int | None  # NVML's cumulative time under a power limit
    thermal_violation_ns: int | None  # ... under a thermal limit
    temperature_c: int | None = None
    power_w: float | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out


class Reader(Protocol):
    available: bool

    def static(self) -> dict: ...  # driver, name, max clocks, power limit

    def sample(self) -> Sample | None: ...  # None when a read failed mid-run


@dataclass(frozen=True)
class Unavailable:
    """No facts, and why ("nvidia-ml-py is not installed", "NVML: Driver Not Loaded", ...)."""

    reason: str
    available: bool = False

    def static(self) -> dict:
        return {}

    def sample(self) -> Sample | None:
        return None


class NvmlReader:
    """One GPU through nvidia-ml-py (`import pynvml`)."""

    available = True

    def __init__(self, pynvml, handle):
        self.nvml = pynvml
        self.handle = handle
        self._static: dict | None = None

    def _get(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError:  # not supported on this GPU / this driver
            return None

    def _violation_ns(self, policy) -> int | None:
        status = self._get(self.nvml.nvmlDeviceGetViolationStatus, policy)
        return None if status is None else int(status.violationTime)

    def static(self) -> dict:
        if self._static is None:
            nv = self.nvml
            driver = nv.nvmlSystemGetDriverVersion()
            name = self._get(nv.nvmlDeviceGetName)
            limit_mw = self._get(nv.nvmlDeviceGetEnforcedPowerLimit)
            self._static = {
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "name": name.decode() if isinstance(name, bytes) else name,
                "max_sm_clock_mhz": self._get(nv.nvmlDeviceGetMaxClockInfo, nv.NVML_CLOCK_SM),
                "max_mem_clock_mhz": self._get(nv.nvmlDeviceGetMaxClockInfo, nv.NVML_CLOCK_MEM),
                "power_limit_w": None if limit_mw is None else limit_mw / 1000,
            }
        return self._static

    def sample(self) -> Sample | None:
        nv = self.nvml
        reasons_fn = (getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
                      or nv.nvmlDeviceGetCurrentClocksThrottleReasons)  # (older bindings)
        mask = self._get(reasons_fn)
        power_mw = self._get(nv.nvmlDeviceGetPowerUsage)
        return Sample(
            sm_clock_mhz=self._get(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM),
            mem_clock_mhz=self._get(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_MEM),
            reasons=reason_names(mask) if mask is not None else ("unknown",),
            power_violation_ns=self._violation_ns(nv.NVML_PERF_POLICY_POWER),
            thermal_violation_ns=self._violation_ns(nv.NVML_PERF_POLICY_THERMAL),
            temperature_c=self._get(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU),
            power_w=None if power_mw is None else power_mw / 1000,
        )


def _torch_device_ids(index: int) -> tuple[str | None, str | None]:
    """(NVML UUID, PCI bus id) of torch's CUDA device `index`: under CUDA_VISIBLE_DEVICES
    (xdist workers) torch's index 0 is not NVML's index 0."""
    try:
        import torch

        props = torch.cuda.get_device_properties(index)
    except Exception:  # no torch, no CUDA: NVML's own index is all there is
        return None, None
    uuid = getattr(props, "uuid", None)
    uuid = f"GPU-{uuid}" if uuid is not None and not str(uuid).startswith("GPU-") else uuid
    bus = None
    if hasattr(props, "pci_bus_id"):
        bus = (f"{getattr(props, 'pci_domain_id', 0):08X}:{props.pci_bus_id:02X}:"
               f"{getattr(props, 'pci_device_id', 0):02X}.0")
    return (str(uuid) if uuid else None), bus


def open_reader(device_index: int = 0) -> NvmlReader | Unavailable:
    """A reader for torch's CUDA device `device_index`, or Unavailable with the reason."""
    try:
        import pynvml
    except ImportError:
        return Unavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Unavailable(f"NVML cannot start: {exc}")
    except Exception as exc:  # an old or broken binding
        return Unavailable(f"NVML cannot start: {type(exc).__name__}: {exc}")
    uuid, bus = _torch_device_ids(device_index)
    attempts = []
    if uuid:
        attempts.append(lambda: pynvml.nvmlDeviceGetHandleByUUID(uuid))
    if bus:
        attempts.append(lambda: pynvml.nvmlDeviceGetHandleByPciBusId(bus))
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):  # then torch's order is NVML's
        attempts.append(lambda: pynvml.nvmlDeviceGetHandleByIndex(device_index))
    last = "torch names no CUDA device to find"
    for attempt in attempts:
        try:
            return NvmlReader(pynvml, attempt())
        except pynvml.NVMLError as exc:
            last = str(exc)
    return Unavailable(f"NVML does not find torch's CUDA device {device_index}: {last}")


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def window(before: Sample | None, after: Sample | None) -> dict:
    """What one timing stores: the samples at its start and end, the throttling seen."""
    if before is None or after is None:
        return {"throttled": None, "why": "an NVML read failed during the timing"}
    power = _delta(before.power_violation_ns, after.power_violation_ns)
    thermal = _delta(before.thermal_violation_ns, after.thermal_violation_ns)
    seen = sorted(set(before.reasons + after.reasons) & THROTTLING)
    why = []
    if seen:
        ends = {True: {True: "start and end", False: "start"}, False: {True: "end"}}
        why.append("clocks limited: " + ", ".join(
            f"{r} at {ends[r in before.reasons][r in after.reasons]}" for r in seen))
    for name, ns in (("power", power), ("thermal", thermal)):
        if ns:
            why.append(f"{name} limit for {ns / 1e6:.3g} ms")
    return {
        "start": before.as_dict(),
        "end": after.as_dict(),
        "throttle_reasons": seen,
        "power_violation_ns": power,
        "thermal_violation_ns": thermal,
        "throttled": bool(why),
        "why": "; ".join(why),
    }


def unreliable_reason(windows: dict[str, dict]) -> str:
    """'' when no timing of the test was throttled, else why its speed is unreliable."""
    parts = [(f"{label}: " if label else "") + w["why"]
             for label, w in sorted(windows.items()) if w.get("throttled")]
    return ("GPU throttled during timing (" + "; ".join(parts) + ")") if parts else ""
