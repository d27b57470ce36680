"""The decode variants the decode_prefill lab compares, called one way: host loop (one launch
per sequence), our batched split-KV kernel, the persistent kernel (atomic or static schedule)
and the lab's defect (the persistent kernel computing sequence p in program p only)."""

from __future__ import annotations

import functools

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.attention.persistent_decode import host_loop_decode, persistent_decode_attention

VARIANTS = {
    "host_loop": host_loop_decode,
    "batched": paged_decode_attention,
    "persistent": persistent_decode_attention,
    "persistent_static": functools.partial(persistent_decode_attention, schedule="static"),
}
LAB_BUG = functools.partial(persistent_decode_attention, schedule="lab_bug")


def run_variant(name: str, kv, q, **kwargs):
    """Variant ``name`` on a PagedKV (16-bit) with keyword options of the kernels."""
    return VARIANTS[name](q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, **kwargs)
