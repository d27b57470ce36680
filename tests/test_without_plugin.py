"""`-p no:kvperf`: the suites stop with one clear message (exit 4), not a pile of errors.

Runs the project's own root conftest.py in a pytester folder with a suites/ folder.
"""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SUITE_TEST = """
import pytest

@pytest.mark.gpu
@pytest.mark.requires("torch", "2.0")
def test_metric(kvperf):
    kvperf.accuracy("max_abs_err", 0.1, better="lower")

def test_bench(kv_bench):
    kv_bench(lambda: None)
"""


@pytest.fixture
def project(pytester):
    shutil.copy(ROOT / "conftest.py", pytester.path / "conftest.py")
    pytester.makeini("[pytest]\ntestpaths = tests suites\n")
    pytester.mkdir("suites")
    (pytester.path / "suites" / "test_suite.py").write_text(SUITE_TEST)
    pytester.mkdir("tests")
    (pytester.path / "tests" / "test_own.py").write_text("def test_own():\n    pass\n")
    return pytester


MESSAGE = "ERROR: these suites need the pytest-kvperf plugin (disabled by -p no:kvperf)*"


@pytest.mark.parametrize("args", [(), ("suites",), ("suites/test_suite.py::test_bench",)])
def test_disabled_plugin_stops_with_one_message(project, args):
    result = project.runpytest_subprocess("-p", "no:kvperf", "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([MESSAGE])
    out = result.stdout.str() + result.stderr.str()
    assert "fixture 'kvperf' not found" not in out and "PytestUnknownMarkWarning" not in out
    assert out.count("ERROR") == 1


def test_plugin_not_loaded_says_how_to_install(project, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "suites")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*need the pytest-kvperf plugin (not installed: *pip install*"])


def test_the_plugins_own_tests_run_without_it(project):
    result = project.runpytest_subprocess("-p", "no:kvperf", "-p", "no:cacheprovider", "tests")
    result.assert_outcomes(passed=1)


def test_with_the_plugin_the_suite_runs(project):
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "suites", "-rs")
    assert result.ret == pytest.ExitCode.OK
    assert "these suites need" not in result.stderr.str()
