"""Inputs and comparisons shared by the quantiser suites (FP8, MXFP8, NVFP4).

``make_kv`` draws seeded KV-like tensors; ``checks`` holds the bit-exact comparisons and
the format error bounds (a fixture, so test modules need not import a conftest).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvperf_kernels._device import default_device


def kv_like(shape, dtype, seed: int, device) -> torch.Tensor:
    """Random KV-cache-like tensor [..., heads, head_dim] (or any shape, last dim = channels).

    N(0, 1) times a per-channel log-normal spread: real keys have outlier channels, which
    is what makes per-token and per-block scaling differ from per-tensor. Drawn on the
    CPU from a seeded generator (the same values on every machine), then moved.
    """
    gen = torch.Generator().manual_seed(seed)
    channels = shape[-2:] if len(shape) >= 2 else shape[-1:]
    spread = torch.exp(0.5 * torch.randn(*channels, generator=gen))
    x = torch.randn(*shape, generator=gen) * spread
    return x.to(device=device, dtype=dtype)


def same_bytes(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-exact comparison (fp8, uint8 codes, ...), reporting the first differences."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.contiguous().view(torch.uint8).cpu()
    e = expected.contiguous().view(torch.uint8).cpu()
    diff = (a != e).nonzero()
    if diff.numel():
        idx = [tuple(i) for i in diff[:5].tolist()]
        shown = ", ".join(f"{i}: {a[i].item():#04x} vs {e[i].item():#04x}" for i in idx)
        raise AssertionError(f"{what}: {diff.shape[0]} of {a.numel()} bytes differ ({shown})")


def same_floats(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-exact float comparison in which NaN == NaN (scales of poisoned groups)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    same = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
    bad = (~same).nonzero()
    if bad.numel():
        i = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {bad.shape[0]} values differ, first at {i}: "
            f"{actual[i].item()!r} vs {expected[i].item()!r}"
        )


def expand_scale(scale: torch.Tensor, shape) -> torch.Tensor:
    """A per-tensor (1,), per-token [..., 1] or per-block [..., nb] scale broadcast to shape."""
    if scale.numel() == 1:
        return scale.reshape(1).expand(shape)
    return scale.repeat_interleave(shape[-1] // scale.shape[-1], dim=-1).expand(shape)


def e4m3_error_bound(x: torch.Tensor, x_hat: torch.Tensor, scale: torch.Tensor) -> None:
    """Per element: |x - x_hat| <= max(2^-4 |x|, 2^-10 scale) + fp32 rounding.

    RNE to 3 mantissa bits is off by at most half a step, 2^-4 of the binade's low end,
    for normal E4M3 (|x/scale| >= 2^-6); below that the step is 2^-9, so half of it times
    the scale. The fp32 scaling and the decode multiply add ~2^-24 relative each.
    """
    x64, xh64 = x.double(), x_hat.double()  # on x's device: GPU cases are 67M elements
    s64 = expand_scale(scale.to(x.device), x.shape).double()
    bound = torch.maximum(x64.abs() * 2.0**-4, s64 * 2.0**-10) + (x64.abs() + s64) * 2.0**-20
    excess = ((x64 - xh64).abs() - bound).flatten()
    worst = excess.argmax()
    assert excess[worst].item() <= 0.0, (
        f"element {worst.item()}: x={x64.flatten()[worst].item()!r} "
        f"x_hat={xh64.flatten()[worst].item()!r} scale={s64.flatten()[worst].item()!r} "
        "exceeds the E4M3 rounding bound"
    )


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
