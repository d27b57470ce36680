"""Error metrics of a kernel's output against a reference, computed in float64."""

from __future__ import annotations


def error_metrics(out, ref) -> dict[str, float]:
    """max_abs_err, rel_l2_err (||out-ref|| / ||ref||) and cosine; NaN/Inf in out fail."""
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
    cosine = (out64 @ ref64).item() / (ref_norm * out_norm) if out_norm else 0.0
    return {
        "max_abs_err": diff.abs().max().item() if diff.numel() else 0.0,
        "rel_l2_err": diff.norm().item() / ref_norm,
        "cosine": cosine,
    }
