"""Fixtures shared by the quantiser suites (FP8, MXFP8, NVFP4)."""

from __future__ import annotations

import pytest
import torch
from kvperf_kernels._device import default_device


@pytest.fixture
def kv_data():
    """Seeded KV-cache-like tensors: make(shape, dtype, seed=0, device=None).

    Gaussian values with a few outlier channels of the last dim (x8), as keys have:
    they make per-row and per-block amaxes differ, so a wrong scale shows. Drawn on the
    CPU from a seeded generator, then moved, so every device quantises the same numbers.
    """

    def make(shape, dtype, seed: int = 0, device=None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        outlier = torch.rand(shape[-1], generator=g) < 0.05
        x = x * torch.where(outlier, 8.0, 1.0)
        return x.to(dtype).to(device or default_device())

    return make


def _codes_differ(a: torch.Tensor, b: torch.Tensor, nan_mask: int | None) -> torch.Tensor:
    a8, b8 = a.view(torch.uint8), b.view(torch.uint8)
    differ = a8 != b8
    if nan_mask is not None:  # any NaN encoding equals any other (sign bits may differ)
        differ &= ~(((a8 & nan_mask) == nan_mask) & ((b8 & nan_mask) == nan_mask))
    return differ


@pytest.fixture
def assert_same_codes():
    """assert_same_codes(out, ref, what, nan_mask=0x7F): byte-exact equality of encoded tensors.

    nan_mask=0x7F treats every E4M3 NaN byte (S.1111.111) as equal; None compares raw
    bytes (E8M0 scales, packed E2M1). The message names the first mismatches.
    """

    def check(out: torch.Tensor, ref: torch.Tensor, what: str, nan_mask: int | None = 0x7F):
        assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
        differ = _codes_differ(out, ref, nan_mask)
        if differ.any():
            idx = differ.nonzero()[:5].tolist()
            o8, r8 = out.view(torch.uint8), ref.view(torch.uint8)
            sample = [(i, hex(o8[tuple(i)].item()), hex(r8[tuple(i)].item())) for i in idx]
            raise AssertionError(
                f"{what}: {int(differ.sum())} of {differ.numel()} bytes differ from the "
                f"reference; first (index, kernel, reference): {sample}"
            )

    return check
