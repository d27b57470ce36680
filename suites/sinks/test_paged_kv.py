"""The paged cache layout the kernel and the reference share: page tables for ragged lengths,
packing/gathering, FP8 scales from the project quantisers, NaN poisoning, FlashInfer's CSR
form of the same table."""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.cache.paged_kv import (
    E4M3FNUZ_MAX,
    build_page_table,
    cdiv,
    gather_paged,
    pack_paged_kv,
    quantize_fp8_tokens,
    slot_mapping,
    to_flashinfer_indices,
)
from kvperf_kernels.device import default_device
from kvperf_kernels.quant.fp8 import quantize_per_tensor, quantize_per_token

LENS = (1, 16, 17, 50)


def test_page_table_ragged_and_shuffled():
    gen = torch.Generator().manual_seed(0)
    table, lens, num_pages, poison = build_page_table(LENS, 16, spare_pages=2, generator=gen)
    assert lens.tolist() == list(LENS) and lens.dtype == torch.int32
    assert table.dtype == torch.int32 and table.shape == (4, cdiv(50, 16))
    owned = [table[b, : cdiv(n, 16)].tolist() for b, n in enumerate(LENS)]
    flat = [p for pages in owned for p in pages]
    assert sorted(flat) == list(range(sum(cdiv(n, 16) for n in LENS)))  # each page once
    assert num_pages == len(flat) + 2 and poison == num_pages - 1
    for b, n in enumerate(LENS):  # unowned entries point at the poison page
        assert (table[b, cdiv(n, 16):] == poison).all()
    assert flat != sorted(flat), "pages were handed out in order: the shuffle did nothing"


@pytest.mark.parametrize("bad, exc", [([3, 0], ValueError), ([3, 2.0], TypeError)])
def test_page_table_rejects_bad_lengths(bad, exc):
    with pytest.raises(exc, match="seq_lens"):
        build_page_table(bad, 16)


def test_page_table_of_no_sequences_is_empty():
    table, lens, num_pages, poison = build_page_table([], 16, spare_pages=2)
    assert table.shape == (0, 0) and lens.shape == (0,) and (num_pages, poison) == (2, 1)
    assert slot_mapping(table, lens, 16).shape == (0,)


@pytest.mark.parametrize("page_size", [16, 64])
def test_pack_gather_roundtrip_and_poison(page_size):
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(sum(LENS), 2, 64, generator=gen)
    v = torch.randn(sum(LENS), 2, 64, generator=gen)
    kv = pack_paged_kv(k, v, LENS, page_size, generator=gen)
    for cache, src in ((kv.k_cache, k), (kv.v_cache, v)):
        back = torch.cat(gather_paged(cache, kv.block_tables, kv.seq_lens, page_size))
        assert torch.equal(back, src.to(torch.bfloat16))
        # Every slot no sequence owns is NaN, every owned one is finite.
        nan_slots = torch.isnan(cache.float()).flatten(2).all(-1).sum().item()
        assert nan_slots == cache.shape[0] * page_size - sum(LENS)
        assert torch.isfinite(back.float()).all()


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_fp8_pack_uses_project_quantisers(granularity):
    """Stored bytes and scales are exactly what kvperf_kernels.quant.fp8 gives for the valid
    tokens (per-token: one scale per token vector over head_dim)."""
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(sum(LENS), 2, 64, generator=gen) * 3
    v = torch.randn(sum(LENS), 2, 64, generator=gen)
    kv = pack_paged_kv(k, v, LENS, 16, kv_dtype=torch.float8_e4m3fn,
                       scale_granularity=granularity, generator=gen)
    # the project's quantiser kernel, where it runs (a GPU, or the CPU interpreter)
    quantise = quantize_per_tensor if granularity == "per_tensor" else quantize_per_token
    expect_q, expect_scale = (t.cpu() for t in quantise(k.to(default_device())))
    stored = torch.cat(gather_paged(kv.k_cache, kv.block_tables, kv.seq_lens, 16))
    assert torch.equal(stored.view(torch.uint8), expect_q.view(torch.uint8))
    if granularity == "per_tensor":
        assert kv.k_scale.shape == (1,) and torch.equal(kv.k_scale, expect_scale.reshape(1))
    else:
        assert kv.k_scale.shape == kv.k_cache.shape[:3]
        scales = torch.cat(gather_paged(kv.k_scale, kv.block_tables, kv.seq_lens, 16))
        assert torch.equal(scales, expect_scale.squeeze(-1))
        assert torch.isnan(kv.k_scale).sum() == (kv.k_scale.numel() - sum(LENS) * 2)
    deq = stored.float() * (kv.k_scale if granularity == "per_tensor" else scales[..., None])
    rel = ((deq - k).norm() / k.norm()).item()
    assert 0 < rel < 0.05, rel  # E4M3 keeps 3 mantissa bits: a few % rms


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fnuz"), reason="torch lacks e4m3fnuz")
@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_fnuz_quantisation(granularity):
    """e4m3fnuz uses max 240 (not 448): amax maps to 240 and the round trip is within
    E4M3's half-ulp (2^-4 relative) of the input, element by element."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 2, 64, generator=gen) * 5
    q, scale = quantize_fp8_tokens(x, granularity, torch.float8_e4m3fnuz)
    assert q.dtype == torch.float8_e4m3fnuz
    s = scale if granularity == "per_tensor" else scale[..., None]
    assert torch.isclose(q.float().abs().amax(), torch.tensor(E4M3FNUZ_MAX))
    deq = q.float() * s
    normal = (x / s).abs() >= 2.0**-7  # e4m3fnuz normals start at 2^-7
    err = (deq - x).abs()[normal] / x.abs()[normal]
    assert err.max() <= 2.0**-4 + 1e-6


def test_flashinfer_indices_describe_the_same_slots():
    gen = torch.Generator().manual_seed(4)
    table, lens, _, _ = build_page_table(LENS, 16, generator=gen)
    indptr, indices, last = to_flashinfer_indices(table, lens, 16)
    assert indptr.tolist() == [0, 1, 2, 4, 8] and last.tolist() == [1, 16, 1, 2]
    slots = []
    for b in range(len(LENS)):
        pages = indices[indptr[b]: indptr[b + 1]].long()
        n_pages = len(pages)
        for i, p in enumerate(pages.tolist()):
            count = last[b].item() if i == n_pages - 1 else 16
            slots += [p * 16 + s for s in range(count)]
    assert slots == slot_mapping(table, lens, 16).tolist()
