"""What `-m sm90`, `-m sm100` and `-m sm121` select: every test that applies to that
architecture, derived from the test's requirements.

A test applies to an architecture when that architecture's GPU satisfies each of the
test's hardware marks (`gpu`, `fp8`, `fp4`, `tma`, `sm90`, `sm100`, `sm121`): an unmarked
test (it runs anywhere) applies to all three, an `fp4` test to sm100 and sm121, an `sm90`
test (wgmma code) to sm90 only. `requires(...)` and `multi_gpu(n)` are not architecture:
they do not change the selection, and still skip at run time with their reason.

The plugin adds the derived marks (`sm90(kvperf_derived=True)`, ...) before pytest's `-m`
deselection. They are selection only: skip decisions read `requirement_marks(item)`,
which leaves them out, so an unmarked test never starts to need sm90.
"""

from __future__ import annotations

import pytest

from .hardware import named_profile
from .markers import HARDWARE_MARKERS, hardware_reason

# Each selectable architecture and the named profile (--kvperf-hw) whose GPU stands for it.
# sm100 is 10.x (B200, GB200, B300): no mark tells 10.0 from 10.3 apart.
ARCHITECTURES: dict[str, str] = {"sm90": "h100", "sm100": "b200", "sm121": "gb10"}

# Marks that say what the test needs; the architecture-dependent ones decide selection.
REQUIREMENT_MARKS = frozenset(HARDWARE_MARKERS) | {"multi_gpu", "requires"}
ARCH_DEPENDENT = frozenset(HARDWARE_MARKERS)  # gpu, sm90, sm100, sm121, fp8, fp4, tma

DERIVED = "kvperf_derived"  # the kwarg that tells a derived mark from a declared one

Mark = tuple[str, tuple, dict]


def is_derived(mark) -> bool:
    return bool(mark.kwargs.get(DERIVED))


def requirement_marks(item) -> list[Mark]:
    """The requirement marks the test declares (name, args, kwargs), derived ones left out."""
    return [
        (m.name, tuple(m.args), dict(m.kwargs))
        for m in item.iter_markers()
        if m.name in REQUIREMENT_MARKS and not is_derived(m)
    ]


def applies_to(marks: list[Mark], arch: str) -> bool:
    """Does a test with these requirement marks apply to `arch` ('sm90', 'sm100', 'sm121')?"""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    profile = named_profile(ARCHITECTURES[arch])
    return all(
        hardware_reason(name, args, profile) is None
        for name, args, _ in marks
        if name in ARCH_DEPENDENT
    )


def architectures_for(marks: list[Mark]) -> list[str]:
    """The architectures a test with these requirement marks applies to, in ARCHITECTURES
    order: what `-m sm90` / `-m sm100` / `-m sm121` select it under."""
    return [arch for arch in ARCHITECTURES if applies_to(marks, arch)]


def add_architecture_marks(item) -> list[str]:
    """Give the item a derived mark per architecture it applies to (for `-m`); returns them.

    An architecture the test declares itself (`@pytest.mark.sm90`) is not added twice.
    """
    marks = requirement_marks(item)
    declared = {name for name, _, _ in marks}
    archs = architectures_for(marks)
    for arch in archs:
        if arch not in declared:
            item.add_marker(getattr(pytest.mark, arch)(**{DERIVED: True}))
    return archs
