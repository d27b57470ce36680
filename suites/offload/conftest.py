"""Fixtures of the offload suite; the logic lives in kvperf_kernels.offload."""

from __future__ import annotations

import pytest

from kvperf_kernels.offload.transfer import this_host


@pytest.fixture(scope="session")
def host():
    """This machine's NUMA topology, the GPU's node and its host link (transfer.Host)."""
    return this_host()
