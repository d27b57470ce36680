"""A paged KV cache offloaded to pinned host memory or an np.memmap file, with a hot window
of device slots, LRU eviction and next-step prefetch (kvperf_kernels.offload.paged_offload).

Decode over the offloaded cache equals decode over the all-device cache bit for bit (BF16,
and FP8 pages with their per-token scales: half the bytes), step after step while pages are
evicted and prefetched; the counters are exact for a scripted pattern; the cold tier is
never written; bad input is a clear error; the pinned tier and the memmap are released.
The CPU runs all of it through the interpreter on small shapes."""

from __future__ import annotations

import gc
import os
import stat
import weakref

import numpy as np
import pytest
import torch

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.cache.paged_kv import build_page_table
from kvperf_kernels.device import default_device
from kvperf_kernels.offload.paged_offload import PagedOffloadCache, fp8_decode_available
from kvperf_kernels.quant.fp8 import quantize_per_token_ref

PAGE, HKV, HQ, D = 8, 2, 4, 64
FP8_OK, FP8_WHY = fp8_decode_available()


def make_cache(kind: str, lens, seed=0):
    """A logical cache (host tensors) and its page table: ``kind`` bf16 or fp8 (per-token)."""
    gen = torch.Generator().manual_seed(seed)
    tables, seq_lens, num_pages, _ = build_page_table(lens, PAGE, generator=gen)
    k = torch.randn((num_pages, PAGE, HKV, D), generator=gen).to(torch.bfloat16)
    v = torch.randn((num_pages, PAGE, HKV, D), generator=gen).to(torch.bfloat16)
    if kind == "bf16":
        return dict(k=k, v=v), tables, seq_lens
    kq, ks = quantize_per_token_ref(k)
    vq, vs = quantize_per_token_ref(v)
    return dict(k=kq, v=vq, k_scale=ks.squeeze(-1).float(), v_scale=vs.squeeze(-1).float()), \
        tables, seq_lens


def all_device_decode(cache, q, tables, lens, dev, splits):
    c = {n: t.to(dev) for n, t in cache.items()}
    return paged_decode_attention(q, c["k"], c["v"], tables.to(dev), lens.to(dev),
                                  k_scale=c.get("k_scale"), v_scale=c.get("v_scale"),
                                  num_splits=splits)


KINDS = ["bf16", pytest.param("fp8", marks=pytest.mark.skipif(not FP8_OK, reason=FP8_WHY))]


@pytest.mark.parametrize("tier", ["host", "file"])
@pytest.mark.parametrize("kind", KINDS)
def test_offloaded_decode_equals_all_device_decode(kind, tier, tmp_path):
    dev = default_device()
    lens = [16, 9, 13, 16, 10, 15]  # 2 pages each; a step decodes 2 sequences (4 pages)
    cache, tables, seq_lens = make_cache(kind, lens)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn((6, HQ, D), generator=gen).to(torch.bfloat16).to(dev)
    steps = [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3]]  # 8 slots: this step's and the next's
    with PagedOffloadCache(**cache, hot_pages=8, tier=tier, path=tmp_path / "kv.bin",
                           device=dev) as off:
        for t, seqs in enumerate(steps):
            nxt = steps[t + 1] if t + 1 < len(steps) else []
            next_pages = off.owned_pages(tables[nxt], seq_lens[nxt]) if nxt else ()
            out = off.decode(q[seqs], tables[seqs], seq_lens[seqs], next_pages=next_pages,
                             num_splits=2)
            ref = all_device_decode(cache, q[seqs], tables[seqs], seq_lens[seqs], dev, 2)
            assert torch.isfinite(out).all()
            assert torch.equal(out, ref), f"step {t}: offloaded decode differs"
        st = off.stats
        # step 0 misses its 4 pages; every later step finds its 4 pages prefetched, and
        # each prefetch from step 1 on evicts the previous step's 4 pages
        assert (st.misses, st.hits, st.prefetch_hits, st.prefetch_issued) == (4, 16, 16, 16)
        assert st.evictions == 12 and st.prefetch_dropped == 0
        assert st.bytes_loaded[tier] == (4 + 16) * off.page_bytes
        if kind == "fp8":  # half the bytes of BF16 plus 4 B of scale per token and head
            assert off.page_bytes == PAGE * HKV * (2 * D + 2 * 4)
        else:
            assert off.page_bytes == PAGE * HKV * 2 * D * 2
        cold = off._cold if tier == "host" else None
        if cold is not None:  # the cold tier is never written
            for name, t in cache.items():
                assert torch.equal(cold[name].view(torch.uint8), t.view(torch.uint8))
    if tier == "file":
        raw = torch.frombuffer(bytearray((tmp_path / "kv.bin").read_bytes()), dtype=torch.uint8)
        k_bytes = cache["k"][0].numel() * cache["k"].element_size()
        first = raw.view(-1, off.page_bytes)[:, :k_bytes]
        assert torch.equal(first, cache["k"].contiguous().view(torch.uint8).reshape(
            cache["k"].shape[0], -1))


