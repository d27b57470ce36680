"""Decode speed, gpt-oss shapes (Hq 64, Hkv 8, D 64, page 16, with sinks): BF16 vs FP8 KV,
kv length 1K / 8K / 32K, batch 1 and 64; ours and FlashInfer's in the same run.

kv_bench records median us, GB/s and the fraction of the measured copy bandwidth (baselined
per GPU). bytes_moved = K+V bytes the step must read (plus per-token scales) + q + out.
The H100 goal (issue 5): FP8 KV with sinks >= 85 % of copy bandwidth at long context, i.e.
>= 1.5x FlashInfer's FP8 decode and >= 1.8x our BF16 decode; recorded as info ratios, not
asserted (no timed asserts). Every timed call's output is checked against the float64
reference on the first and last sequence, so a fast wrong kernel fails.

FlashInfer: the fa2 tensor-core decode wrapper (what the issue's 412/336 us numbers come
from) ignores `sinks` in 0.7.2.post1 (see test_flashinfer_sinks.py), so it is timed and
checked as plain decode; XQA (the sm90 path of trtllm_batch_decode) is timed with sinks.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.cache.paged_kv import PagedKV, to_flashinfer_indices
from kvperf_kernels.testing.decode_workloads import (
    HKV,
    HQ,
    PAGE,
    SMALL_WORKING_SET,
    D,
    build_decode_workload,
    decode_bytes_moved,
)

SHAPES = [(b, n) for b in (1, 64) for n in (1024, 8192, 32768)]
IDS = [f"batch{b}-kv{n}" for b, n in SHAPES]
TOL_16BIT_P = (1e-2, 1e-2)  # FlashInfer's own tolerance for a kernel rounding P to 16 bits
TOL_XQA_FP8 = (1e-1, 1e-1)  # XQA's Hopper FP8 kernel rounds Q and P to E4M3


def _check_spot(out, q, kv: PagedKV, sinks, tol, what: str) -> None:
    """Float64 reference on the first and last sequence (a full one costs minutes)."""
    rows = [0, q.shape[0] - 1]
    ref = paged_decode_attention_ref(
        q[rows], kv.k_cache, kv.v_cache, kv.block_tables[rows], kv.seq_lens[rows],
        k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks,
    )
    got = out[rows].double()
    assert torch.isfinite(got).all(), f"{what}: NaN/Inf in the output"
    atol, rtol = tol
    err = (got - ref).abs()
    bad = err > atol + rtol * ref.abs()
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {got.numel()} spot-checked outputs beyond atol={atol} "
        f"rtol={rtol} (max err {err.max().item():.3g})"
    )


def _check_workload(q, kv: PagedKV, sinks, kv_len: int) -> None:
    """The timed calls pass max_seq_len (no sync, no data checks): one checked call first
    (lengths <= kv_len and within the table, page ids, sinks, scales), untimed."""
    paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
                           k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks,
                           max_seq_len=kv_len, checked=True)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, kv_len", SHAPES, ids=IDS)
def test_decode_speed_ours(batch, kv_len, kv_bench, kvperf):
    data = build_decode_workload(batch, kv_len)
    q, sinks = data["q"], data["sinks"]
    median = {}
    for name, kv in data["caches"].items():
        out = torch.full_like(q, float("nan"))
        moved = decode_bytes_moved(kv, q)
        _check_workload(q, kv, sinks, kv_len)
        res = kv_bench(
            paged_decode_attention, q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
            k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks, max_seq_len=kv_len, out=out,
            bytes_moved=moved, flush_l2=moved < SMALL_WORKING_SET, label=f"ours_{name}",
        )
        _check_spot(out, q, kv, sinks, (1e-3, 2**-7), f"ours {name}")
        median[name] = res.median_us
    if median["bf16"] and median["fp8_tensor"]:
        kvperf.info("fp8_tensor_speedup_vs_bf16", round(median["bf16"] / median["fp8_tensor"], 3))
        kvperf.info("fp8_token_speedup_vs_bf16", round(median["bf16"] / median["fp8_token"], 3))
    kvperf.info("goal", "FP8 KV >= 0.85 of copy bandwidth at long context, >= 1.8x our BF16")


@pytest.mark.gpu
@pytest.mark.requires("flashinfer", "0.7")
@pytest.mark.parametrize("batch, kv_len", SHAPES, ids=IDS)
def test_decode_speed_flashinfer(batch, kv_len, kv_bench, kvperf):
    import flashinfer
    from flashinfer.decode import xqa_batch_decode_with_kv_cache

    kvperf.info("flashinfer", flashinfer.__version__)
    # only the two caches FlashInfer runs
    data = build_decode_workload(batch, kv_len, variants=("bf16", "fp8_tensor"))
    q, sinks = data["q"], data["sinks"]
    sm_scale = 1.0 / math.sqrt(D)
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=q.device)
    median = {}
    for name in ("bf16", "fp8_tensor"):
        kv = data["caches"][name]
        fp8 = name != "bf16"
        k_scale = float(kv.k_scale) if fp8 else 1.0
        v_scale = float(kv.v_scale) if fp8 else 1.0
        moved = decode_bytes_moved(kv, q)
        flush = moved < SMALL_WORKING_SET
        caches = (kv.k_cache, kv.v_cache)

        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=True, backend="fa2")
        indptr, indices, last = to_flashinfer_indices(kv.block_tables, kv.seq_lens, PAGE)
        wrapper.plan(indptr, indices, last, HQ, HKV, D, PAGE, q_data_type=q.dtype,
                     kv_data_type=kv.k_cache.dtype, sm_scale=sm_scale)
        res = kv_bench(wrapper.run, q, caches, k_scale=k_scale, v_scale=v_scale,
                       bytes_moved=moved, flush_l2=flush, label=f"fa2_tc_nosinks_{name}")
        _check_spot(res.value, q, kv, None, TOL_16BIT_P, f"FlashInfer fa2 tensor-core {name}")
        median[f"fa2_{name}"] = res.median_us

        out = torch.empty_like(q)
        res = kv_bench(xqa_batch_decode_with_kv_cache, q, caches, workspace, kv.block_tables,
                       kv.seq_lens, kv_len, bmm1_scale=k_scale * sm_scale, bmm2_scale=v_scale,
                       sinks=sinks, out=out, kv_layout="NHD", bytes_moved=moved,
                       flush_l2=flush, label=f"xqa_{name}")
        _check_spot(out, q, kv, sinks, TOL_XQA_FP8 if fp8 else TOL_16BIT_P, f"XQA {name}")
        median[f"xqa_{name}"] = res.median_us

    # Ours on the same FP8 cache in the same test, for the issue's >= 1.5x target.
    kv = data["caches"]["fp8_tensor"]
    out = torch.empty_like(q)
    moved = decode_bytes_moved(kv, q)
    _check_workload(q, kv, sinks, kv_len)
    res = kv_bench(paged_decode_attention, q, kv.k_cache, kv.v_cache, kv.block_tables,
                   kv.seq_lens, k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks,
                   max_seq_len=kv_len, out=out, bytes_moved=moved,
                   flush_l2=moved < SMALL_WORKING_SET, label="ours_fp8_tensor")
    _check_spot(out, q, kv, sinks, (1e-3, 2**-7), "ours fp8_tensor")
    if res.median_us and median["fa2_fp8_tensor"]:
        ours_us = res.median_us
        kvperf.info("ours_fp8_speedup_vs_fa2_fp8", round(median["fa2_fp8_tensor"] / ours_us, 3))
        kvperf.info("ours_fp8_speedup_vs_xqa_fp8", round(median["xqa_fp8_tensor"] / ours_us, 3))
        kvperf.info("fa2_fp8_speedup_vs_bf16",
                    round(median["fa2_bf16"] / median["fa2_fp8_tensor"], 3))
