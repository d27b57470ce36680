"""DeepSeek compressed latent caches (issue 12, item 2): the lab's strided CSA (every 4th
token) and HCA (every 128th), the model's learned pooling compressor (softmax-weighted sum
over each window, overlapping by one window at ratio 4, plain at 128), the sliding window
every compressed layer keeps, and the bytes of each, per token and per cache.

The pooling kernel is compared with a float64 reference written the way the model writes
it (window reshape, overlap transform, softmax over rows), on test-set weights drawn here;
a control without the position bias (ape) must fail that comparison. Compressed entries
are stored by the fused write kernel (kv_norm, RoPE at the window start, FP8), so their
bytes are compared bit for bit with the write reference on the same pooled values.
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.latent.compress import (
    CSA_RATIO,
    HCA_RATIO,
    SLIDING_WINDOW,
    PoolingState,
    compressed_cache_bytes,
    overlap_for,
    pool_compress,
    pool_compress_ref,
    window_cache_bytes,
)
from kvperf_kernels.latent.gather import latent_gather, latent_gather_ref
from kvperf_kernels.latent.layouts import LAB, LAYOUTS, MODEL1, alloc_cache
from kvperf_kernels.latent.norm_rope import kv_norm_rope_ref, rope_cos_sin_cache
from kvperf_kernels.latent.paging import (
    entry_slots,
    shuffled_block_tables,
    strided_entries,
    window_entries,
)
from kvperf_kernels.latent.write import latent_write, latent_write_ref
from kvperf_kernels.testing.compare import same_bytes
from kvperf_kernels.testing.latent import POISON, make_latent_batch

HIDDEN = 64  # the test model's hidden size (V4's is 7168; the pooling does not see it)
POOL_REL_L2_MAX = 1e-5  # float32 exp and sums vs float64: measured ~2e-7


def _projections(seq_lens, ratio, device, seed=0):
    """kv, score [T, coff*512] of seeded hidden states through seeded wkv / wgate, and ape."""
    coff = 2 if overlap_for(ratio) else 1
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(seq_lens), HIDDEN, generator=gen)
    wkv = torch.randn(coff * 512, HIDDEN, generator=gen) / HIDDEN**0.5
    wgate = torch.randn(coff * 512, HIDDEN, generator=gen) / HIDDEN**0.5
    ape = 0.5 * torch.randn(ratio, coff * 512, generator=gen)
    return (x @ wkv.T).to(device), (x @ wgate.T).to(device), ape.to(device)


CASES = [(CSA_RATIO, [13, 0, 9, 4]), (HCA_RATIO, [130, 256, 127])]
IDS = ["csa-ratio4-overlap", "hca-ratio128"]


@pytest.mark.parametrize(("ratio", "lens"), CASES, ids=IDS)
def test_pool_matches_reference(ratio, lens, checks_device, kvperf):
    kv, score, ape = _projections(lens, ratio, checks_device)
    out = pool_compress(kv, score, ape, lens, ratio)
    ref = pool_compress_ref(kv, score, ape, lens, ratio)
    assert out.shape == (sum(n // ratio for n in lens), 512)
    m = kvperf.errors(out, ref, prefix="pool_")
    assert m["rel_l2_err"] <= POOL_REL_L2_MAX, m
    # the control: the same pooling without the position bias is far outside the budget
    no_ape = pool_compress(kv, score, torch.zeros_like(ape), lens, ratio)
    miss = ((no_ape.double() - ref).norm() / ref.norm()).item()
    assert miss > 100 * POOL_REL_L2_MAX, f"dropping ape went unnoticed ({miss:.3g})"


def test_uniform_scores_average_the_window(checks_device):
    """Equal scores: each entry is the plain mean of its rows: 8 at ratio 4 (previous
    window's first half, own window's second half), 4 for entry 0, 128 at ratio 128."""
    lens = [12]
    kv, score, ape = _projections(lens, CSA_RATIO, checks_device, seed=1)
    out = pool_compress(kv, torch.zeros_like(score), torch.zeros_like(ape), lens, CSA_RATIO)
    k = kv.double().reshape(3, 4, 1024)
    want = torch.stack([k[0, :, 512:].mean(0)] +
                       [torch.cat([k[i - 1, :, :512], k[i, :, 512:]]).mean(0) for i in (1, 2)])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    lens = [128]
    kv, score, ape = _projections(lens, HCA_RATIO, checks_device, seed=2)
    out = pool_compress(kv, torch.zeros_like(score), torch.zeros_like(ape), lens, HCA_RATIO)
    torch.testing.assert_close(out.double(), kv.double().mean(0, keepdim=True), rtol=1e-5,
                               atol=1e-6)


def _packed_rows(t, lens, first, last):
    """Rows [first_b, last_b) of each packed sequence b, packed again."""
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    return torch.cat([t[s + a:s + b] for s, a, b in zip(starts, first, last, strict=True)])


def _decode(state, kv, score, lens, prefix, steps):
    """Feed tokens prefix_b .. prefix_b + steps - 1 of each sequence one step at a time;
    returns {(sequence, entry): (pooled, step)} of what the state emitted."""
    got = {}
    for t in range(steps):
        pos = [p + t for p in prefix]
        out, seqs, index = state.step(_packed_rows(kv, lens, pos, [p + 1 for p in pos]),
                                      _packed_rows(score, lens, pos, [p + 1 for p in pos]))
        for e, b, i in zip(out, seqs.tolist(), index.tolist(), strict=True):
            assert (b, i) not in got, f"entry {i} of sequence {b} emitted twice"
            got[(b, i)] = (e, t)
    return got


DECODE_CASES = [(CSA_RATIO, [0, 3, 6, 9], 9), (HCA_RATIO, [0, 100, 127], 130)]


@pytest.mark.parametrize(("ratio", "prefix", "steps"), DECODE_CASES, ids=IDS)
def test_decode_state_matches_prefill(ratio, prefix, steps, checks_device):
    """Prefill prefix_b tokens, then decode `steps` tokens one at a time: each window the
    decode completes gives the prefill kernel's entry for the whole sequence bit for bit,
    at the step of the window's last token, once; partial windows give nothing."""
    lens = [p + steps for p in prefix]
    kv, score, ape = _projections(lens, ratio, checks_device, seed=6)
    want = pool_compress(kv, score, ape, lens, ratio)
    first = [0] + [sum(n // ratio for n in lens[:b]) for b in range(1, len(lens))]
    state = PoolingState(len(lens), ape, ratio)
    state.prefill(_packed_rows(kv, lens, [0] * len(lens), prefix),
                  _packed_rows(score, lens, [0] * len(lens), prefix), prefix)
    got = _decode(state, kv, score, lens, prefix, steps)
    expect = {(b, i) for b, (p, n) in enumerate(zip(prefix, lens, strict=True))
              for i in range(p // ratio, n // ratio)}
    assert set(got) == expect, f"emitted {sorted(set(got) ^ expect)} wrongly"
    for (b, i), (entry, t) in got.items():
        assert prefix[b] + t == (i + 1) * ratio - 1, f"entry {i} of {b} emitted early/late"
        assert torch.equal(entry, want[first[b] + i]), f"entry {i} of sequence {b} differs"


def test_decode_state_control(checks_device):
    """The control: the same decode with two tokens of one window swapped (each then gets
    the other's position bias) emits that entry at the same step, but not the prefill's."""
    ratio, prefix, steps = CSA_RATIO, [2], 6
    lens = [prefix[0] + steps]
    kv, score, ape = _projections(lens, ratio, checks_device, seed=7)
    want = pool_compress(kv, score, ape, lens, ratio)
    perm = torch.arange(lens[0])
    perm[[4, 5]] = perm[[5, 4]]  # tokens 4 and 5: the middle of entry 1's window
    state = PoolingState(1, ape, ratio)
    state.prefill(kv[:2], score[:2], prefix)
    got = _decode(state, kv[perm], score[perm], lens, prefix, steps)
    assert set(got) == {(0, 0), (0, 1)}
    assert torch.equal(got[(0, 0)][0], want[0])
    miss = ((got[(0, 1)][0] - want[1]).norm() / want[1].norm()).item()
    assert miss > 100 * POOL_REL_L2_MAX, f"swapped tokens went unnoticed ({miss:.3g})"


def test_decode_state_bad_input(checks_device):
    kv, score, ape = _projections([8], CSA_RATIO, checks_device)
    state = PoolingState(2, ape, CSA_RATIO)
    with pytest.raises(ValueError, match=r"kv must be \[2, 1024\], got \(1, 1024\)"):
        state.step(kv[:1], score[:1])
    with pytest.raises(ValueError, match="seq_lens: one length per sequence"):
        state.prefill(kv, score, [8])
    with pytest.raises(ValueError, match=r"kv must be \[9, 1024\]"):
        state.prefill(kv, score, [4, 5])
    with pytest.raises(ValueError, match=r"ape must be a contiguous \[4, 2 x d\]"):
        PoolingState(2, ape[:2], CSA_RATIO)
    with pytest.raises(TypeError, match="kv: unsupported dtype torch.bfloat16"):
        state.step(kv[:2].bfloat16(), score[:2])
    out, seqs, index = PoolingState(0, ape, CSA_RATIO).step(kv[:0], score[:0])
    assert out.shape == (0, 512) and len(seqs) == 0 and len(index) == 0


@pytest.mark.parametrize(("ratio", "lens"), CASES, ids=IDS)
def test_learned_compressed_cache(ratio, lens, checks_device, kvperf):
    """Pool, then kv_norm + RoPE at each window's start + FP8 into a model1 cache: bytes
    equal the write reference on the kernel's pooled values; dequantised entries match the
    float64 pooling through the float32 norm/RoPE reference (cosine >= 0.99)."""
    kv, score, ape = _projections(lens, ratio, checks_device, seed=3)
    pooled = pool_compress(kv, score, ape, lens, ratio)
    entries = [n // ratio for n in lens]
    seq = torch.cat([torch.full((g,), b) for b, g in enumerate(entries)])
    idx = torch.cat([torch.arange(g) for g in entries])
    positions = (idx * ratio).to(checks_device)
    bs = 2
    table, nb = shuffled_block_tables(entries, bs, seed=ratio)
    slots = entry_slots(table, seq, idx, bs).to(checks_device)
    weight = (0.5 + torch.rand(512, generator=torch.Generator().manual_seed(4))).to(
        checks_device)
    cos_sin = rope_cos_sin_cache(max(lens) + 1).to(checks_device)
    ours = alloc_cache(MODEL1, nb, bs, checks_device, POISON)
    ref = ours.clone()
    latent_write(pooled, weight, positions, cos_sin, slots, ours, layout=MODEL1, block_size=bs)
    latent_write_ref(pooled, weight, positions, cos_sin, slots, ref, layout=MODEL1,
                     block_size=bs)
    same_bytes(ours, ref, f"ratio {ratio} compressed cache")
    got = latent_gather(ours, slots, layout=MODEL1, block_size=bs, out_dtype=torch.float32)
    want = kv_norm_rope_ref(pool_compress_ref(kv, score, ape, lens, ratio).float(), weight,
                            positions, cos_sin, MODEL1)
    m = kvperf.errors(got, want, prefix="stored_")
    assert m["cosine"] >= 0.99, m
    kvperf.info("compressed_entries", len(idx))


@pytest.mark.parametrize("ratio", [CSA_RATIO, HCA_RATIO], ids=["csa4", "hca128"])
def test_lab_strided_cache(ratio, checks_device):
    """The lab's form: the token ending each window is stored as it is; entry i of the
    strided cache reads back exactly as token (i + 1) * ratio - 1 of the full cache."""
    lens = [2 * ratio + 3, ratio - 1]  # the second sequence has no complete window yet
    batch = make_latent_batch(LAB, [0, 0], lens, 4, device=checks_device, seed=ratio)
    entries = strided_entries(batch.positions.cpu(), ratio)
    counts = [n // ratio for n in lens]
    table, nb = shuffled_block_tables(counts, 4, seed=1)
    slots = entry_slots(table, batch.seq_ids.cpu(), entries, 4).to(checks_device)
    ours = alloc_cache(LAB, nb, 4, checks_device, POISON)
    ref = ours.clone()
    latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, slots, ours,
                 layout=LAB, block_size=4)
    latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, slots, ref,
                     layout=LAB, block_size=4)
    same_bytes(ours, ref, "strided cache")
    full = batch.new_cache()
    latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots,
                     full, layout=LAB, block_size=4)
    kept = slots >= 0
    assert int(kept.sum()) == sum(counts)
    got = latent_gather(ours, slots[kept], layout=LAB, block_size=4)
    same_bytes(got, latent_gather_ref(full, batch.slots[kept], layout=LAB, block_size=4,
                                      out_dtype=got.dtype), "strided entries vs full cache")
    assert ((batch.positions[kept] + 1) % ratio == 0).all()


def test_sliding_window_keeps_the_last_tokens(checks_device):
    """A ring of W entries per sequence holds exactly its last W tokens (W = 16 here, 128
    in the model: the rule does not depend on W); earlier tokens are not written."""
    window, bs, lens = 16, 4, [40, 7]
    batch = make_latent_batch(MODEL1, [0, 0], lens, bs, device=checks_device, seed=5)
    ends = torch.tensor(lens)[batch.seq_ids.cpu()]
    ring = window_entries(batch.positions.cpu(), ends, window)
    table, nb = shuffled_block_tables([window] * len(lens), bs, seed=2)
    slots = entry_slots(table, batch.seq_ids.cpu(), ring, bs).to(checks_device)
    cache = alloc_cache(MODEL1, nb, bs, checks_device, POISON)
    latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, slots, cache,
                 layout=MODEL1, block_size=bs)
    full = batch.new_cache()
    latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots,
                     full, layout=MODEL1, block_size=bs)
    for b, n in enumerate(lens):
        last = torch.arange(max(0, n - window), n)
        ring_slots = entry_slots(table, torch.full_like(last, b), last % window, bs)
        tok = (batch.seq_ids.cpu() == b) & (batch.positions.cpu() >= n - window)
        got = latent_gather(cache, ring_slots.to(checks_device), layout=MODEL1, block_size=bs)
        want = latent_gather_ref(full, batch.slots[tok.to(checks_device)], layout=MODEL1,
                                 block_size=bs, out_dtype=got.dtype)
        same_bytes(got, want, f"sequence {b}: ring vs its last {window} tokens")
    assert int((slots >= 0).sum()) == sum(min(n, window) for n in lens)


@pytest.mark.parametrize(("name", "ratio", "per_token"), [
    ("lab", 4, 129.0), ("lab", 128, 4.03125),  # the lab's 128 and 4 B/token, plus its scale
    ("model1", 4, 146.0), ("model1", 128, 4.5625),
    ("v32", 4, 164.0), ("v32", 128, 5.125),
])
def test_compressed_bytes_per_token(name, ratio, per_token, kvperf):
    """Amortised bytes per token = bytes per entry / ratio; a cache of whole blocks: one
    sequence of 32 K tokens (block 64 entries) and its 128-token sliding window."""
    layout = LAYOUTS[name]
    assert layout.bytes_per_token / ratio == per_token
    seq = 32768
    cache = compressed_cache_bytes(layout, seq, ratio, 64)
    assert cache == -(-(seq // ratio) // 64) * layout.block_bytes(64)
    window = window_cache_bytes(layout, 64, SLIDING_WINDOW)
    assert window == 2 * layout.block_bytes(64)
    kvperf.info("cache_bytes_32k", cache)
    kvperf.info("window_bytes", window)
    kvperf.info("bytes_per_token_amortised", round((cache + window) / seq, 3))


def test_model1_hand_numbers():
    """By hand: 32,768 tokens at ratio 4 -> 8,192 entries = 128 blocks of 64 x 37,440 B
    (4,792,320 B); at 128 -> 256 entries = 4 blocks (149,760 B); window: 2 blocks (74,880)."""
    assert compressed_cache_bytes(MODEL1, 32768, 4, 64) == 4_792_320
    assert compressed_cache_bytes(MODEL1, 32768, 128, 64) == 149_760
    assert window_cache_bytes(MODEL1, 64) == 74_880
    assert compressed_cache_bytes(LAB, 32768, 4, 256) == 32 * 256 * 516


def test_pool_bad_input(checks_device):
    kv, score, ape = _projections([8], CSA_RATIO, checks_device)
    with pytest.raises(ValueError, match="seq_lens sum to 9, kv has 8 rows"):
        pool_compress(kv, score, ape, [9], CSA_RATIO)
    with pytest.raises(ValueError, match=r"ape must be a contiguous \[4, 1024\]"):
        pool_compress(kv, score, ape[:2], [8], CSA_RATIO)
    with pytest.raises(TypeError, match="kv: unsupported dtype torch.bfloat16"):
        pool_compress(kv.bfloat16(), score, ape, [8], CSA_RATIO)
    with pytest.raises(ValueError, match="ratio must be a power of two"):
        pool_compress(kv, score, ape, [8], 3)
    with pytest.raises(ValueError, match="same shape"):
        pool_compress(kv, score[:4], ape, [8], CSA_RATIO)
    assert pool_compress(kv[:3], score[:3], ape, [3], CSA_RATIO).shape == (0, 512)


