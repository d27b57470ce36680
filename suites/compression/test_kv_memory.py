"""KV-cache bytes per format (lab 1): the formula, the quantisers' real tensors, the allocator.

The formula (kvperf_kernels.cache.kv_memory) is checked three ways: against numbers computed by
hand here, against the bytes of the tensors the quantisers actually return (CPU, small
shapes), and against torch.cuda allocation deltas (GPU). The lab's 70B table is reproduced
with the scale overhead explicit, and the maximum batch at a memory budget is checked
against the doubling law.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvperf_kernels.attention.compressed import compress
from kvperf_kernels.cache.kv_memory import (
    FORMATS,
    GIB,
    LAB_70B,
    LAB_70B_VALUES_GIB,
    allocate_kv_cache,
    format_table,
    kv_cache_bytes,
    max_batch,
    memory_table,
    stored_bytes,
    tensor_bytes,
    tensor_layout,
)
from kvperf_kernels.device import default_device

MIB = 1 << 20


# --------------------------------------------------------------------------------------
# Formula vs numbers computed by hand
# --------------------------------------------------------------------------------------

# The lab's cache: 2 (K, V) * 32 layers * 8 seqs * 8192 tokens * 32 heads * 128 = 16 Gi elements.
ELEMS_70B = 2 * 32 * 8 * 8192 * 32 * 128
ROWS_70B = ELEMS_70B // 128  # (token, head) rows of head_dim
TENSORS_70B = 2 * 32  # one K and one V tensor per layer

HAND_70B = {  # fmt: (values, scales) in bytes
    "bf16": (2 * ELEMS_70B, 0),
    "fp16": (2 * ELEMS_70B, 0),
    "fp8_per_tensor": (ELEMS_70B, 4 * TENSORS_70B),
    "fp8_per_token": (ELEMS_70B, 4 * ROWS_70B),
    "fp8_per_block128": (ELEMS_70B, 4 * ROWS_70B),  # head_dim 128: one block per row
    "mxfp8": (ELEMS_70B, ELEMS_70B // 32),
    "nvfp4": (ELEMS_70B // 2, ELEMS_70B // 16 + 4 * TENSORS_70B),
}


def test_lab_70b_values_match_the_lab_table():
    """The lab's values-only figures: FP16 32 GiB, FP8 16 GiB, FP4 8 GiB."""
    for lab_name, fmt in (("fp16", "fp16"), ("fp8", "fp8_per_tensor"), ("fp4", "nvfp4")):
        got = kv_cache_bytes(**LAB_70B, fmt=fmt).values
        assert got == LAB_70B_VALUES_GIB[lab_name] * GIB, (lab_name, got / GIB)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lab_70b_bytes_by_hand(fmt, kvperf):
    values, scales = HAND_70B[fmt]
    b = kv_cache_bytes(**LAB_70B, fmt=fmt)
    assert (b.values, b.scales, b.padding) == (values, scales, 0)
    assert b.total == values + scales
    assert b.elements == ELEMS_70B
    kvperf.info("total_GiB", b.total / GIB)
    kvperf.info("bits_per_element", b.bits_per_element)


def test_lab_70b_scale_overhead_is_explicit():
    """NVFP4 is 4.5 bits/element (9 GiB), not 4; per-token/block/MX FP8 is 8.25 (16.5 GiB)."""
    rows = {r.fmt: r for r in memory_table(**LAB_70B)}
    nv = rows["nvfp4"]
    assert nv.values_gib == 8
    assert nv.scales_bytes == 1 * GIB + 256  # E4M3 per 16 + one fp32 global per tensor
    assert nv.total_bytes == 9 * GIB + 256
    # 4 value bits + 8/16 scale bits, plus the 64 global fp32 scales spread over 16 Gi elements
    assert nv.bits_per_element == 4.5 + 8 * 256 / ELEMS_70B
    for fmt in ("fp8_per_token", "fp8_per_block128", "mxfp8"):
        assert rows[fmt].total_bytes == 16 * GIB + 512 * MIB, fmt
        assert rows[fmt].bits_per_element == 8.25
    assert rows["fp8_per_tensor"].total_bytes == 16 * GIB + 256
    assert rows["fp16"].vs_fp16 == 1.0
    assert rows["nvfp4"].vs_fp16 == (9 * GIB + 256) / (32 * GIB)
    text = format_table(list(rows.values()))
    assert "nvfp4" in text and "9.0000" in text


