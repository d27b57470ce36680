"""Selection and skips under injected profiles, reason texts, JUnit and results JSON."""

import json
import xml.etree.ElementTree as ET

import pytest

MARKED_TESTS = """
import pytest

@pytest.mark.sm100
def test_blackwell_a(): pass

@pytest.mark.sm100
@pytest.mark.fp4
def test_blackwell_fp4(): pass

@pytest.mark.sm90
def test_hopper(): pass

def test_anywhere(): assert 1 + 1 == 2
"""


def test_m_sm100_selects_and_skips_with_gpu_named(pytester):
    pytester.makepyfile(MARKED_TESTS)
    result = pytester.runpytest("-m", "sm100", "--kvperf-hw=h100", "-rs")
    # -m sm100: the two sm100 tests and test_anywhere (it applies to sm100 too)
    result.assert_outcomes(passed=1, skipped=2, deselected=1)
    result.stdout.fnmatch_lines(
        [
            "*skipped, grouped by reason:*",
            "*1 x needs sm100 (compute capability 10.x); found NVIDIA H100 80GB HBM3 (sm90)*",
            "*SKIPPED*hw_skip_reason: needs sm100 (compute capability 10.x); "
            "found NVIDIA H100 80GB HBM3 (sm90)*",
        ]
    )


def test_cpu_machine_names_what_it_found(pytester):
    from pytest_kvperf.hardware import detect

    if detect().has_gpu:
        pytest.skip("shows the CPU-only text; this machine has a GPU")
    pytester.makepyfile(MARKED_TESTS)
    result = pytester.runpytest("-m", "sm100", "-rs")
    result.assert_outcomes(passed=1, skipped=2, deselected=1)
    result.stdout.fnmatch_lines(["*needs sm100 (compute capability 10.x); found no CUDA GPU (*"])


def test_injected_profile_with_the_feature_still_skips_without_hardware(pytester):
    from pytest_kvperf.hardware import detect

    if detect().has_gpu:
        pytest.skip("needs a machine without a CUDA GPU")
    pytester.makepyfile(MARKED_TESTS)
    result = pytester.runpytest("--kvperf-hw=b200", "-rs")
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(
        ["*needs sm100*found no CUDA GPU*profile --kvperf-hw=b200 has it*missing hardware*"]
    )


def test_unknown_profile_is_a_usage_error(pytester):
    pytester.makepyfile(MARKED_TESTS)
    result = pytester.runpytest("--kvperf-hw=z900")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown hardware profile 'z900'; known: *h100*"])


def test_reason_recorded_in_junit_and_results_json(pytester):
    pytester.makepyfile(MARKED_TESTS)
    result = pytester.runpytest(
        "--kvperf-hw=h100", "--junitxml=out.xml", "--kvperf-json=results.json"
    )
    result.assert_outcomes(passed=1, skipped=3)
    tree = ET.parse(pytester.path / "out.xml")
    props = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in tree.iter("testcase")
    }
    assert props["test_blackwell_a"]["hw_skip_reason"].startswith(
        "needs sm100 (compute capability 10.x); found NVIDIA H100 80GB HBM3 (sm90)"
    )
    fp4_reason = props["test_blackwell_fp4"]["hw_skip_reason"]
    # both needs, the one finding once
    assert fp4_reason.startswith("needs FP4 tensor cores") and " and sm100 (" in fp4_reason
    assert fp4_reason.count("; found NVIDIA H100") == 1, fp4_reason
    assert "hw_skip_reason" not in props["test_anywhere"]
    doc = json.loads((pytester.path / "results.json").read_text())
    tests = doc["tests"]
    assert tests["test_reason_recorded_in_junit_and_results_json.py::test_blackwell_a"][
        "hw_skip_reason"
    ] == props["test_blackwell_a"]["hw_skip_reason"]
    anywhere = tests["test_reason_recorded_in_junit_and_results_json.py::test_anywhere"]
    assert anywhere["outcome"] == "passed" and anywhere["hw_skip_reason"] is None
    assert doc["decision_profile"]["name"] == "NVIDIA H100 80GB HBM3"


def test_requires_marker_and_runtime_skip(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires("no_such_pkg_kvperf", "1.0")
        def test_needs_pkg(): pass

        @pytest.mark.requires("pytest", "7.0")
        def test_has_pkg(): pass

        def test_runtime(kvperf):
            kvperf.skip("backend fa3 needs sm90a; found sm80")
        """
    )
    result = pytester.runpytest("--kvperf-json=r.json", "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    doc = json.loads((pytester.path / "r.json").read_text())["tests"]
    reasons = {k.split("::")[1]: v["hw_skip_reason"] for k, v in doc.items()}
    assert reasons["test_needs_pkg"] == (
        "needs no_such_pkg_kvperf>=1.0; found no_such_pkg_kvperf not installed"
    )
    assert reasons["test_runtime"] == "backend fa3 needs sm90a; found sm80"
    assert reasons["test_has_pkg"] is None


def test_markers_are_registered_and_documented(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.sm90: compute capability exactly 9.x*",
            "@pytest.mark.sm100: compute capability 10.x*",
            "@pytest.mark.multi_gpu(n)*",
        ]
    )
