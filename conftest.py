"""Project-wide test setup.

Triton picks between compiling and interpreting when a kernel is decorated, so the
choice has to be made before any kernel module is imported: with no CUDA GPU the
kernels run in Triton's CPU interpreter (small shapes only).
"""

import os

try:
    import torch
except ImportError:  # the plugin's own tests run without torch
    torch = None

if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _runs_suites(config) -> bool:
    """Whether this run collects anything under suites/ (no args: testpaths has suites)."""
    import pathlib

    suites = pathlib.Path(__file__).resolve().parent / "suites"
    here = pathlib.Path(config.invocation_params.dir)
    for arg in config.args:
        path = (here / arg.split("::", 1)[0]).resolve()
        if path == suites or suites in path.parents or suites.is_relative_to(path):
            return True
    return False


def pytest_configure(config):
    # Without the plugin the suites would end in one error per test (no `kvperf` or
    # `kv_bench` fixture) and a warning per hardware mark: stop with one message instead.
    if config.pluginmanager.has_plugin("kvperf") or not _runs_suites(config):
        return
    import pytest

    how = (
        "disabled by -p no:kvperf"
        if config.pluginmanager.is_blocked("kvperf")
        else "not installed: python3 -m pip install -e '.[test]'"
    )
    raise pytest.UsageError(
        f"these suites need the pytest-kvperf plugin ({how}): its `kvperf` and `kv_bench` "
        "fixtures and its hardware marks (gpu, sm90, requires, ...); run them without "
        "-p no:kvperf (tests/, the plugin's own tests, run either way)"
    )
