"""Hardware and package markers: what each one needs, and the reason text when it is missing.

A reason always names what is needed and what was found, e.g.
"needs sm100 (compute capability 10.x); found NVIDIA H100 80GB HBM3 (sm90)".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from .hardware import PACKAGES, HardwareProfile, installed_version


@dataclass(frozen=True)
class HardwareMarker:
    name: str
    needs: str  # what the reason says is needed
    present: Callable[[HardwareProfile], bool]
    doc: str  # the exact semantics, shown by `pytest --markers` and in the README


def _major_is(*majors: int) -> Callable[[HardwareProfile], bool]:
    return lambda hw: hw.capability is not None and hw.capability[0] in majors


HARDWARE_MARKERS: dict[str, HardwareMarker] = {
    m.name: m
    for m in (
        HardwareMarker("gpu", "a CUDA GPU", lambda hw: hw.has_gpu, "needs any CUDA GPU"),
        HardwareMarker(
            "sm90",
            "sm90 (compute capability 9.x)",
            _major_is(9),
            "compute capability exactly 9.x (Hopper: H100, H200, GH200); arch-specific "
            "code such as wgmma needs the exact form",
        ),
        HardwareMarker(
            "sm100",
            "sm100 (compute capability 10.x)",
            _major_is(10),
            "compute capability 10.x (datacenter Blackwell: B200, GB200, B300)",
        ),
        HardwareMarker(
            "sm121",
            "sm121 (compute capability 12.1)",
            lambda hw: hw.capability == (12, 1),
            "compute capability exactly 12.1 (GB10 / DGX Spark)",
        ),
        HardwareMarker(
            "fp8",
            "FP8 tensor cores (compute capability >= 8.9)",
            lambda hw: hw.fp8,
            "compute capability >= 8.9 (Ada, Hopper, Blackwell)",
        ),
        HardwareMarker(
            "fp4",
            "FP4 tensor cores (compute capability 10.x, 11.x or 12.x)",
            lambda hw: hw.fp4,
            "FP4 tensor cores: compute capability 10.x, 11.x or 12.x (Blackwell family)",
        ),
        HardwareMarker(
            "tma",
            "TMA (compute capability >= 9.0)",
            lambda hw: hw.tma,
            "Tensor Memory Accelerator: compute capability >= 9.0",
        ),
    )
}

PARAMETRIC_MARKERS = {
    "multi_gpu": "multi_gpu(n): needs at least n visible CUDA GPUs",
    "requires": (
        "requires(package, min_version=None): needs the package importable at >= min_version "
        f"(packages: {', '.join(PACKAGES)})"
    ),
    "kvperf_tolerance": (
        "kvperf_tolerance(rtol): speed tolerance for this test's baseline comparison "
        "(default 0.05 = 5 %)"
    ),
}


def marker_lines() -> list[str]:
    """Lines for config.addinivalue_line('markers', ...)."""
    lines = [f"{m.name}: {m.doc}" for m in HARDWARE_MARKERS.values()]
    return lines + list(PARAMETRIC_MARKERS.values())


def version_satisfies(found: str, min_version: str) -> bool:
    """found >= min_version by PEP 440 (packaging.version): '2.11.0+cu130' is 2.11.0 with a
    local tag, below 2.11.1; a pre-release ('2.0.0rc1') is below its release."""
    try:
        wanted = Version(min_version)
    except InvalidVersion:
        raise ValueError(f"requires(..., min_version={min_version!r}): not a PEP 440 version") \
            from None
    try:
        return Version(found) >= wanted
    except InvalidVersion:
        return False  # an unparsable installed version cannot be shown to be new enough


def package_reason(package: str, min_version: str | None = None) -> str | None:
    """None when the package is there at >= min_version, else why not."""
    found = installed_version(package)
    wanted = f"{package}>={min_version}" if min_version else package
    if found is None:
        return f"needs {wanted}; found {package} not installed"
    if min_version and not version_satisfies(found, min_version):
        return f"needs {wanted}; found {package} {found}"
    return None


def hardware_reason(name: str, args: tuple, profile: HardwareProfile) -> str | None:
    """None when `profile` satisfies marker `name(*args)`, else the reason text."""
    if name == "multi_gpu":
        if len(args) != 1 or not isinstance(args[0], int) or args[0] < 1:
            raise ValueError(f"multi_gpu(n) takes one positive int, got {args!r}")
        if profile.gpu_count >= args[0]:
            return None
        if not profile.has_gpu:  # the words of `gpu`'s reason, so the two merge into one
            return f"needs {args[0]} CUDA GPUs; found {profile.describe()}"
        return f"needs {args[0]} CUDA GPUs; found {profile.gpu_count}: {profile.describe()}"
    marker = HARDWARE_MARKERS[name]
    if marker.present(profile):
        return None
    return f"needs {marker.needs}; found {profile.describe()}"


def skip_reasons(
    marks: list[tuple[str, tuple, dict]],
    profile: HardwareProfile,
    real: HardwareProfile,
) -> list[str]:
    """Reasons a test with these marks cannot run; empty when it can.

    `profile` is what the skip decision is made for (the injected one, or the real one);
    `real` is checked as well, so an injected profile never runs a test on missing hardware.
    """
    reasons = []
    for name, args, kwargs in marks:
        if name == "requires":
            if not args:
                raise ValueError("requires(package, min_version=None) needs a package name")
            why = package_reason(args[0], kwargs.get("min_version", *args[1:2]) or None)
        elif name in HARDWARE_MARKERS or name == "multi_gpu":
            why = hardware_reason(name, args, profile)
            if why is None and real is not profile:
                real_why = hardware_reason(name, args, real)
                if real_why:
                    why = (
                        f"{real_why} (profile --kvperf-hw={profile.injected_from} has it, "
                        "but a profile never runs a test on missing hardware)"
                    )
        else:
            continue
        if why and why not in reasons:
            reasons.append(why)
    return _merge_same_finding(reasons)


def _merge_same_finding(reasons: list[str]) -> list[str]:
    """'needs A; found X' + 'needs B; found X' -> 'needs A and B; found X' (X said once)."""
    merged: dict[str, list[str]] = {}
    for why in reasons:
        needs, sep, found = why.partition("; found ")
        merged.setdefault(sep + found, []).append(needs)
    return [needs[0] + "".join(" and " + n.removeprefix("needs ") for n in needs[1:]) + found
            for found, needs in merged.items()]
