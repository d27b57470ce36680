"""Small KV pages host -> device, three ways side by side (kvperf_kernels.offload.page_copy):
one copy per page, a batched copy through pinned staging (gathered on the host, copied in
a few large chunks), and a Triton kernel that gathers the pages straight from pinned host
memory. A 16-token page of 8 heads x 128 x 2 B is 32 KB; the GPU compares 16 KB to 2 MB
pages, each as a fraction of the measured pinned H2D peak (goal: 32 KB pages >= 0.7 of it
through the batched copy or the kernel).

Known finding (H200, PCIe Gen5 x16, first run 2026-12-02): 32 KB pages reached 0.67
batched and 0.61 by the kernel. The kernel's reads of pinned memory reach 0.55-0.61 at
every page size from 16 KB to 2 MB: a bound of the GPU's reads over the link, not of the
page size. The batched path's samples split in two: ~640 us (0.93: its copy alone) and
~900-1100 us, which we read as the pace of the host's gather of the pages into the
staging; the version timed then ran ahead of its copies only by overwriting a staging
buffer its previous copy was still reading (fixed: page_copy.Staging). So the test records
the host's gather rate and the staged copies alone beside the three paths, and calls a
miss of the goal the known finding (xfail, with those numbers) only where they explain
it: the gather (alone, or while the staged copies run: the host's memory serves both)
and the kernel both below the goal. Any other miss fails.

Second run (2026-12-03): batched 0.51, kernel 0.56, although the gather alone ran at 0.98
and the copies alone at 0.96, each about the link's rate: the two in turn, not overlapped.
So the test also times the gather while the copies run.

Every path equals the torch reference bit for bit, pages not named stay as they were, and
the check is shown to fail before the copy. Where the kernels run on a GPU the small
checks move pinned host pages into device slots (the transfer the paths exist for); on
the CPU, host to host with the kernel in the interpreter."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from kvperf_kernels.device import interpreted
from kvperf_kernels.offload import page_copy as pc

KiB, MiB = 1 << 10, 1 << 20
GPU_PAGE_BYTES = [16 * KiB, 32 * KiB, 64 * KiB, 256 * KiB, 2 * MiB]
GPU_BATCH_BYTES = 32 * MiB  # per call, whatever the page size
SMALL_PAGE_GOAL = (32 * KiB, 0.7)


def pages(n, page_bytes, seed, device="cpu", pinned=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-(2**31), 2**31 - 1, (n, page_bytes // 4), generator=g,
                      dtype=torch.int64).to(torch.int32)
    t = t.pin_memory() if pinned else t
    return t.to(device) if device != "cpu" else t


def batch(n_src, n_dst, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n_src, generator=g)[:n].to(torch.int32)
    slots = torch.randperm(n_dst, generator=g)[:n].to(torch.int32)
    return ids, slots


def prepared(method, src, ids, dst, slots):
    """(fn, args) for one method, with its index lists and staging made once, untimed."""
    if method == "per_page":
        return pc.copy_per_page, (src, ids.tolist(), dst, slots.tolist())
    if method == "batched":
        staging = pc.Staging(ids.numel(), src, dst.device)
        return pc.copy_batched, (src, ids.long(), dst, slots.to(dst.device).long(), staging)
    return pc.gather_pages, (src, ids.to(dst.device), dst, slots.to(dst.device))


def run(method, src, ids, dst, slots):
    fn, args = prepared(method, src, ids, dst, slots)
    return fn(*args)


METHODS = ["per_page", "batched", "kernel"]


# where the small checks' destination lives: the GPU when the kernels run there (a Triton
# kernel cannot take host tensors on both sides outside the interpreter)
SMALL_DEVICE = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"


@pytest.mark.parametrize("page_bytes", [4 * KiB, 32 * KiB], ids=["4K", "32K"])
@pytest.mark.parametrize("method", METHODS)
def test_pages_move_bit_for_bit(method, page_bytes):
    gpu = SMALL_DEVICE == "cuda"
    src = pages(12, page_bytes, seed=1, pinned=gpu)
    dst = pages(8, page_bytes, seed=2, device=SMALL_DEVICE)
    ids, slots = batch(12, 8, 5)
    before = dst.clone()
    with pytest.raises(AssertionError, match="differ from the expected bytes"):
        pc.check_pages_moved(src, ids, dst, slots, before)  # negative control
    run(method, src, ids, dst, slots)
    pc.check_pages_moved(src, ids, dst, slots, before)
    ref = pc.gather_pages_ref(src, ids, before.clone(), slots)
    assert torch.equal(dst, ref)
    untouched = sorted(set(range(8)) - set(slots.tolist()))
    assert torch.equal(dst[untouched], before[untouched])


def test_batched_calls_in_a_row_reuse_the_staging_safely():
    """Two batches through one staging, the second queued right behind the first (chunks of
    one page: every chunk is reused): each lands bit for bit."""
    gpu = SMALL_DEVICE == "cuda"
    src = pages(12, 4 * KiB, seed=1, pinned=gpu)
    dst = pages(8, 4 * KiB, seed=2, device=SMALL_DEVICE)
    staging = pc.Staging(4, src, dst.device, chunk_bytes=4 * KiB)
    assert staging.chunk_pages == 1
    before = dst.clone()
    first, second = (torch.tensor(i) for i in ([0, 1, 2, 3], [8, 9, 10, 11]))
    into1, into2 = (torch.tensor(s, device=dst.device) for s in ([0, 1, 2, 3], [4, 5, 6, 7]))
    pc.copy_batched(src, first, dst, into1, staging)
    pc.copy_batched(src, second, dst, into2, staging)
    expect = pc.gather_pages_ref(src, first, before.clone(), into1)
    pc.gather_pages_ref(src, second, expect, into2)
    assert torch.equal(dst.cpu(), expect.cpu())
    with pytest.raises(ValueError, match="ids: 5 pages do not fit the staging's 4"):
        pc.copy_batched(src, torch.arange(5), dst, torch.arange(5, device=dst.device), staging)


def test_an_empty_batch_moves_nothing():
    gpu = SMALL_DEVICE == "cuda"
    src = pages(4, 4 * KiB, 1, pinned=gpu)
    dst = pages(4, 4 * KiB, 2, device=SMALL_DEVICE)
    before = dst.clone()
    empty = torch.empty(0, dtype=torch.int32)
    pc.gather_pages(src, empty.to(dst.device), dst, empty.to(dst.device))
    assert torch.equal(dst, before)


@pytest.mark.skipif(interpreted(), reason="needs compiled Triton kernels (a GPU without "
                    "TRITON_INTERPRET=1); found the interpreter, which runs host to host")
def test_the_kernel_refuses_host_memory_on_both_sides():
    src, dst = pages(4, 4 * KiB, 1), pages(4, 4 * KiB, 2)
    ids = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="src and dst are both host memory"):
        pc.gather_pages(src, ids, dst, ids)


@pytest.mark.parametrize("change, words", [
    (dict(ids=torch.tensor([0, 12], dtype=torch.int32)), r"ids: page id 12 out of range \[0, 12\)"),
    (dict(slots=torch.tensor([3, 3], dtype=torch.int32)), "a destination page is named twice"),
    (dict(slots=torch.tensor([-1, 2], dtype=torch.int32)), r"slots: page id -1 out of range"),
    (dict(ids=torch.tensor([0], dtype=torch.int32)), r"ids \(1\) and slots \(2\) differ"),
    (dict(ids=torch.tensor([0.0, 1.0])), "ids must be a 1-D int32/int64 tensor"),
    (dict(dst=torch.zeros(8, 4 * KiB // 2, dtype=torch.int16)), "one page shape and dtype"),
])
def test_bad_input_is_a_clear_error_and_moves_nothing(change, words):
    args = dict(src=pages(12, 4 * KiB, 1), ids=torch.tensor([0, 1], dtype=torch.int32),
                dst=pages(8, 4 * KiB, 2), slots=torch.tensor([4, 5], dtype=torch.int32))
    args.update(change)
    before = args["dst"].clone()
    with pytest.raises((ValueError, TypeError), match=words):
        pc.gather_pages(**args)
    assert torch.equal(args["dst"], before)


@pytest.mark.gpu
def test_the_kernel_refuses_pageable_host_memory():
    src, dst = pages(4, 4 * KiB, 1), pages(4, 4 * KiB, 2, device="cuda")
    ids = torch.tensor([0], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="src must be pinned host memory"):
        pc.gather_pages(src, ids, dst, ids)


@pytest.mark.gpu
@pytest.mark.parametrize("page_bytes", [32 * KiB, 2 * MiB], ids=["32K", "2M"])
def test_the_kernel_scatters_to_pinned_host_memory(page_bytes, kv_bench):
    """The offload direction: device pages written into pinned host slots by the kernel."""
    n = 8 * MiB // page_bytes
    src = pages(2 * n, page_bytes, seed=3, device="cuda")
    dst = pages(2 * n, page_bytes, seed=4, pinned=True)
    ids, slots = batch(2 * n, 2 * n, n, seed=5)
    before = dst.clone()
    kv_bench(pc.gather_pages, src, ids.cuda(), dst, slots.cuda(), bytes_moved=n * page_bytes,
             peak="d2h_pinned", max_time_s=0.5)  # its fraction of the D2H peak is recorded
    torch.cuda.synchronize()
    pc.check_pages_moved(src, ids, dst, slots, before)


def host_gather_gbps(src, ids, staging: pc.Staging, rounds: int = 7, out=None) -> float:
    """The host's rate (GB/s of pages) gathering the batch into the staging (or ``out``,
    shaped like it) chunk by chunk, as copy_batched does, with no copy in flight unless the
    caller queued some: the batched path cannot beat it."""
    out = staging.host if out is None else out
    n = ids.numel()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _, a, b in staging.chunks(n):
            torch.index_select(src, 0, ids[a:b], out=out[a:b])
        times.append(time.perf_counter() - t0)
    return n * pc.page_bytes(src) / statistics.median(times) / 1e9


def host_gather_gbps_under_copy(src, ids, staging: pc.Staging, rounds: int = 7) -> tuple:
    """(GB/s, overlapped): the host's gather rate as above, into a scratch pinned buffer
    while the staged copies of the same bytes cross the link (queued beforehand, twice as
    many as the gather rounds): what the batched path's pipeline gets from the host when
    both share its memory. overlapped: the copies were still running when it ended."""
    scratch = torch.empty(staging.host.shape, dtype=staging.host.dtype, pin_memory=True)
    for _ in range(2 * rounds):
        staged_copies(staging, ids.numel())
    done = torch.cuda.Event()
    done.record()
    gbps = host_gather_gbps(src, ids, staging, rounds, out=scratch)
    overlapped = not done.query()
    torch.cuda.synchronize()
    return gbps, overlapped


def staged_copies(staging: pc.Staging, n: int) -> None:
    """copy_batched's copies alone (the pages already gathered): its ceiling on the link."""
    for _, a, b in staging.chunks(n):
        staging.dev[a:b].copy_(staging.host[a:b], non_blocking=True)


