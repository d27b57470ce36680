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

import math
from dataclasses import dataclass

import torch

from kvperf_kernels.attention.decode_ref import attention_with_sinks_ref
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


# --------------------------------------------------------------------------------------
# The format speed workload (GPU): one set of random tokens stored in every format
# --------------------------------------------------------------------------------------

def build_format_workload(batch: int, kv_len: int, hq: int, hkv: int, head_dim: int,
                          *, page_size: int = 16, device: str = "cuda",
                          configs=tuple(FORMAT_PAIRS)) -> dict:
    """q, sinks and ``configs`` (names of FORMAT_PAIRS) over one shuffled page table, the same
    device-side random K/V written once per store format (a mixed configuration shares the
    stores of its halves)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(batch * 100003 + kv_len + head_dim)
    q = torch.randn(batch, hq, head_dim, device=dev, generator=gen).to(torch.bfloat16)
    sinks = (1.0 + 2.0 * torch.randn(hq, device=dev, generator=gen)).float()
    lens = [kv_len] * batch
    block_tables, seq_lens, num_pages, _ = build_page_table(
        lens, page_size, generator=torch.Generator().manual_seed(7), device=dev)
    slots = slot_mapping(block_tables, seq_lens, page_size)
    needed = {fmt for name in configs for fmt in FORMAT_PAIRS[name]}
    stores: dict[tuple[str, str], PagedStore] = {}
    for side in ("k", "v"):
        x = torch.randn(batch * kv_len, hkv, head_dim, device=dev, generator=gen)
        for fmt in sorted(needed):
            store = PagedStore(fmt, num_pages, page_size, hkv, head_dim, dev)
            store.write(slots, x)
            stores[side, fmt] = store
        del x
    caches = {name: FormatKV(stores["k", FORMAT_PAIRS[name][0]],
                             stores["v", FORMAT_PAIRS[name][1]], block_tables, seq_lens,
                             page_size)
              for name in configs}
    return {"q": q, "sinks": sinks, "caches": caches}


def dequantize_then_attend(kv: FormatKV, q: torch.Tensor, *, decode, **kwargs) -> torch.Tensor:
    """The unfused step the fused kernel replaces: every page of K and V decoded to BF16 by
    the quantisers' Triton dequantise kernels, then ``decode`` (the BF16 paged decode)."""
    k = kv.k_store.dequantize(dtype=torch.bfloat16, kernels=True)
    v = kv.v_store.dequantize(dtype=torch.bfloat16, kernels=True)
    return decode(q, k, v, kv.block_tables, kv.seq_lens, **kwargs)


def dequantize_bytes(kv: FormatKV) -> int:
    """Bytes dequantize_then_attend moves beyond the decode's own: every page's codes and
    scales read, and its BF16 copy written."""
    pages = kv.k_store.nbytes() + kv.v_store.nbytes()
    return pages + 2 * 2 * math.prod(kv.k_store.shape)


def spot_reference(kv: FormatKV, q: torch.Tensor, rows, *, values=torch.float32,
                   **kwargs) -> torch.Tensor:
    """The float64 reference for the sequences ``rows`` only ([len(rows), Hq, D]): their
    slots decoded by the torch references (a whole lab-sized cache would not fit float64)
    as ``values`` (bfloat16: the values a dequantise-then-attend step attends)."""
    outs = []
    for b in rows:
        lens = kv.seq_lens[b : b + 1]
        slots = slot_mapping(kv.block_tables[b : b + 1], lens, kv.page_size)
        k = kv.k_store.dequantize(slots, dtype=values)
        v = kv.v_store.dequantize(slots, dtype=values)
        outs.append(attention_with_sinks_ref(q[b], k, v, **kwargs))
    return torch.stack(outs)
