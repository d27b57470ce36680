"""Fixtures of the DeepSeek latent-cache suite; inputs and helpers live in
kvperf_kernels.testing.latent."""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.device import default_device


@pytest.fixture
def checks_device() -> torch.device:
    """Where the latent kernels run: the CUDA GPU, or the CPU under TRITON_INTERPRET=1."""
    return default_device()
