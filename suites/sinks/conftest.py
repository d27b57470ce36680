"""Shared inputs of the sinks suite: seeded random decode cases over a poisoned paged cache.

A case holds the dense K/V tokens once, so the same values can be packed as BF16, FP8
per-tensor or FP8 per-token KV over the same (seeded, shuffled) page table.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvperf_kernels._device import default_device
from kvperf_kernels.paged_kv import PagedKV, pack_paged_kv


@dataclass
class DecodeCase:
    q: torch.Tensor  # [B, Hq, D]
    k_tokens: torch.Tensor  # [sum(lens), Hkv, D] float32
    v_tokens: torch.Tensor
    sinks: torch.Tensor  # float32 [Hq]
    lens: list[int]
    page_size: int
    seed: int

    def pack(self, kv_dtype: torch.dtype | None = None, granularity: str | None = None,
             *, poison: bool = True) -> PagedKV:
        """The case's K/V as a paged cache; the page table depends only on the seed."""
        kv_dtype = kv_dtype or self.q.dtype
        gen = torch.Generator().manual_seed(self.seed + 1)
        return pack_paged_kv(
            self.k_tokens, self.v_tokens, self.lens, self.page_size, kv_dtype=kv_dtype,
            scale_granularity=granularity, poison=poison, generator=gen,
        )


def make_decode_case(lens, *, hq: int, hkv: int, head_dim: int, page_size: int,
                     q_dtype=torch.bfloat16, seed: int = 0, device=None) -> DecodeCase:
    """Random decode inputs: K/V ~ N(0, 1) with a per-channel spread (real keys have outlier
    channels), q ~ N(0, 1), sinks ~ N(1, 2) so that the sink's share is significant."""
    device = device or default_device()
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    channel = torch.exp(0.5 * torch.randn(hkv, head_dim, generator=gen))
    k = torch.randn(total, hkv, head_dim, generator=gen) * channel
    v = torch.randn(total, hkv, head_dim, generator=gen)
    q = torch.randn(len(lens), hq, head_dim, generator=gen)
    sinks = 1.0 + 2.0 * torch.randn(hq, generator=gen)
    return DecodeCase(
        q=q.to(device=device, dtype=q_dtype), k_tokens=k.to(device), v_tokens=v.to(device),
        sinks=sinks.to(device), lens=list(lens), page_size=page_size, seed=seed,
    )


@pytest.fixture
def decode_case():
    """Factory fixture: decode_case(lens, hq=, hkv=, head_dim=, page_size=, ...) -> DecodeCase."""
    return make_decode_case


# Kernel vs float64 reference on the same dequantised KV. What remains is the rounding of
# the output to 16 bits (half an ulp) plus fp32 arithmetic: rtol is 2 ulps of the output
# dtype, atol covers outputs near zero, where fp32 sums of cancelling terms dominate.
# (A kernel that rounds p to 16 bits once, as FlashAttention does, needs ~1e-2: see
# test_flashinfer_sinks.py.)
TOLERANCES = {torch.bfloat16: (1e-3, 2**-7), torch.float16: (2e-4, 2**-10)}  # (atol, rtol)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Every element within atol + rtol * |ref| (tolerances by out's dtype); NaN/Inf fail."""
    finite = torch.isfinite(out)
    assert finite.all(), f"{what}: {int((~finite).sum())} NaN/Inf of {out.numel()} outputs"
    atol, rtol = TOLERANCES[out.dtype]
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


@pytest.fixture
def matches_reference():
    return assert_matches_reference
