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
def spread_kv(make_kv, quant_device) -> torch.Tensor:
    """fp32 KV tokens scaled by 2^-30 .. 2^30 per token: every scale range, subnormals too."""
    spread = torch.randint(-30, 30, (4096, 8, 1), generator=torch.Generator().manual_seed(32))
    return make_kv((4096, 8, 128), torch.float32, seed=31) * torch.exp2(spread.float()).to(
        quant_device)


def rejects_bad_quant_input(quant, block: int) -> None:
    """A block quantiser's error contract: block multiple, dtype, type, layout, rank."""
    device = default_device()
    good = torch.randn(64, 64, device=device)
    not_multiple = f"last dim 40 is not a multiple of the block size {block}"
    with pytest.raises(ValueError, match=not_multiple):
        quant(torch.randn(4, 40, device=device))
    with pytest.raises(TypeError, match="float64"):
        quant(good.double())
    with pytest.raises(TypeError, match="torch.Tensor"):
        quant(good.tolist())
    with pytest.raises(ValueError, match="contiguous"):
        quant(good.t())
    with pytest.raises(ValueError, match="0-dim"):
        quant(torch.tensor(1.0, device=device))


@pytest.fixture
def checks() -> SimpleNamespace:
    """Bit-exact comparisons and error bounds: checks.same_bytes(a, b, what), ..."""
    return SimpleNamespace(same_bytes=same_bytes, same_floats=same_floats,
                           expand_scale=expand_scale, e4m3_error_bound=e4m3_error_bound,
                           rejects_bad_quant_input=rejects_bad_quant_input)
