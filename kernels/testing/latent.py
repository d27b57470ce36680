"""Seeded inputs of the DeepSeek latent-cache suite: a ragged batch of latent tokens, its
kv_norm weight, RoPE table, shuffled page table and slot mapping, over a poisoned cache.

Values are drawn on the CPU from seeded generators, then moved. The cache starts with every
byte POISON (0xFF: an E4M3 NaN, a NaN fp32 scale, a NaN bf16 RoPE pair, E8M0 NaN), so a
read of any slot that was not written dequantises to NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvperf_kernels.latent.layouts import LatentLayout, alloc_cache, get_layout
from kvperf_kernels.latent.norm_rope import rope_cos_sin_cache
from kvperf_kernels.latent.paging import entry_slots, ragged_tokens, shuffled_block_tables

POISON = 0xFF


@dataclass
class LatentBatch:
    layout: LatentLayout
    x: torch.Tensor  # [T, d_in]
    weight: torch.Tensor  # [512] kv_norm weight
    positions: torch.Tensor  # int64 [T]
    seq_ids: torch.Tensor  # int64 [T]
    slots: torch.Tensor  # int64 [T]
    cos_sin: torch.Tensor  # float32 [max_position, 64]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    block_size: int
    num_blocks: int

    def new_cache(self, fill: int = POISON) -> torch.Tensor:
        return alloc_cache(self.layout, self.num_blocks, self.block_size, self.x.device, fill)


BIG_DRAW = 1 << 24  # above this many values, draw on the device (speed tests: GBs)


def latent_tokens(n: int, d: int, dtype, seed: int, device, *, outlier_dims: int = 8):
    """Latent-like tokens [n, d]: N(0, 1) with a log-normal per-dim spread and a few
    outlier dims (x8), like real c_kv; no bf16 subnormals (the interpreter misreads them).
    Small draws come from a CPU generator (the same values everywhere); draws above
    BIG_DRAW values from the device's (the speed tests check against references in the
    same run)."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.exp(0.5 * torch.randn(d, generator=gen))
    spread[torch.randperm(d, generator=gen)[:outlier_dims]] *= 8.0
    device = torch.device(device)
    if n * d > BIG_DRAW and device.type == "cuda":
        big = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(n, d, generator=big, device=device) * spread.to(device)
        x = torch.where(x.abs() < 1e-30, torch.full_like(x, 1e-30), x)
        return x.to(dtype)
    x = torch.randn(n, d, generator=gen) * spread
    x = torch.where(x.abs() < 1e-30, torch.full_like(x, 1e-30), x)
    return x.to(device=device, dtype=dtype)


def make_latent_batch(layout, context_lens, new_lens, block_size: int, *, dtype=torch.bfloat16,
                      seed: int = 0, device=None, max_position: int | None = None,
                      drop_every: int = 0) -> LatentBatch:
    """A ragged batch appending new_lens[b] tokens after context_lens[b] to each sequence.

    drop_every > 0 sets every drop_every-th token's slot to -1 (padding tokens)."""
    layout = get_layout(layout)
    device = device or torch.device("cpu")
    totals = [c + n for c, n in zip(context_lens, new_lens, strict=True)]
    table, num_blocks = shuffled_block_tables(totals, block_size, seed=seed)
    seq_ids, positions = ragged_tokens(list(context_lens), list(new_lens))
    slots = entry_slots(table, seq_ids, positions, block_size)
    if drop_every:
        slots[::drop_every] = -1
    gen = torch.Generator().manual_seed(seed + 7)
    weight = (0.5 + torch.rand(512, generator=gen)).to(dtype)
    max_position = max_position or max(totals, default=1) + 1
    return LatentBatch(
        layout=layout,
        x=latent_tokens(len(positions), layout.d_in, dtype, seed + 1, device),
        weight=weight.to(device), positions=positions.to(device), seq_ids=seq_ids.to(device),
        slots=slots.to(device), cos_sin=rope_cos_sin_cache(max_position).to(device),
        block_tables=table.to(device), block_size=block_size, num_blocks=num_blocks,
    )
