"""Error metrics of a kernel's output against a reference, computed in float64.

What ``kvperf.errors`` records, all lower-is-better distances with a domain:
max_abs_err >= 0, rel_l2_err >= 0 and cosine_distance = 1 - cosine in [0, 2]. The cosine
itself is returned for the suites' hard asserts but not stored: as a number near 1 its
relative tolerance meant nothing, while a doubled distance is a doubled error.
"""

from __future__ import annotations

# An error doubling fails on that metric alone: fails above 1.5x the baseline.
ERROR_RTOL = 0.5
# A relative error below this is float64 rounding, not a kernel (float32's eps is 1.2e-7):
# the tolerance floor, so that a bit-exact baseline (0) fails only when exactness is lost.
RELATIVE_FLOOR = 1e-12
# A rate in [0, 1] (token match, task accuracy) fails when it drops by 3 points, not by 2.
RATE_ATOL = 0.02
ERROR_DOMAINS = {"max_abs_err": (0.0, None), "rel_l2_err": (0.0, None),
                 "cosine_distance": (0.0, 2.0)}


def errors_and_floors(out, ref) -> tuple[dict[str, float], dict[str, float]]:
    """(values, atol floor per recorded metric)."""
    import torch

    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    out64 = out.detach().to(device="cpu", dtype=torch.float64).flatten()
    ref64 = ref.detach().to(device="cpu", dtype=torch.float64).flatten()
    bad = (~torch.isfinite(out64)).sum().item()
    if bad:
        raise AssertionError(f"output has {bad} NaN/Inf of {out64.numel()} elements")
    if not torch.isfinite(ref64).all():
        raise AssertionError("reference has NaN/Inf: the comparison would mean nothing")
    diff = out64 - ref64
    ref_norm = ref64.norm().item()
    out_norm = out64.norm().item()
    if ref_norm == 0.0:
        raise ValueError("reference is all zeros: relative error and cosine are undefined")
    # 1 - cos = |u - v|^2 / 2 for unit vectors: exact near 0, where 1 - (u . v) cancels
    distance = (((out64 / out_norm - ref64 / ref_norm) ** 2).sum().item() / 2.0
                if out_norm else 1.0)
    distance = min(distance, 2.0)
    values = {
        "max_abs_err": diff.abs().max().item() if diff.numel() else 0.0,
        "rel_l2_err": diff.norm().item() / ref_norm,
        "cosine_distance": distance,
        "cosine": 1.0 - distance,
    }
    floors = {
        "max_abs_err": RELATIVE_FLOOR * ref64.abs().max().item(),  # in the data's own unit
        "rel_l2_err": RELATIVE_FLOOR,
        "cosine_distance": RELATIVE_FLOOR**2,  # ~ rel_l2_err^2 / 2
    }
    return values, floors


def error_metrics(out, ref) -> dict[str, float]:
    """max_abs_err, rel_l2_err (||out-ref|| / ||ref||), cosine_distance and cosine.

    NaN/Inf in out fail.
    """
    return errors_and_floors(out, ref)[0]
