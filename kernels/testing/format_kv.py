"""A decode case's K/V in any KV format of ``models.paged_formats`` (MXFP8, NVFP4, K FP8 +
V NVFP4, ...), over a shuffled, NaN-poisoned page table: what the fused-decode tests and the
format speed benchmark feed the kernel, and the same stored bytes dequantised for the
float64 reference.

The stores are ``PagedStore``s (the SmolLM2 suite's cache): their quantisers run as Triton
kernels on a GPU and as the torch references elsewhere (bit-exact by the quantisers'
contracts). Every slot no sequence owns holds NaN codes or NaN scales (the stores start
so), and every block-table entry a sequence does not own points at a spare NaN page.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvperf_kernels.cache.paged_kv import build_page_table, slot_mapping
from kvperf_kernels.models.paged_formats import PagedStore

# name -> (K store format, V store format): the cache configurations the fused kernel reads
FORMAT_PAIRS: dict[str, tuple[str, str]] = {
    "bf16": ("bf16", "bf16"),
    "fp8_per_token": ("fp8_per_token", "fp8_per_token"),
    "mxfp8": ("mxfp8", "mxfp8"),
    "nvfp4": ("nvfp4", "nvfp4"),
    "k_fp8+v_nvfp4": ("fp8_per_token", "nvfp4"),
    "k_mxfp8+v_nvfp4": ("mxfp8", "nvfp4"),
}


@dataclass
class FormatKV:
    """One paged K/V cache in (k_fmt, v_fmt), with its page table."""

    k_store: PagedStore
    v_store: PagedStore
    block_tables: torch.Tensor  # int32 [B, max_pages]
    seq_lens: torch.Tensor  # int32 [B]
    page_size: int

    def kernel_kwargs(self) -> dict:
        """k_cache, v_cache, their scales and block scales, for paged_decode_attention."""
        return {**self.k_store.kernel_args("k"), **self.v_store.kernel_args("v")}

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K and V pages decoded by the torch references ([pages, size, Hkv, D]
        in ``dtype``; NaN where nothing is written): the values the fused kernel must see."""
        return self.k_store.dequantize(dtype=dtype), self.v_store.dequantize(dtype=dtype)

    def bytes_read(self) -> int:
        """K and V bytes a decode step reads: every owned token's codes and block / token
        scales, plus the per-tensor scales."""
        tokens = int(self.seq_lens.sum())
        per_token = self.k_store.bytes_per_token() + self.v_store.bytes_per_token()
        tensor_scales = sum(4 for st in (self.k_store, self.v_store)
                            for t in (st.scale, st.global_scale) if t is not None)
        return int(tokens * per_token) + tensor_scales


def pack_format_kv(k_tokens: torch.Tensor, v_tokens: torch.Tensor, lens, page_size: int,
                   k_fmt: str, v_fmt: str, *, seed: int = 0,
                   kernels: bool | None = None) -> FormatKV:
    """Write ragged K/V tokens [sum(lens), Hkv, D] (sequences concatenated) into fresh stores
    of ``k_fmt`` / ``v_fmt`` over a page table shuffled by ``seed``; one write per store, so
    static scales (FP8 per-tensor, NVFP4 global amax) cover every token."""
    block_tables, seq_lens, num_pages, _ = build_page_table(
        lens, page_size, generator=torch.Generator().manual_seed(seed + 1),
        device=k_tokens.device)
    _, hkv, dim = k_tokens.shape
    slots = slot_mapping(block_tables, seq_lens, page_size)
    stores = []
    for fmt, tokens in ((k_fmt, k_tokens), (v_fmt, v_tokens)):
        store = PagedStore(fmt, num_pages, page_size, hkv, dim, k_tokens.device,
                           kernels=kernels)
        store.write(slots, tokens)
        stores.append(store)
    return FormatKV(stores[0], stores[1], block_tables, seq_lens, page_size)


def pack_case(case, name: str, **kwargs) -> FormatKV:
    """A ``testing.inputs.DecodeCase``'s K/V as the configuration ``name`` of FORMAT_PAIRS."""
    k_fmt, v_fmt = FORMAT_PAIRS[name]
    return pack_format_kv(case.k_tokens, case.v_tokens, case.lens, case.page_size, k_fmt,
                          v_fmt, seed=case.seed, **kwargs)
