"""The decode variants the decode_prefill lab compares, called one way: host loop (one launch
per sequence), our batched split-KV kernel, the persistent kernel (atomic or static schedule)
and the lab's defect (the persistent kernel computing sequence p in program p only)."""

from __future__ import annotations

import functools

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.attention.persistent_decode import host_loop_decode, persistent_decode_attention
from kvperf_kernels.device import sm_count

VARIANTS = {
    "host_loop": host_loop_decode,
    "batched": paged_decode_attention,
    "persistent": persistent_decode_attention,
    "persistent_static": functools.partial(persistent_decode_attention, schedule="static"),
}
LAB_BUG = functools.partial(persistent_decode_attention, schedule="lab_bug")


def persistent_per_sm(programs_per_sm: int):
    """The persistent kernel with programs_per_sm programs per SM (its default is
    PROGRAMS_PER_SM: the atomic counter hands out items to any number of programs)."""
    def run(q, *args, **kwargs):
        return persistent_decode_attention(q, *args, **kwargs,
                                           num_programs=programs_per_sm * sm_count(q.device))
    return run


# launches the speed test times beside the default (4 per SM, 1024-token chunks, 3 stages):
# on the H200 one program per SM moved 0.2 of the copy peak on uniform batches where
# the batched kernel moved 0.7; 4, 8 and 16 per SM all moved 0.36-0.47 (a plateau) while the
# token loop was double-buffered by hand, outside Triton's pipeliner; pipelined, 256-token
# chunks gave 0.66-0.70x batched on uniform batches, 1024-token ones 0.75-0.81x
SPEED_SWEEP = {"persistent_x8": persistent_per_sm(8),
               "persistent_s2": functools.partial(persistent_decode_attention, num_stages=2),
               "persistent_c256": functools.partial(persistent_decode_attention,
                                                    chunk_tokens=256),
               "persistent_c4096": functools.partial(persistent_decode_attention,
                                                     chunk_tokens=4096)}


def run_variant(name: str, kv, q, **kwargs):
    """Variant ``name`` on a PagedKV (16-bit) with keyword options of the kernels."""
    return VARIANTS[name](q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, **kwargs)