def test_negative_control_a_stale_slot_is_seen(tmp_path):
    """The equality above can fail: a slot whose page was swapped under the LRU map gives
    a different decode."""
    cache, tables, seq_lens = make_cache("bf16", [16, 16])
    dev = default_device()
    q = torch.randn((2, HQ, D), generator=torch.Generator().manual_seed(2)).to(
        torch.bfloat16).to(dev)
    with PagedOffloadCache(**cache, hot_pages=4, device=dev) as off:
        off.decode(q, tables, seq_lens, num_splits=1)
        slots = list(off.lru().values())  # sequence 0's two pages, then sequence 1's
        a, b = slots[0], slots[2]  # (within one sequence a swap would change nothing)
        for name in ("k", "v"):  # swap two sequences' slots behind the map's back
            off.pool[name][[a, b]] = off.pool[name][[b, a]]
        out = off.decode(q, tables, seq_lens, num_splits=1)
    ref = all_device_decode(cache, q, tables, seq_lens, dev, 1)
    assert not torch.equal(out, ref)


def test_lru_order_and_prefetch_accounting():
    cache, _, _ = make_cache("bf16", [8] * 6)  # 6 pages + 1 spare
    with PagedOffloadCache(**cache, hot_pages=3) as off:
        off.ensure([0, 1, 2])
        off.ensure([0])  # 0 is now the most recent: LRU order 1, 2, 0
        off.ensure([3])  # evicts 1
        assert list(off.lru()) == [2, 0, 3] and off.stats.evictions == 1
        off.prefetch([4, 5], keep=[3])  # evicts 2 then 0 (3 is kept)
        assert list(off.lru()) == [3, 4, 5] and off.stats.prefetch_issued == 2
        off.prefetch([0], keep=[3, 4, 5])  # no slot free of the kept pages
        assert off.stats.prefetch_dropped == 1
        off.ensure([4, 5, 3])
        s = off.stats
        assert (s.hits, s.misses, s.prefetch_hits, s.evictions) == (1 + 3, 4, 2, 3)
        # the pages' bytes are the cold tier's, whatever the slot
        for page, slot in off.lru().items():
            assert torch.equal(off.pool["k"][slot], cache["k"][page])


def test_page_and_slot_lists_of_any_stride_reach_the_device():
    """The free slots come out of the LRU reversed (a numpy view of negative stride), and on
    a GPU they go to the device as the gather's destination list: the same ids arrive."""
    cache, _, _ = make_cache("bf16", [16])
    with PagedOffloadCache(**cache, hot_pages=2, device=default_device()) as off:
        rev = np.arange(6, dtype=np.int64)[::-1]
        assert rev.strides[0] < 0
        for a in (rev, rev[::2], np.arange(3)):
            got = off._to_device(a)
            assert got.device.type == off.device.type
            assert got.cpu().tolist() == a.tolist()


