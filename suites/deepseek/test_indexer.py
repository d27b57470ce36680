"""DeepSeek's lightning indexer (issue 12, item 3): FP8 keys of 128 with one fp32 scale each
(132 B/token, DeepGEMM's paged block layout), logits = sum_h w_h ReLU(q_h . k), causal
top-k over the compressed cache.

The logits kernel is compared with its float64 reference on the same FP8 keys (DeepGEMM's
test: < 1e-3 vs a float reference, -inf masks identical, reruns bit-identical); the top-k
sets are compared up to ties, and a wrong selection must fail that comparison.
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.device import default_device
from kvperf_kernels.latent.indexer import (
    INDEX_BYTES_PER_TOKEN,
    indexer_block_bytes,
    indexer_logits,
    indexer_logits_ref,
    indexer_topk,
    indexer_write,
)
from kvperf_kernels.latent.paging import entry_slots, shuffled_block_tables
from kvperf_kernels.latent.topk import radix_topk

GPU = pytest.mark.gpu
LOGIT_REL_MAX = 1e-5  # float32 sums of exact bf16 x e4m3 products vs float64: measured ~6e-8


def _case(lens, heads, block_size, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table, nb = shuffled_block_tables(lens, block_size, seed=seed)
    cache = torch.full((nb, indexer_block_bytes(block_size)), 0xFF, dtype=torch.uint8)
    seq = torch.cat([torch.full((n,), b) for b, n in enumerate(lens)])
    idx = torch.cat([torch.arange(n) for n in lens])
    keys = torch.randn(len(seq), 128, generator=gen)
    cache = cache.to(device)
    indexer_write(keys.to(device), entry_slots(table, seq, idx, block_size).to(device), cache,
                  block_size)
    q = torch.randn(len(lens), heads, 128, generator=gen).bfloat16().to(device)
    w = torch.rand(len(lens), heads, generator=gen).to(device) / heads
    return q, w, cache, table.to(device), torch.tensor(lens).to(device)


def topk_matches_up_to_ties(got: torch.Tensor, ref_logits: torch.Tensor, k: int,
                            tol: float) -> None:
    """Every row: the same number of -1 pads, and every chosen entry's reference logit at
    least the reference k-th largest minus tol (so a different choice among ties passes)."""
    want = indexer_topk(ref_logits, k)
    assert torch.equal((got < 0).sum(-1), (want < 0).sum(-1)), "different numbers of pads"
    kth = ref_logits.topk(k, dim=-1).values[:, -1:]
    chosen = torch.gather(ref_logits, 1, got.clamp_min(0).long())
    ok = (got < 0) | (chosen >= kth - tol)
    assert ok.all(), f"{int((~ok).sum())} chosen entries below the k-th reference logit"
    for row in range(len(got)):  # no entry chosen twice
        sel = got[row][got[row] >= 0]
        assert len(sel.unique()) == len(sel)


def test_layout_bytes_by_hand(checks_device):
    """Block 4: 4 x 128 codes, then 4 fp32 scales; key 6 sits in block 1 at offset 2, its
    codes at 1 * 528 + 2 * 128, its scale at 1 * 528 + 512 + 2 * 4."""
    assert INDEX_BYTES_PER_TOKEN == 132 and indexer_block_bytes(4) == 528
    cache = torch.zeros(2, 528, dtype=torch.uint8, device=checks_device)
    key = torch.linspace(-3, 3, 128, device=checks_device)[None]
    indexer_write(key, torch.tensor([6], device=checks_device), cache, 4)
    flat = cache.view(-1).cpu()
    scale = flat[528 + 512 + 8:528 + 512 + 12].view(torch.float32).item()
    assert scale == pytest.approx(3.0 / 448, rel=1e-7)
    codes = flat[528 + 256:528 + 384].view(torch.float8_e4m3fn).float()
    assert torch.allclose(codes * scale, key.cpu()[0], rtol=2**-4, atol=1e-6)
    assert int((flat != 0).sum()) <= 132


@pytest.mark.parametrize(("lens", "heads"), [([50, 7, 0, 33], 8), pytest.param(
    [4096, 1000], 64, marks=GPU)], ids=["cpu", "gpu-64heads"])
def test_logits_match_reference(lens, heads, checks_device, kvperf):
    q, w, cache, table, lengths = _case(lens, heads, 16, checks_device)
    got = indexer_logits(q, w, cache, table, lengths, block_size=16)
    ref = indexer_logits_ref(q, w, cache, table, lengths, block_size=16)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "causal -inf masks differ"
    fin = torch.isfinite(ref)
    assert torch.isfinite(got[fin]).all()
    err = ((got.double() - ref)[fin].abs().max() / ref[fin].abs().max()).item()
    kvperf.error("logit_max_rel_err", err)
    assert err <= LOGIT_REL_MAX
    again = indexer_logits(q, w, cache, table, lengths, block_size=16)
    assert torch.equal(again, got), "reruns are not bit-identical"
    topk_matches_up_to_ties(indexer_topk(got, 16), ref, 16, tol=4 * LOGIT_REL_MAX *
                            ref[fin].abs().max().item())


def test_topk_ties_and_control(checks_device):
    """Duplicate keys make exact ties: any of them may be chosen; choosing the k smallest
    (the control) fails the same comparison."""
    q, w, cache, table, lengths = _case([40], 4, 8, checks_device, seed=3)
    # copy key 0's bytes over keys 1..3 (same block or not): four equal logits
    slots = entry_slots(table.cpu(), torch.zeros(4, dtype=torch.long), torch.arange(4), 8)
    codes = cache[:, :8 * 128].view(cache.shape[0], 8, 128)
    scales = cache[:, 8 * 128:].view(torch.float32).view(cache.shape[0], 8)
    b0, o0 = int(slots[0]) // 8, int(slots[0]) % 8
    for s in slots[1:].tolist():
        codes[s // 8, s % 8] = codes[b0, o0]
        scales[s // 8, s % 8] = scales[b0, o0]
    ref = indexer_logits_ref(q, w, cache, table, lengths, block_size=8)
    assert (ref[0, :4] == ref[0, 0]).all()
    got = indexer_logits(q, w, cache, table, lengths, block_size=8)
    topk_matches_up_to_ties(indexer_topk(got, 10), ref, 10, tol=1e-6)
    bottom = (-ref).topk(10, dim=-1).indices.to(torch.int32)
    with pytest.raises(AssertionError, match="below the k-th reference logit"):
        topk_matches_up_to_ties(bottom, ref, 10, tol=1e-6)


def test_bad_input(checks_device):
    q, w, cache, table, lengths = _case([20, 5], 4, 8, checks_device)
    logits = indexer_logits(q, w, cache, table, lengths, block_size=8)
    with pytest.raises(ValueError, match=r"k = 25 exceeds the cache's 24 entries"):
        indexer_topk(logits, 25)
    with pytest.raises(TypeError, match="q: unsupported dtype torch.float32"):
        indexer_logits(q.float(), w, cache, table, lengths, block_size=8)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 24\]"):
        indexer_logits(q, w, cache, table, lengths + 10, block_size=8)
    with pytest.raises(ValueError, match="block_tables: 1 owned page ids outside"):
        bad = table.clone()
        bad[0, 0] = cache.shape[0]
        indexer_logits(q, w, cache, bad, lengths, block_size=8)
    with pytest.raises(ValueError, match="cache: an indexer cache with block_size 4"):
        indexer_logits(q, w, cache, table, lengths, block_size=4)
    with pytest.raises(ValueError, match="weights must be a contiguous float32"):
        indexer_logits(q, w[:1], cache, table, lengths, block_size=8)


def same_topk_values(got: torch.Tensor, logits: torch.Tensor, k: int) -> None:
    """Exact up to ties: per row, the chosen entries' logits (-1 as -inf) sorted equal
    torch.topk's k largest values, and no entry is chosen twice."""
    vals = torch.gather(logits, 1, got.clamp_min(0).long())
    vals = torch.where(got < 0, torch.full_like(vals, float("-inf")), vals)
    want = logits.topk(k, dim=-1).values
    bad = (vals.sort(-1, descending=True).values != want).any(-1)
    assert not bad.any(), f"rows {bad.nonzero().flatten().tolist()} chose other values"
    for row in range(len(got)):
        sel = got[row][got[row] >= 0]
        assert len(sel.unique()) == len(sel), f"row {row} chose an entry twice"
    assert torch.equal((got < 0).sum(-1), torch.isneginf(want).sum(-1)), "pads differ"


