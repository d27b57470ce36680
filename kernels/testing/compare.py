"""Comparisons the suites share: bit-exact bytes and floats, the E4M3 rounding bound, and the
decode kernel's element-wise tolerance against its float64 reference. NaN/Inf never pass.
"""

from __future__ import annotations

import torch


def same_bytes(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-exact comparison (fp8, uint8 codes, ...), reporting the first differences."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    # a 0-d tensor cannot be viewed as bytes of another size: compare scalars as [1]
    a = actual.contiguous().reshape(actual.shape or (1,)).view(torch.uint8).cpu()
    e = expected.contiguous().reshape(expected.shape or (1,)).view(torch.uint8).cpu()
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


# Kernel vs float64 reference on the same dequantised KV. What remains is the rounding of
# the output to 16 bits (half an ulp) plus fp32 arithmetic: rtol is 2 ulps of the output
# dtype, atol covers outputs near zero, where fp32 sums of cancelling terms dominate.
# (A kernel that rounds p to 16 bits once, as FlashAttention does, needs ~1e-2: see
# test_flashinfer_sinks.py.)
DECODE_TOLERANCES = {torch.bfloat16: (1e-3, 2**-7), torch.float16: (2e-4, 2**-10)}  # (atol, rtol)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Every element within atol + rtol * |ref| (tolerances by out's dtype); NaN/Inf fail."""
    finite = torch.isfinite(out)
    assert finite.all(), f"{what}: {int((~finite).sum())} NaN/Inf of {out.numel()} outputs"
    atol, rtol = DECODE_TOLERANCES[out.dtype]
    out64, ref64 = out.double(), ref.to(out.device).double()
    err = (out64 - ref64).abs()
    bound = atol + rtol * ref64.abs()
    bad = err > bound
    if bad.any():
        worst = int((err - bound).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), out.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} elements beyond atol={atol} rtol={rtol}; "
            f"worst at [b, h, d]={idx}: out {out64[idx].item():.6g} vs ref {ref64[idx].item():.6g}"
        )


def match_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two token sequences agree (two free-running greedy
    decodes, or a decode and the task's answers); sequences of other shapes are an error."""
    if a.shape != b.shape:
        raise ValueError(f"token shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.cpu() == b.cpu()).double().mean().item()
