"""Hardware profiles and marker decisions, evaluated for named (injected) profiles."""

import pytest

from pytest_kvperf.hardware import PROFILES, UnknownProfileError, detect, named_profile
from pytest_kvperf.markers import package_reason, skip_reasons, version_satisfies

CPU = PROFILES["cpu"]


def decide(marks, profile_name):
    """Skip reasons when the given profile is the machine (real and decision profile alike)."""
    profile = named_profile(profile_name)
    return skip_reasons(marks, profile, profile)


@pytest.mark.parametrize(
    "profile, runs, skips",
    [
        ("h100", ["gpu", "sm90", "fp8", "tma"], ["sm100", "sm121", "fp4"]),
        ("h200", ["sm90", "fp8", "tma"], ["sm100", "fp4"]),
        ("b200", ["gpu", "sm100", "fp8", "fp4", "tma"], ["sm90", "sm121"]),
        ("b300", ["sm100", "fp4"], ["sm90"]),
        ("gb10", ["sm121", "fp4", "fp8", "tma"], ["sm100", "sm90"]),
        ("rtx5090", ["fp4", "fp8"], ["sm121", "sm100"]),
        ("l40s", ["fp8"], ["tma", "sm90", "fp4"]),
        ("a100", ["gpu"], ["fp8", "tma", "fp4"]),
        ("cpu", [], ["gpu", "sm90", "sm100", "fp8", "fp4", "tma"]),
    ],
)
def test_marker_decisions_per_profile(profile, runs, skips):
    for name in runs:
        assert decide([(name, (), {})], profile) == [], (profile, name)
    for name in skips:
        reasons = decide([(name, (), {})], profile)
        assert len(reasons) == 1 and reasons[0].startswith("needs "), (profile, name, reasons)


def test_reason_names_needed_and_found():
    (reason,) = decide([("sm100", (), {})], "h100")
    assert reason.startswith(
        "needs sm100 (compute capability 10.x); found NVIDIA H100 80GB HBM3 (sm90)"
    )


def test_reasons_with_the_same_finding_name_it_once():
    gpu_and_fp8 = [("gpu", (), {}), ("fp8", (), {}), ("requires", ("no_such_pkg_kvperf",), {})]
    reasons = skip_reasons(gpu_and_fp8, PROFILES["cpu"], PROFILES["cpu"])
    assert len(reasons) == 2, reasons
    found = PROFILES["cpu"].describe()
    assert reasons[0].startswith("needs a CUDA GPU and FP8 tensor cores"), reasons[0]
    assert reasons[0].endswith(f"; found {found}") and reasons[0].count("found") == 1
    assert reasons[1] == "needs no_such_pkg_kvperf; found no_such_pkg_kvperf not installed"


def test_derived_features():
    assert PROFILES["h100"].wgmma and not PROFILES["b200"].wgmma
    assert PROFILES["b200"].tcgen05 and PROFILES["thor"].tcgen05 and not PROFILES["gb10"].tcgen05
    assert PROFILES["gb10"].nvlink_c2c and PROFILES["gh200"].nvlink_c2c
    assert not PROFILES["h100"].nvlink_c2c and not CPU.nvlink_c2c
    assert PROFILES["h100"].key == "nvidia-h100-80gb-hbm3" and CPU.key == "cpu"


def test_multi_gpu_counts():
    assert decide([("multi_gpu", (2,), {})], "h100x2") == []
    (reason,) = decide([("multi_gpu", (2,), {})], "h100")
    assert reason.startswith("needs 2 CUDA GPUs; found 1")
    with pytest.raises(ValueError, match="one positive int"):
        decide([("multi_gpu", ("two",), {})], "h100")


def test_multi_gpu_on_no_gpu_says_so_once_beside_gpu():
    """`gpu` + `multi_gpu(2)` without a GPU: one reason, what was found said once."""
    (reason,) = decide([("gpu", (), {}), ("multi_gpu", (2,), {})], "cpu")
    assert reason.startswith("needs a CUDA GPU and 2 CUDA GPUs; found no CUDA GPU"), reason
    (reason,) = decide([("gpu", (), {}), ("multi_gpu", (2,), {})], "h200")
    assert reason.startswith("needs 2 CUDA GPUs; found 1: NVIDIA H200 (sm90)"), reason


def test_injected_profile_never_runs_on_missing_hardware():
    real = detect()
    if real.has_gpu:
        pytest.skip("needs a machine without a CUDA GPU to show this")
    reasons = skip_reasons([("sm100", (), {})], named_profile("b200"), real)
    assert len(reasons) == 1
    assert "needs sm100" in reasons[0] and "found no CUDA GPU" in reasons[0]
    assert "--kvperf-hw=b200" in reasons[0]


def test_unknown_profile_names_known_ones():
    with pytest.raises(UnknownProfileError, match="unknown hardware profile 'z900'.*h100"):
        named_profile("z900")
    with pytest.raises(UnknownProfileError, match="cpu profile has no GPUs"):
        named_profile("cpux2")


def test_requires_package_and_version():
    assert package_reason("pytest") is None
    assert package_reason("pytest", "1.0") is None
    assert package_reason("pytest", "999.0") .startswith("needs pytest>=999.0; found pytest ")
    assert package_reason("no_such_pkg_kvperf") == (
        "needs no_such_pkg_kvperf; found no_such_pkg_kvperf not installed"
    )


def test_detect_describes_this_machine():
    hw = detect()
    assert hw.versions["pytest_benchmark"]
    if not hw.has_gpu:
        assert hw.key == "cpu" and hw.why_no_gpu
        assert hw.describe().startswith("no CUDA GPU (")
    else:
        assert hw.capability and hw.sm_count > 0 and hw.memory_bytes > 0


@pytest.mark.parametrize("found, wanted, ok", [
    ("2.11.0+cu130", "2.11.1", False),  # was read as (2, 11, 130) and passed
    ("2.11.0+cu130", "2.11.0", True),
    ("2.11.1", "2.11.0+cu130", True),
    ("2.0.0rc1", "2.0", False),  # a pre-release is not yet the release
    ("0.7.2.post1", "0.7.2", True),
    ("0.7.2", "0.7.2.post1", False),
    ("3.10", "3.9", True),  # numeric, not lexical
    ("not-a-version", "1.0", False),
])
def test_requires_compares_versions_by_pep440(found, wanted, ok):
    assert version_satisfies(found, wanted) is ok


def test_requires_rejects_a_malformed_min_version():
    with pytest.raises(ValueError, match="min_version='two'"):
        version_satisfies("2.0", "two")