@pytest.mark.parametrize("k", [1, 16, 57, 96])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_radix_topk_matches_torch(ties, k, checks_device):
    """The Triton top-k on the indexer's own logits (ragged lengths: rows with fewer than
    k visible entries get -1 pads; an empty row is all pads) against torch.topk. With
    ties, the logits are rounded to 1/4 so many share a value: any choice among them."""
    q, w, cache, table, lengths = _case([50, 7, 0, 96, 33], 4, 16, checks_device, seed=k)
    logits = indexer_logits(q, w, cache, table, lengths, block_size=16)
    if ties:
        logits = (logits * 4).round() / 4
    got = radix_topk(logits, k)
    assert got.shape == (5, k) and got.dtype == torch.int32
    same_topk_values(got.cpu(), logits.cpu(), k)
    assert ((got < 0) | (got < lengths[:, None])).all(), "an invisible entry was chosen"


def test_radix_topk_control_and_errors(checks_device):
    """The control: one chosen entry swapped for the best unchosen one (strictly smaller)
    must fail the comparison. Then the error contract and the empty batch."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 64, generator=gen).to(checks_device)
    got = radix_topk(logits, 8).cpu()
    same_topk_values(got, logits.cpu(), 8)
    order = logits.cpu().argsort(-1, descending=True)
    wrong = got.clone()
    wrong[1, (got[1] == order[1, 0]).nonzero()[0, 0]] = order[1, 8].to(torch.int32)
    with pytest.raises(AssertionError, match=r"rows \[1\] chose other values"):
        same_topk_values(wrong, logits.cpu(), 8)
    with pytest.raises(ValueError, match=r"k = 65 exceeds the cache's 64 entries"):
        radix_topk(logits, 65)
    with pytest.raises(TypeError, match="logits: unsupported dtype torch.float64"):
        radix_topk(logits.double(), 8)
    with pytest.raises(ValueError, match="logits must have a contiguous last dim"):
        radix_topk(logits.t(), 2)
    nan = logits.clone()
    nan[2, 5] = float("nan")
    with pytest.raises(ValueError, match="logits: contains NaN"):
        radix_topk(nan, 8)
    assert radix_topk(logits[:0], 8).shape == (0, 8)


@GPU
@pytest.mark.parametrize("rows", [64, 128])
def test_radix_topk_speed(rows, kv_bench, kvperf):
    """Top-2048 of 32,768 logits per row: the Triton radix select (without its NaN scan,
    a host sync) beside torch.topk in the same run; both checked against torch.topk's
    values."""
    n, k = 32768, 2048
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, n, generator=gen).to(default_device())
    moved = rows * n * 4 + rows * k * 4
    ours = kv_bench(radix_topk, logits, k, check_nan=False, bytes_moved=moved)
    same_topk_values(ours.value.cpu(), logits.cpu(), k)
    peer = kv_bench(indexer_topk, logits, k, bytes_moved=moved, label="torch.topk")
    same_topk_values(peer.value.cpu(), logits.cpu(), k)
    if ours.median_us and peer.median_us:
        kvperf.info("radix_over_torch_time", round(ours.median_us / peer.median_us, 3))


@GPU
@pytest.mark.parametrize("rows", [64, 128])
def test_logits_topk_speed(rows, kv_bench, kvperf):
    """Decode-time indexer: rows queries x 64 heads over 32,768 compressed keys each, then
    top-2048. TFLOP/s counts the q . k products (2 x 64 x 128 per key)."""
    n, heads = 32768, 64
    q, w, cache, table, lengths = _case([n] * rows, heads, 64, default_device(), seed=5)

    def step():
        return indexer_topk(indexer_logits(q, w, cache, table, lengths, block_size=64), 2048)

    flops = 2.0 * rows * heads * 128 * n
    moved = rows * n * INDEX_BYTES_PER_TOKEN + rows * n * 4 * 2  # keys + logits out/in
    res = kv_bench(step, flops=flops, bytes_moved=moved)
    logits = indexer_logits(q[:1], w[:1], cache, table[:1], lengths[:1], block_size=64)
    ref = indexer_logits_ref(q[:1], w[:1], cache, table[:1], lengths[:1], block_size=64)
    topk_matches_up_to_ties(res.value[:1], ref, 2048,
                            tol=4 * LOGIT_REL_MAX * ref.abs().max().item())
    assert torch.isfinite(logits).all()
    only = kv_bench(indexer_logits, q, w, cache, table, lengths, block_size=64, flops=flops,
                    bytes_moved=rows * n * (INDEX_BYTES_PER_TOKEN + 4), label="logits")
    if only.tflops:
        kvperf.info("logits_tflops", round(only.tflops, 1))
