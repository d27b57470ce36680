"""Fixtures of the quantiser suites (FP8, MXFP8, NVFP4); helpers live in kvperf_kernels.testing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvperf_kernels.device import default_device
from kvperf_kernels.testing.compare import e4m3_error_bound, expand_scale, same_bytes, same_floats
from kvperf_kernels.testing.inputs import kv_like


@pytest.fixture
def quant_device() -> torch.device:
    """Where the quantiser kernels run: the CUDA GPU, or the CPU under TRITON_INTERPRET=1."""
    return default_device()


@pytest.fixture
def make_kv(quant_device):
    """Factory: make_kv(shape, dtype, seed=0) -> seeded KV-like tensor on quant_device."""

    def make(shape, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
        return kv_like(tuple(shape), dtype, seed, quant_device)

    return make


@pytest.fixture
def checks() -> SimpleNamespace:
    """Bit-exact comparisons and error bounds: checks.same_bytes(a, b, what), ..."""
    return SimpleNamespace(same_bytes=same_bytes, same_floats=same_floats,
                           expand_scale=expand_scale, e4m3_error_bound=e4m3_error_bound)
