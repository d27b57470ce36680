"""Hooks pytest-kvperf declares, so a conftest or another plugin can customise it."""

import pytest


@pytest.hookspec(firstresult=True)
def pytest_kvperf_gpu_facts_reader(config):
    """Return the GPU facts reader for this process (see pytest_kvperf.gpu_facts.Reader:
    `available`, `static()`, `sample()`), or None for the default: NVML through
    nvidia-ml-py on torch's CUDA device 0. Tests use it to feed recorded GPU states."""


@pytest.hookspec(firstresult=True)
def pytest_kvperf_named_peaks(config):
    """Return recorded peaks {name: GB/s} (names: pytest_kvperf.named_peaks.NAMES) for
    this session, or None for the default: measured on this machine's GPU once and cached.
    Recorded peaks apply whatever the timing method (the CPU tests feed them)."""
