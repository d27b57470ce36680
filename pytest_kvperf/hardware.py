"""What machine the tests run on: GPU model, capability, derived features, software.

Works with a CUDA build of torch, a CPU-only torch, and no torch at all. A named
profile (``--kvperf-hw=b200``) can stand in for the detected GPU in skip decisions;
the plugin still checks the real hardware before letting a test run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from importlib import metadata

# Distribution names differ from import names for some of these.
PACKAGES = {
    "torch": ("torch",),
    "triton": ("triton",),
    "flashinfer": ("flashinfer-python", "flashinfer"),
    "transformer_engine": ("transformer-engine", "transformer_engine"),
    "pytest_benchmark": ("pytest-benchmark",),
    "numpy": ("numpy",),
}

# Grace-coupled parts reach host memory over NVLink-C2C instead of PCIe.
_NVLINK_C2C_NAMES = ("GH200", "GB200", "GB300", "GB10")


@dataclass(frozen=True)
class HardwareProfile:
    """One machine's GPU as the skip logic sees it (the first visible GPU when several)."""

    name: str  # "NVIDIA H100 80GB HBM3", or "cpu" when there is no CUDA GPU
    capability: tuple[int, int] | None = None  # (major, minor); None without a GPU
    sm_count: int = 0
    memory_bytes: int = 0
    gpu_count: int = 0
    l2_bytes: int = 0
    why_no_gpu: str = ""  # for the CPU profile: why no GPU was found
    injected_from: str = ""  # the --kvperf-hw value this profile came from, if any
    versions: dict[str, str | None] = field(default_factory=dict, compare=False)

    @property
    def has_gpu(self) -> bool:
        return self.capability is not None and self.gpu_count > 0

    @property
    def sm(self) -> str:
        """'sm90', 'sm121', ... or 'cpu'."""
        if self.capability is None:
            return "cpu"
        return f"sm{self.capability[0]}{self.capability[1]}"

    @property
    def key(self) -> str:
        """File-name-safe GPU model key used for baselines/<key>.json."""
        if not self.has_gpu:
            return "cpu"
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    def describe(self) -> str:
        """Human text for skip reasons: 'NVIDIA H100 80GB HBM3 (sm90)'."""
        if not self.has_gpu:
            text = f"no CUDA GPU ({self.why_no_gpu})" if self.why_no_gpu else "no CUDA GPU"
        else:
            text = f"{self.name} ({self.sm})"
            if self.gpu_count > 1:
                text += f" x{self.gpu_count}"
        if self.injected_from:
            text += f" [profile --kvperf-hw={self.injected_from}]"
        return text

    # Derived features; each is a property of the chip generation, not of the software.
    def _cc_at_least(self, major: int, minor: int) -> bool:
        return self.capability is not None and self.capability >= (major, minor)

    @property
    def fp8(self) -> bool:
        return self._cc_at_least(8, 9)

    @property
    def tma(self) -> bool:
        return self._cc_at_least(9, 0)

    @property
    def wgmma(self) -> bool:
        # wgmma exists on sm90a only; Blackwell replaced it by tcgen05.
        return self.capability is not None and self.capability[0] == 9

    @property
    def fp4(self) -> bool:
        return self.capability is not None and self.capability[0] in (10, 11, 12)

    @property
    def tcgen05(self) -> bool:
        # Tensor memory (TMEM) and tcgen05 MMA: datacenter Blackwell (10.x) and Thor (11.x).
        return self.capability is not None and self.capability[0] in (10, 11)

    @property
    def nvlink_c2c(self) -> bool:
        return self.has_gpu and any(part in self.name for part in _NVLINK_C2C_NAMES)

    def features(self) -> dict[str, bool]:
        return {
            name: getattr(self, name)
            for name in ("fp8", "tma", "wgmma", "fp4", "tcgen05", "nvlink_c2c")
        }

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "key": self.key,
            "sm": self.sm,
            "compute_capability": (
                f"{self.capability[0]}.{self.capability[1]}" if self.capability else None
            ),
            "sm_count": self.sm_count,
            "memory_bytes": self.memory_bytes,
            "l2_bytes": self.l2_bytes,
            "gpu_count": self.gpu_count,
            "features": self.features(),
            "injected_from": self.injected_from or None,
            "versions": dict(self.versions),
        }