@pytest.mark.gpu
@pytest.mark.parametrize("page_bytes", GPU_PAGE_BYTES,
                         ids=lambda b: f"{b // MiB}M" if b >= MiB else f"{b // KiB}K")
def test_small_page_transfers(page_bytes, kv_bench, kvperf):
    n = GPU_BATCH_BYTES // page_bytes
    src = pages(2 * n, page_bytes, seed=1, pinned=True)
    dst = pages(2 * n, page_bytes, seed=2, device="cuda")
    ids, slots = batch(2 * n, 2 * n, n)
    before = dst.cpu()
    frac, res = {}, {}
    for method in METHODS:
        dst.copy_(before)
        fn, args = prepared(method, src, ids, dst, slots)
        res[method] = kv_bench(fn, *args, bytes_moved=n * page_bytes, peak="h2d_pinned",
                               label=method, max_time_s=0.5)
        torch.cuda.synchronize()
        pc.check_pages_moved(src, ids, dst, slots, before)
        frac[method] = res[method].frac_of_peak
        if method == "batched":
            staging = args[-1]
    kvperf.info("pages_per_call", n)
    # what bounds the batched path: the host's gather, or its copies on the link
    gather = host_gather_gbps(src, ids.long(), staging)
    kvperf.info("batched.host_gather_gbps", round(gather, 1))
    kvperf.info("batched.host_threads", torch.get_num_threads())
    copies = kv_bench(staged_copies, staging, n, bytes_moved=n * page_bytes,
                      peak="h2d_pinned", label="batched_copies_only", max_time_s=0.5)
    busy, overlapped = host_gather_gbps_under_copy(src, ids.long(), staging)
    kvperf.info("batched.host_gather_gbps_under_copy", round(busy, 1))
    kvperf.info("batched.host_gather_under_copy_overlapped", overlapped)
    size, goal = SMALL_PAGE_GOAL
    if page_bytes != size or frac["kernel"] is None:
        return
    peak = res["batched"].gbps / frac["batched"]
    best = max(frac["batched"], frac["kernel"])
    # the host's pace for the pipeline: its gather while the copies run, where they did
    feed = min(gather, busy) if overlapped else gather
    words = (f"32 KB pages: batched {frac['batched']:.2f}, kernel {frac['kernel']:.2f}, per "
             f"page {frac['per_page']:.2f} of the h2d_pinned peak (goal {goal}); the host "
             f"gathers the pages at {gather / peak:.2f} of it ({gather:.1f} GB/s, "
             f"{torch.get_num_threads()} threads), at {busy / peak:.2f} while the staged "
             f"copies run ({'overlapped' if overlapped else 'the copies ended first'}), "
             f"the staged copies alone reach {copies.frac_of_peak:.2f}")
    if best < goal and feed / peak < goal and frac["kernel"] < goal:
        pytest.xfail(f"known finding: {words}: the batched path is bound by the host's "
                     "gather, the kernel by its reads of pinned memory over the link")
    assert best >= goal, words