def test_bad_input_is_a_clear_error(tmp_path):
    cache, tables, seq_lens = make_cache("bf16", [16, 8])
    with PagedOffloadCache(**cache, hot_pages=2) as off:
        with pytest.raises(ValueError, match=r"page id 9 out of range \[0, 4\)"):
            off.ensure([9])
        with pytest.raises(ValueError, match=r"hot_pages \(2\) is smaller than the 3 pages"):
            off.ensure([0, 1, 2])
        assert off.stats.misses == 0 and not off.lru()  # nothing half-done
    with pytest.raises(ValueError, match="tier must be one of host, file"):
        PagedOffloadCache(**cache, hot_pages=2, tier="nvme")
    with pytest.raises(ValueError, match="needs path"):
        PagedOffloadCache(**cache, hot_pages=2, tier="file")
    small = tmp_path / "small.bin"
    small.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="too small for 4 pages of 4096 B: 100 B, need 16384"):
        PagedOffloadCache(**cache, hot_pages=2, tier="file", path=small, create=False)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        PagedOffloadCache(**cache, k_scale=torch.ones(4, PAGE, HKV), hot_pages=2)
    ro = tmp_path / "ro.bin"
    ro.write_bytes(b"\0" * 10)
    ro.chmod(stat.S_IRUSR)  # refused even as root, who could write it
    with pytest.raises(ValueError, match="is read-only: cannot write the cold pages"):
        PagedOffloadCache(**cache, hot_pages=2, tier="file", path=ro)
    assert ro.read_bytes() == b"\0" * 10  # and left as it was


def _mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(str(path) in line for line in f)


def test_nothing_leaks(tmp_path):
    cache, _, _ = make_cache("bf16", [16])
    path = tmp_path / "kv.bin"
    off = PagedOffloadCache(**cache, hot_pages=2, tier="file", path=path)
    off.ensure([0, 1])
    assert _mapped(path)
    off.close()
    assert not _mapped(path)  # the memmap is unmapped
    host = PagedOffloadCache(**cache, hot_pages=2, tier="host")
    cold = weakref.ref(host._cold["k"])
    pool = weakref.ref(host.pool["k"])
    host.close()
    gc.collect()
    assert cold() is None and pool() is None  # the (pinned on a GPU) tier and pool are gone


# ------------------------------------------------------------------ memmap reads, warm and cold


def test_memmap_reads_from_the_page_cache_and_from_a_cold_file(tmp_path, kvperf):
    """The file tier's two speeds: pages served by the page cache, and pages read from the
    device after the file's pages were dropped (or, where they cannot be, said so)."""
    from kvperf_kernels.offload import file_reads as fr

    size = (64 << 20) if torch.cuda.is_available() else (4 << 20)
    path = tmp_path / "cold.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    got, warm = fr.timed_read(path)
    assert got == data and fr.resident_fraction(path) == 1.0  # all in the page cache now
    how = fr.drop_file_cache(path)
    left = fr.resident_fraction(path)
    kvperf.info("page_cache_read_gbps", round(warm, 2))
    kvperf.info("cache_drop", how)
    if how.startswith("not dropped"):
        assert left > 0.01  # the claim matches what mincore sees
        kvperf.info("cold_read_gbps", f"not measured: {how} (resident {left:.2f})")
        return
    assert left < 0.01, f"{how} reported, but {left:.2%} of the pages are still resident"
    got, cold = fr.timed_read(path)
    assert got == data
    kvperf.info("cold_read_gbps", round(cold, 2))


# ------------------------------------------------------------------ the GPU step


