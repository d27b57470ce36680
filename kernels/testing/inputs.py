"""Seeded inputs the suites share: KV-like tensors and decode cases over a poisoned paged cache.

Drawn on the CPU from seeded generators (the same values on every machine), then moved.
A decode case holds the dense K/V tokens once, so the same values can be packed as BF16,
FP8 per-tensor or FP8 per-token KV over the same (seeded, shuffled) page table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvperf_kernels.cache.paged_kv import PagedKV, pack_paged_kv
from kvperf_kernels.device import default_device


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


# Key growth along each sequence, for the lazy accumulator rescale (keep a stale running max
# until some row's grows by more than 8 log2): "gentle" raises every tile's max a little
# (the stale max stays, p grows to ~2^6 at 16-token tiles), "jumps" makes later tiles' scores
# far larger (a rescale mid-sequence), "flat" changes nothing.
KEY_GROWTH = {"flat": lambda t: 1.0, "gentle": lambda t: 1.0 + 0.02 * t,
              "jumps": lambda t: 6.0 if t % 40 > 30 else 1.0}


def with_growing_keys(case: DecodeCase, growth: str) -> DecodeCase:
    """The case with token t of every sequence's key scaled by KEY_GROWTH[growth](t)."""
    scale = KEY_GROWTH[growth]
    factors = torch.tensor([scale(t) for n in case.lens for t in range(n)],
                           dtype=case.k_tokens.dtype, device=case.k_tokens.device)
    return dataclasses.replace(case, k_tokens=case.k_tokens * factors[:, None, None])