def test_small_shape_by_hand_compact_and_te_padding():
    # One tensor [2, 3, 64]: 6 rows of 64.
    assert tensor_bytes((2, 3, 64), "fp8_per_token").total == 384 + 6 * 4
    assert tensor_bytes((2, 3, 64), "fp8_per_tensor").total == 384 + 4
    mx = tensor_bytes((2, 3, 64), "mxfp8")
    assert (mx.values, mx.scales, mx.padding) == (384, 12, 0)
    # TE keeps MXFP8/NVFP4 rowwise scales as [round_up(rows, 128), round_up(D / block, 4)].
    mx_te = tensor_bytes((2, 3, 64), "mxfp8", scale_layout="te")
    assert (mx_te.scales, mx_te.padding) == (12, 128 * 4 - 12)
    nv_te = tensor_bytes((2, 3, 64), "nvfp4", scale_layout="te")
    assert (nv_te.values, nv_te.scales, nv_te.padding) == (192, 6 * 4 + 4, 128 * 4 - 24)
    # FP8 formats have no TE padding term here.
    assert tensor_bytes((2, 3, 64), "fp8_per_token", scale_layout="te").padding == 0


def test_bad_shapes_and_names_raise():
    with pytest.raises(ValueError, match="head_dim 64 is not a multiple of its 128"):
        kv_cache_bytes(1, 1, 1, 64, 16, "fp8_per_block128")
    with pytest.raises(ValueError, match="head_dim 40 is not a multiple of its 16"):
        tensor_bytes((4, 40), "nvfp4")
    with pytest.raises(ValueError, match="unknown KV format 'int4'"):
        tensor_bytes((4, 64), "int4")
    with pytest.raises(ValueError, match="context must be a positive int, got 0"):
        kv_cache_bytes(1, 1, 1, 64, 0, "bf16")
    with pytest.raises(ValueError, match="scale_layout"):
        tensor_bytes((4, 64), "mxfp8", scale_layout="swizzled")
    with pytest.raises(ValueError, match="budget_bytes"):
        max_batch(-1, 1, 1, 64, 16, "bf16")


# --------------------------------------------------------------------------------------
# Maximum batch at a memory budget
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget_gib", [80, 141])
def test_max_batch_is_exact(budget_gib, kvperf):
    budget = budget_gib * GIB
    cfg = {k: v for k, v in LAB_70B.items() if k != "batch"}
    for fmt in FORMATS:
        mb = max_batch(budget, **cfg, fmt=fmt)
        assert kv_cache_bytes(mb, **cfg, fmt=fmt).total <= budget
        assert kv_cache_bytes(mb + 1, **cfg, fmt=fmt).total > budget
        kvperf.info(f"max_batch.{fmt}", mb)


def test_max_batch_doubles_per_halving_within_scale_overhead():
    """Halving the bits doubles the batch; scales take back exactly their share."""
    cfg = {k: v for k, v in LAB_70B.items() if k != "batch"}
    budget = 80 * GIB
    mb = {fmt: max_batch(budget, **cfg, fmt=fmt) for fmt in FORMATS}
    assert mb["fp16"] == 20  # 4 GiB per sequence
    per_seq_fp16 = kv_cache_bytes(1, **cfg, fmt="fp16").total
    assert per_seq_fp16 == 4 * GIB
    for fmt, value_bits in (("fp8_per_tensor", 8), ("fp8_per_token", 8), ("mxfp8", 8),
                            ("fp8_per_block128", 8), ("nvfp4", 4)):
        ideal = mb["fp16"] * 16 // value_bits  # values only: exact doubling per halving
        b = kv_cache_bytes(1, **cfg, fmt=fmt)
        # with scales: the budget divided by the true bytes per sequence (fixed bytes first)
        fixed = 2 * cfg["layers"] * (4 if fmt in ("fp8_per_tensor", "nvfp4") else 0)
        with_scales = (budget - fixed) // (b.total - fixed)
        assert mb[fmt] == with_scales, fmt
        # the doubling holds up to the scale overhead: never more, at most one short of
        # what the true bits/element allow
        assert math.floor(mb["fp16"] * 16 / b.bits_per_element) - 1 <= mb[fmt] <= ideal, fmt
    # the 256 bytes of per-tensor scales cost a whole sequence at an exactly-full budget
    assert mb["fp8_per_tensor"] == 39
    assert max_batch(80 * GIB + 256, **cfg, fmt="fp8_per_tensor") == 40
    # NVFP4: 4.5 bits, so 80 GiB / 1.125 GiB per sequence, not 80
    assert mb["nvfp4"] == 71


# --------------------------------------------------------------------------------------
# Formula vs the tensors the quantisers return
# --------------------------------------------------------------------------------------

