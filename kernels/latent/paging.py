"""Slot mappings for the latent caches (torch, host-side bookkeeping).

A batch of sequences appends ``new_lens[b]`` tokens after ``context_lens[b]`` cached ones;
token ``p`` of sequence ``b`` lives in slot ``block_tables[b, p // block_size] * block_size
+ p % block_size``. The compressed caches and the sliding window use the same rule on
their own index:
  * strided (the lab's CSA / HCA): token p is stored, as entry ``p // ratio``, when it
    ends a window (``(p + 1) % ratio == 0``); the others get slot -1;
  * pooled (the model's compressor): entry ``i`` is written once its window
    ``[i * ratio, (i + 1) * ratio)`` is complete, RoPE'd at position ``i * ratio``;
  * sliding window: token p goes to ring entry ``p % window`` (the last ``window`` tokens
    are kept; a sequence owns ``cdiv(window, block_size)`` blocks); a batch writes only its
    sequences' last ``window`` tokens, so no two tokens of one launch share a slot.
"""

from __future__ import annotations

import torch

from kvperf_kernels.formats.checks import check_int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def shuffled_block_tables(entries: list[int], block_size: int, *, seed: int = 0,
                          spare_blocks: int = 1) -> tuple[torch.Tensor, int]:
    """(int32 block_tables [B, max_blocks], num_blocks): sequence b owns cdiv(entries[b],
    block_size) blocks in a shuffled order; unused table entries point at block 0, which
    nobody owns (with spare_blocks >= 1), so a stray read lands in a block a test poisons."""
    check_int(block_size, "block_size", 1)
    counts = [cdiv(n, block_size) for n in entries]
    num_blocks = sum(counts) + spare_blocks
    perm = torch.randperm(num_blocks - spare_blocks,
                          generator=torch.Generator().manual_seed(seed)) + spare_blocks
    width = max(counts, default=0) or 1
    table = torch.zeros(len(entries), width, dtype=torch.int32)
    at = 0
    for b, c in enumerate(counts):
        table[b, :c] = perm[at:at + c].to(torch.int32)
        at += c
    return table, num_blocks


def entry_slots(block_tables: torch.Tensor, seq_ids: torch.Tensor, entries: torch.Tensor,
                block_size: int) -> torch.Tensor:
    """int64 slots of entries [N] (-1 stays -1) of sequences seq_ids [N]."""
    e = entries.long()
    ok = e >= 0
    e0 = torch.where(ok, e, torch.zeros_like(e))
    blocks = block_tables.long()[seq_ids.long(), e0 // block_size]
    return torch.where(ok, blocks * block_size + e0 % block_size, torch.full_like(e, -1))


def ragged_tokens(context_lens: list[int], new_lens: list[int]) -> tuple[torch.Tensor, ...]:
    """(seq_ids, positions) int64 [sum(new_lens)] of the tokens a ragged batch appends."""
    seq = [torch.full((n,), b, dtype=torch.int64) for b, n in enumerate(new_lens)]
    pos = [torch.arange(c, c + n, dtype=torch.int64) for c, n in zip(context_lens, new_lens,
                                                                       strict=True)]
    empty = torch.zeros(0, dtype=torch.int64)
    return (torch.cat(seq) if seq else empty), (torch.cat(pos) if pos else empty)


def strided_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """The lab's strided compression: entry p // ratio for a token ending its window, else -1."""
    check_int(ratio, "ratio", 1)
    p = positions.long()
    return torch.where((p + 1) % ratio == 0, p // ratio, torch.full_like(p, -1))


def window_entries(positions: torch.Tensor, seq_ends: torch.Tensor, window: int) -> torch.Tensor:
    """Ring entry p % window of the sliding-window cache for the tokens among their
    sequence's last ``window`` (seq_ends [T]: the sequence's length after this batch), -1
    for the others: two tokens of one launch never share a slot (their order on the GPU is
    not defined)."""
    check_int(window, "window", 1)
    p = positions.long()
    return torch.where(p >= seq_ends.long() - window, p % window, torch.full_like(p, -1))