_GIB = 1 << 30

# Named profiles for --kvperf-hw: real products' published figures.
PROFILES: dict[str, HardwareProfile] = {
    "cpu": HardwareProfile("cpu", why_no_gpu="named profile 'cpu'"),
    "a100": HardwareProfile("NVIDIA A100-SXM4-80GB", (8, 0), 108, 80 * _GIB, 1, 40 << 20),
    "l40s": HardwareProfile("NVIDIA L40S", (8, 9), 142, 48 * _GIB, 1, 96 << 20),
    "h100": HardwareProfile("NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * _GIB, 1, 50 << 20),
    "h200": HardwareProfile("NVIDIA H200", (9, 0), 132, 141 * _GIB, 1, 50 << 20),
    "gh200": HardwareProfile("NVIDIA GH200 480GB", (9, 0), 132, 96 * _GIB, 1, 50 << 20),
    "b200": HardwareProfile("NVIDIA B200", (10, 0), 148, 180 * _GIB, 1, 126 << 20),
    "gb200": HardwareProfile("NVIDIA GB200", (10, 0), 152, 186 * _GIB, 1, 126 << 20),
    "b300": HardwareProfile("NVIDIA B300 SXM6 AC", (10, 3), 148, 270 * _GIB, 1, 126 << 20),
    "thor": HardwareProfile("NVIDIA Thor", (11, 0), 20, 128 * _GIB, 1, 32 << 20),
    "rtx5090": HardwareProfile("NVIDIA GeForce RTX 5090", (12, 0), 170, 32 * _GIB, 1, 96 << 20),
    "gb10": HardwareProfile("NVIDIA GB10", (12, 1), 48, 128 * _GIB, 1, 24 << 20),
}


class UnknownProfileError(ValueError):
    pass


def named_profile(spec: str) -> HardwareProfile:
    """Profile for '--kvperf-hw': a name from PROFILES, optionally 'xN' for N GPUs (b200x8)."""
    name, count = spec.strip().lower(), None
    match = re.fullmatch(r"([a-z0-9]+)x(\d+)", name)
    if name not in PROFILES and match:  # 'rtx5090' is a name, 'h100x2' a count
        name, count = match.groups()
    if name not in PROFILES:
        raise UnknownProfileError(
            f"unknown hardware profile {spec!r}; known: {', '.join(sorted(PROFILES))} "
            "(append xN for N GPUs, e.g. h100x2)"
        )
    profile = PROFILES[name]
    if count is not None:
        if not profile.has_gpu:
            raise UnknownProfileError(f"profile {spec!r}: the cpu profile has no GPUs to count")
        profile = replace(profile, gpu_count=int(count))
    return replace(profile, injected_from=spec, versions=package_versions())


def installed_version(package: str) -> str | None:
    """The installed version of a package (import name), from metadata; None if absent."""
    for dist in PACKAGES.get(package, (package, package.replace("_", "-"))):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def package_versions() -> dict[str, str | None]:
    """Installed versions, read from metadata so nothing heavy is imported."""
    return {name: installed_version(name) for name in PACKAGES}


def detect() -> HardwareProfile:
    """The real machine: the first visible CUDA GPU through torch, else a CPU profile."""
    versions = package_versions()
    try:
        import torch
    except ImportError:
        return HardwareProfile("cpu", why_no_gpu="torch is not installed", versions=versions)
    versions["cuda"] = torch.version.cuda
    if not torch.cuda.is_available():
        why = (
            f"torch {torch.__version__} is a CPU-only build"
            if torch.version.cuda is None
            else f"torch {torch.__version__} sees no CUDA device"
        )
        return HardwareProfile("cpu", why_no_gpu=why, versions=versions)
    props = torch.cuda.get_device_properties(0)
    return HardwareProfile(
        name=props.name,
        capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
        memory_bytes=props.total_memory,
        gpu_count=torch.cuda.device_count(),
        l2_bytes=getattr(props, "L2_cache_size", 0),
        versions=versions,
    )
