"""`-m sm90` / `-m sm100` / `-m sm121`: every test that applies to the architecture."""

import pytest

from pytest_kvperf.arch_selection import ARCHITECTURES, applies_to, architectures_for

# name of a test -> the architectures it applies to, derived from its marks
REQUIREMENTS = {
    "test_anywhere": ([], ["sm90", "sm100", "sm121"]),
    "test_any_gpu": ([("gpu", (), {})], ["sm90", "sm100", "sm121"]),
    "test_fp8": ([("fp8", (), {})], ["sm90", "sm100", "sm121"]),
    "test_tma": ([("tma", (), {})], ["sm90", "sm100", "sm121"]),
    "test_fp4": ([("fp4", (), {})], ["sm100", "sm121"]),
    "test_wgmma": ([("sm90", (), {})], ["sm90"]),
    "test_tcgen05": ([("sm100", (), {})], ["sm100"]),
    "test_spark": ([("sm121", (), {})], ["sm121"]),
    "test_blackwell_fp4": ([("sm100", (), {}), ("fp4", (), {})], ["sm100"]),
    # software and GPU count are not architecture: they skip at run time, never deselect
    "test_two_gpus": ([("multi_gpu", (2,), {})], ["sm90", "sm100", "sm121"]),
    "test_te": ([("requires", ("no_such_pkg_kvperf", "1.0"), {}), ("fp8", (), {})],
                ["sm90", "sm100", "sm121"]),
}


@pytest.mark.parametrize("name", sorted(REQUIREMENTS))
def test_architectures_derived_from_requirements(name):
    marks, expected = REQUIREMENTS[name]
    assert architectures_for(marks) == expected


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'sm89'; known: sm90, sm100"):
        applies_to([], "sm89")


def _decorator(name, args, kwargs):
    rendered = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
    return f"@pytest.mark.{name}({rendered})" if rendered else f"@pytest.mark.{name}"


TEST_FILE = "import pytest\n" + "".join(
    "\n" + "".join(_decorator(*m) + "\n" for m in marks) + f"def {name}(): assert 2 + 2 == 4\n"
    for name, (marks, _) in REQUIREMENTS.items()
)


def _selected(pytester, expr):
    result = pytester.runpytest("--collect-only", "-q", "-m", expr, "-p", "no:cacheprovider")
    return {line.split("::")[-1] for line in result.outlines if "::" in line}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_m_arch_selects_every_test_that_applies(pytester, arch):
    pytester.makepyfile(TEST_FILE)
    want = {name for name, (_, archs) in REQUIREMENTS.items() if arch in archs}
    assert _selected(pytester, arch) == want
    # the complement is what does not apply: an sm100-only test is not in -m sm90
    assert _selected(pytester, f"not {arch}") == set(REQUIREMENTS) - want


def test_arch_specific_tests_by_expression(pytester):
    pytester.makepyfile(TEST_FILE)
    assert _selected(pytester, "sm90 and not sm100 and not sm121") == {"test_wgmma"}
    assert _selected(pytester, "sm100 and not sm90") == {
        "test_fp4", "test_tcgen05", "test_blackwell_fp4"}
    # the declared marks keep their own meaning for -m (a declared sm100 is an sm100 test)
    assert _selected(pytester, "fp4") == {"test_fp4", "test_blackwell_fp4"}


def test_derived_marks_never_become_requirements(pytester):
    """-m sm90 on a B200 profile: the unmarked test runs, the fp4 test is deselected, and
    the declared sm90 test skips (on this CPU machine the GPU ones skip for the GPU)."""
    pytester.makepyfile(TEST_FILE)
    result = pytester.runpytest("-m", "sm90", "--kvperf-hw=b200", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=6, deselected=4)
    out = result.stdout.str()
    assert "needs sm90 (compute capability 9.x)" in out  # test_wgmma, declared
    assert "needs sm100" not in out and "needs sm121" not in out  # no derived requirement


def test_suites_sm90_excludes_only_blackwell_rungs(pytester):
    """The project's suites: -m sm90 leaves out exactly the tests that cannot run on sm90
    (TE's MXFP8 rung, sm100; its NVFP4 rung, fp4)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    result = pytester.runpytest_subprocess(
        str(root / "suites"), "--collect-only", "-q", "-m", "not sm90",
        "-p", "no:cacheprovider", f"--rootdir={root}", "-c", str(root / "pyproject.toml"))
    nodeids = [line for line in result.outlines if "::" in line]
    assert nodeids, result.outlines[-5:]
    assert all("test_te_recipes.py" in n and ("[mxfp8" in n or "[nvfp4" in n) for n in nodeids), \
        nodeids