@pytest.mark.gpu
def test_offloaded_decode_step_speed(kv_bench, kvperf):
    """A step whose cold bytes fit the link: 63 sequences of 16K tokens stay resident (4.2
    GB of K+V read per step, ~1 ms: longer than the host's bookkeeping of a step, so the
    host runs ahead), the last batch row rotates among 4 cold sequences of 1024 tokens
    (4 MiB) whose pages are prefetched during the step before. Goal: <= 1.15 x the all-HBM
    step; every step's pages were prefetched (no miss); outputs bit for bit the all-HBM
    decode's; the host time of a step is recorded."""
    import time

    from kvperf_kernels.offload.paged_offload import PagedOffloadCache

    page, hkv, hq, d, base, long_len, cold_len, rot = 64, 8, 64, 128, 63, 16384, 1024, 4
    per_long, per_cold = long_len // page, cold_len // page
    n_pages = base * per_long + rot * per_cold
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn((n_pages, page, hkv, d), generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn((n_pages, page, hkv, d), generator=g, device="cuda").to(torch.bfloat16)
    q = torch.randn((base + 1, hq, d), generator=g, device="cuda").to(torch.bfloat16)
    table = torch.zeros((base + 1, per_long), dtype=torch.int32)
    table[:base] = torch.arange(base * per_long, dtype=torch.int32).view(base, per_long)
    rot_pages = [torch.arange(base * per_long + r * per_cold, base * per_long + (r + 1)
                              * per_cold, dtype=torch.int32) for r in range(rot)]
    tables = []
    for r in range(rot):
        t = table.clone()
        t[base, :per_cold] = rot_pages[r]
        tables.append(t)
    lens = torch.full((base + 1,), long_len, dtype=torch.int32)
    lens[base] = cold_len
    lens_dev, tables_dev = lens.cuda(), [t.cuda() for t in tables]
    kw = dict(max_seq_len=long_len, checked=False, num_splits=4)
    off = PagedOffloadCache(k.cpu(), v.cpu(), hot_pages=base * per_long + 2 * per_cold,
                            tier="host", device="cuda")
    out_off, out_hbm = torch.empty_like(q), torch.empty_like(q)
    state = {"off": 0, "hbm": 0}

    def offloaded_step():
        t = state["off"]
        state["off"] += 1
        return off.decode(q, tables[t % rot], lens, next_pages=rot_pages[(t + 1) % rot],
                          out=out_off, **kw)

    def hbm_step():
        t = state["hbm"]
        state["hbm"] += 1
        return paged_decode_attention(q, k, v, tables_dev[t % rot], lens_dev, out=out_hbm,
                                      **kw)

    for _ in range(rot):  # every page loaded once, and the bits checked step by step
        t = state["off"] % rot
        offloaded_step()
        hbm_step()
        torch.cuda.synchronize()
        assert torch.equal(out_off, out_hbm), f"step with cold sequence {t}: outputs differ"
    t0 = time.perf_counter()
    for _ in range(2 * rot):
        offloaded_step()
    host_us = (time.perf_counter() - t0) / (2 * rot) * 1e6  # enqueue only: no sync inside
    torch.cuda.synchronize()
    kvperf.info("host_us_per_offloaded_step", round(host_us, 1))
    misses, hits, first = off.stats.misses, off.stats.prefetch_hits, state["off"]
    r_hbm = kv_bench(hbm_step, label="all_hbm", bytes_moved=k.numel() * 4, max_time_s=1.0)
    r_off = kv_bench(offloaded_step, label="offloaded", bytes_moved=k.numel() * 4,
                     max_time_s=1.0)
    steps = state["off"] - first
    torch.cuda.synchronize()
    assert off.stats.misses == misses, "a timed step missed: the prefetch did not keep up"
    assert off.stats.prefetch_hits - hits == steps * per_cold
    cold_bytes = per_cold * off.page_bytes
    kvperf.info("cold_bytes_per_step", cold_bytes)
    off.close()
    if r_off.timing is None:
        return
    ratio = r_off.median_us / r_hbm.median_us
    kvperf.speed("offloaded_over_hbm_step", ratio, better="lower", unit="x")
    assert ratio <= 1.15, (f"offloaded step {r_off.median_us:.0f} us = {ratio:.2f} x the "
                           f"all-HBM step {r_hbm.median_us:.0f} us (goal 1.15)")
