"""The decode variants the decode_prefill lab compares, called one way: host loop (one launch
per sequence), our batched split-KV kernel, the persistent kernel (atomic or static schedule)
and the lab's defect (the persistent kernel computing sequence p in program p only)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.attention.persistent_decode import host_loop_decode, persistent_decode_attention
from kvperf_kernels.cache.paged_kv import PagedKV
from kvperf_kernels.testing.inputs import make_decode_case

VARIANTS = {
    "host_loop": host_loop_decode,
    "batched": paged_decode_attention,
    "persistent": persistent_decode_attention,
    "persistent_static": functools.partial(persistent_decode_attention, schedule="static"),
}
LAB_BUG = functools.partial(persistent_decode_attention, schedule="lab_bug")


# launches the speed test times beside the default (4 per SM, 1024-token chunks, one KV head
# per item, 64-token tiles, 3 stages): on the H200 one program per SM moved 0.2 of the copy
# peak on uniform batches where the batched kernel moved 0.7; 4, 8 and 16 per SM all moved
# 0.36-0.47 (a plateau) while the token loop was double-buffered by hand, outside Triton's
# pipeliner; pipelined, 256-token chunks gave 0.66-0.70x batched on uniform batches,
# 1024-token ones 0.76-0.81x (4096: slower on skewed batches); two KV heads per item, 32-token
# tiles and 8 warps were no faster, nor the lazy accumulator rescale (~1 %)
SPEED_SWEEP = {"persistent_hp2": functools.partial(persistent_decode_attention, max_tile_cols=128),
               "persistent_hp2_s2": functools.partial(persistent_decode_attention,
                                                      max_tile_cols=128, num_stages=2),
               "persistent_s2": functools.partial(persistent_decode_attention, num_stages=2),
               "persistent_w8": functools.partial(persistent_decode_attention, num_warps=8),
               "persistent_lazy": functools.partial(persistent_decode_attention,
                                                    lazy_rescale=True),
               # the 16-bit default's register cap (128: 4 programs per SM) lifted: 140
               # offline, 3 fit (H200: 0.98-1.29x the capped time, see maxnreg)
               "persistent_uncapped": functools.partial(persistent_decode_attention, maxnreg=0)}


def run_variant(name: str, kv, q, **kwargs):
    """Variant ``name`` on a PagedKV (16-bit) with keyword options of the kernels."""
    return VARIANTS[name](q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, **kwargs)


# the speed workloads (lengths per sequence): the lab's load-balance case and uniform ones
SPEED_WORKLOADS = {
    "skewed_1x32k_63x512": [32768] + [512] * 63,
    "uniform_64x1k": [1024] * 64,
    "uniform_64x4k": [4096] * 64,
    "uniform_8x8k": [8192] * 8,
}


class SpeedCase(NamedTuple):
    q: torch.Tensor
    sinks: torch.Tensor
    kv: PagedKV
    rows: list[int]  # the checked sequences: first, longest, last
    ref: torch.Tensor  # float64 reference of those rows


def speed_case(lens) -> SpeedCase:
    """gpt-oss heads (64/8, d 64, page 16), BF16 KV, sinks, and the float64 reference of the
    first, longest and last sequences (a fast wrong variant fails its check)."""
    case = make_decode_case(lens, hq=64, hkv=8, head_dim=64, page_size=16, seed=len(lens))
    kv = case.pack(poison=False)
    rows = sorted({0, int(torch.tensor(lens).argmax()), len(lens) - 1})
    ref = paged_decode_attention_ref(case.q[rows], kv.k_cache, kv.v_cache,
                                     kv.block_tables[rows], kv.seq_lens[rows], sinks=case.sinks)
    return SpeedCase(case.q, case.sinks, kv, rows, ref)