CPU_CACHE = dict(batch=2, layers=2, kv_heads=2, head_dim=128, context=5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_formula_matches_quantiser_outputs(fmt, kvperf):
    """Quantise every K and V of a small cache; the stored bytes equal the formula."""
    dev = default_device()
    g = torch.Generator().manual_seed(7)
    c = CPU_CACHE
    shape = (c["batch"], c["context"], c["kv_heads"], c["head_dim"])
    layout = tensor_layout(shape, fmt)
    stored = []
    for _layer in range(c["layers"]):
        for _kv in ("k", "v"):
            x = (torch.randn(shape, generator=g) * 3).to(dev, torch.bfloat16)
            ck = compress(x, fmt)
            # the same tensors, shapes and dtypes the allocator layout promises
            assert set(ck.tensors) == set(layout)
            for name, t in ck.tensors.items():
                assert (tuple(t.shape), t.dtype) == layout[name], (fmt, name)
            assert ck.nbytes == ck.expected_nbytes == tensor_bytes(shape, fmt).total
            stored.append(ck.tensors)
    total = stored_bytes(stored)
    assert total == kv_cache_bytes(**c, fmt=fmt).total
    kvperf.info("bytes", total)


@pytest.mark.parametrize("fmt", FORMATS)
def test_allocated_cache_matches_formula_cpu(fmt):
    c = CPU_CACHE
    cache = allocate_kv_cache(**c, fmt=fmt, device="cpu")
    assert len(cache) == c["layers"]
    assert stored_bytes(cache) == kv_cache_bytes(**c, fmt=fmt).total


# --------------------------------------------------------------------------------------
# GPU: what the CUDA caching allocator really hands out
# --------------------------------------------------------------------------------------

GPU_CACHE = dict(batch=4, layers=4, kv_heads=8, head_dim=128, context=4096)


def _requested_bytes() -> int:
    return torch.cuda.memory_stats()["requested_bytes.all.current"]


def _round_block(n: int) -> int:
    return -(-n // 512) * 512  # the caching allocator's minimum block granularity


def _check_allocated(d_alloc: int, tensors) -> None:
    """memory_allocated counts blocks: each request rounded up to 512 B, plus, where the
    allocator does not split a large block (remainder <= 1 MiB, kSmallSize), that remainder.
    Caches are emptied first, so the sizes here (MiB multiples) split exactly."""
    rounded = sum(_round_block(t.numel() * t.element_size()) for t in tensors)
    assert rounded <= d_alloc <= rounded + len(tensors) * MIB, (d_alloc, rounded)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_allocation_delta_matches_formula(fmt, kvperf):
    """allocate_kv_cache: requested bytes == formula exactly; allocated within the rounding."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before_req, before_alloc = _requested_bytes(), torch.cuda.memory_allocated()
    cache = allocate_kv_cache(**GPU_CACHE, fmt=fmt, device="cuda")
    torch.cuda.synchronize()
    d_req = _requested_bytes() - before_req
    d_alloc = torch.cuda.memory_allocated() - before_alloc
    expected = kv_cache_bytes(**GPU_CACHE, fmt=fmt).total
    tensors = [t for layer in cache for kv in layer.values() for t in kv.values()]
    assert d_req == expected
    _check_allocated(d_alloc, tensors)
    kvperf.info("allocated_bytes", d_alloc)
    kvperf.info("formula_bytes", expected)
    del cache


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_quantiser_outputs_delta_matches_formula(fmt, kvperf):
    """What stays allocated after a quantiser call is exactly the format's bytes."""
    g = torch.Generator().manual_seed(3)
    c = GPU_CACHE
    shape = (c["batch"], c["context"], c["kv_heads"], c["head_dim"])
    x = torch.randn(shape, generator=g).to("cuda", torch.bfloat16)
    compress(x, fmt)  # warm-up: kernel compilation must not be counted
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before_req, before_alloc = _requested_bytes(), torch.cuda.memory_allocated()
    ck = compress(x, fmt)
    torch.cuda.synchronize()
    d_req = _requested_bytes() - before_req
    d_alloc = torch.cuda.memory_allocated() - before_alloc
    expected = tensor_bytes(shape, fmt).total
    if fmt in ("bf16",):  # x is already bf16: compress keeps it, nothing new is stored
        assert ck.tensors["values"].data_ptr() == x.data_ptr()
        assert d_req == 0
    else:
        assert d_req == expected
        _check_allocated(d_alloc, list(ck.tensors.values()))
    kvperf.info("allocated_bytes", d_alloc)
