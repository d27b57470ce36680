"""KV pages moved between two devices, as disaggregated prefill / decode hands a request's
pages from the prefill GPU to the decode GPU (kvperf_kernels.offload.peer_transfer):

* peer copy in one process: gather on the source, one copy across, scatter into the
  destination pool's slots; or one copy per page;
* send / recv through torch.distributed (NCCL between GPUs, gloo between host processes):
  the sender packs and sends one message (or one per page), the receiver scatters.

Every move is checked bit for bit against the torch reference (the destination's expected
bytes), pages not named stay as they were, the check is shown to fail before the move and
on a wrong slot mapping, and bad input is an error naming the problem (on both ranks when
they disagree). On the CPU: host tensors stand in for the two devices, and the send/recv
path runs with gloo between spawned processes (the same code NCCL runs). On two GPUs:
cuda:0 -> cuda:1 for small pages (4 KB, 8192 a call) and large blocks (2-64 MB), timed with
kv_bench as GB/s and a fraction of the measured peer peak (named peak ``peer``), the bytes
checked after the timing. The GPU tests skip on one GPU with the multi_gpu(2) reason."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kvperf_kernels.offload import peer_transfer as pt
from kvperf_kernels.offload.page_copy import check_pages_moved
from kvperf_kernels.testing.page_moves import MoveSpec
from kvperf_kernels.testing.peer_ranks import (
    RankCase,
    RankFailed,
    ServedReceiver,
    exchange_pages,
    free_port,
    run_ranks,
)
from pytest_kvperf import measure

KiB, MiB = 1 << 10, 1 << 20
# gpu before multi_gpu(2) (as decorators: multi_gpu above gpu), so that on a machine without
# a GPU every two-GPU test skips with one reason: "needs a CUDA GPU and 2 CUDA GPUs; found"
TWO_GPUS = [pytest.mark.gpu, pytest.mark.multi_gpu(2)]
GPU_SIZES = [(4 * KiB, 8192), (2 * MiB, 32), (16 * MiB, 4), (64 * MiB, 1)]  # page, pages
DIRECT_NCCL_MAX_PAGES = 64  # one NCCL message per page only where pages are few and large


def size_id(n: int) -> str:
    return f"{n // MiB}M" if n >= MiB else f"{n // KiB}K"


def peer_args(spec: MoveSpec, src_dev, dst_dev, method: str):
    """(fn, args, src, dst, before) of one peer-copy method, set up untimed."""
    src, dst = spec.source(src_dev), spec.pool(dst_dev)
    before = dst.clone()
    if method == "staged":
        staging = pt.PeerStaging.like(max(spec.n, 1), src, src_dev, dst_dev)
        args = (src, spec.ids().to(src_dev), dst, spec.slots().to(dst_dev), staging)
        return pt.peer_copy, args, src, dst, before
    return pt.peer_copy_per_page, (src, spec.ids(), dst, spec.slots()), src, dst, before


# ------------------------------------------------------------------ peer copy (CPU stand-in)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.int32],
                         ids=str)
@pytest.mark.parametrize("method", ["staged", "per_page"])
def test_peer_copy_lands_bit_for_bit(method, dtype):
    spec = MoveSpec((2, 8, 64), dtype, src_pages=12, dst_pages=10, n=6, seed=3)
    fn, args, src, dst, before = peer_args(spec, "cpu", "cpu", method)
    if dtype.is_floating_point and dtype.itemsize == 2:
        assert torch.isnan(src).any()  # NaN payloads must cross unchanged too
    src_before = src.clone()
    with pytest.raises(AssertionError, match="differ from the expected bytes"):
        check_pages_moved(src, spec.ids(), dst, spec.slots(), before)  # negative control
    fn(*args)
    check_pages_moved(src, spec.ids(), dst, spec.slots(), before)
    assert torch.equal(dst.view(torch.uint8), spec.expected().view(torch.uint8))
    untouched = sorted(set(range(10)) - set(spec.slots().tolist()))
    assert torch.equal(dst[untouched].view(torch.uint8), before[untouched].view(torch.uint8))
    assert torch.equal(src.view(torch.uint8), src_before.view(torch.uint8))


def test_a_wrong_slot_mapping_fails_the_check():
    """Negative control: the same pages moved into their neighbours' slots are caught."""
    spec = MoveSpec.of_bytes(4 * KiB, n=5, pool=8)
    src, dst = spec.source(), spec.pool()
    before = dst.clone()
    staging = pt.PeerStaging.like(5, src, "cpu", "cpu")
    pt.peer_copy(src, spec.ids(), dst, spec.wrong_slots(), staging)
    with pytest.raises(AssertionError, match="differ from the expected bytes"):
        check_pages_moved(src, spec.ids(), dst, spec.slots(), before)
    assert not torch.equal(dst.view(torch.uint8), spec.expected().view(torch.uint8))


def test_an_empty_move_changes_nothing():
    spec = MoveSpec.of_bytes(4 * KiB, n=0, pool=4)
    for method in ("staged", "per_page"):
        fn, args, _, dst, before = peer_args(spec, "cpu", "cpu", method)
        fn(*args)
        assert torch.equal(dst.view(torch.uint8), before.view(torch.uint8))


def _copy_args(**change):
    src, dst = MoveSpec.of_bytes(4 * KiB, 2, pool=12).source(), torch.zeros(8, 2, 8, 128,
                                                                        dtype=torch.bfloat16)
    args = dict(src=src, ids=torch.tensor([0, 1]), dst=dst, slots=torch.tensor([4, 5]),
                staging=pt.PeerStaging.like(2, src, "cpu", "cpu"))
    args.update(change)
    return args


@pytest.mark.parametrize("change, words", [
    (dict(ids=torch.tensor([0, 12])), r"ids: page id 12 out of range \[0, 12\)"),
    (dict(slots=torch.tensor([-1, 2])), r"slots: page id -1 out of range \[0, 8\)"),
    (dict(slots=torch.tensor([3, 3])), "slots: a destination page is named twice"),
    (dict(ids=torch.tensor([0])), r"ids \(1\) and slots \(2\) differ in length"),
    (dict(ids=torch.tensor([0.0, 1.0])), "ids must be a 1-D int32/int64 tensor"),
    (dict(ids=torch.tensor([0, 1], device="meta")),
     r"ids must be on cpu \(the gather runs there\), got meta"),
    (dict(dst=torch.zeros(8, 2, 8, 128, dtype=torch.float16)), "one page shape and dtype"),
    (dict(dst=torch.zeros(8, 2, 16, 64, dtype=torch.bfloat16)), "one page shape and dtype"),
    (dict(dst=torch.zeros(128, 8, 2, 8, dtype=torch.bfloat16).permute(3, 2, 1, 0)),
     "dst must be a contiguous page array"),
    (dict(staging=pt.PeerStaging.like(1, torch.zeros(1, 2, 8, 128, dtype=torch.bfloat16),
                                      "cpu", "cpu")), "staging.src: 2 pages do not fit its 1"),
    (dict(staging=pt.PeerStaging.like(2, torch.zeros(1, 2, 8, 128), "cpu", "cpu")),
     "staging.src .* and the pages .* must be .* of one page shape and dtype"),
    (dict(staging=(torch.zeros(2, 2, 8, 128),) * 2), "staging must be a PeerStaging"),
    (dict(src=[1, 2]), "src must be a tensor, got list"),
    (dict(src=torch.zeros(16, dtype=torch.bfloat16)), r"src must be a \[pages, \.\.\.\]"),
], ids=["id-range", "slot-range", "slot-twice", "lengths", "float-ids", "ids-device",
        "dtype", "page-shape", "not-contiguous", "staging-small", "staging-dtype",
        "staging-type", "src-type", "src-1d"])
def test_bad_peer_copy_input_is_a_clear_error_and_moves_nothing(change, words):
    args = _copy_args(**change)
    dst = args["dst"]
    before = dst.clone() if isinstance(dst, torch.Tensor) else None
    with pytest.raises((ValueError, TypeError), match=words):
        pt.peer_copy(**args)
    assert before is None or torch.equal(dst, before)


def test_per_page_copies_take_host_indices():
    args = _copy_args()
    with pytest.raises(ValueError, match=r"ids must be on cpu \(one copy per page is issued "
                       r"from the host\), got meta"):
        pt.peer_copy_per_page(args["src"], torch.tensor([0, 1], device="meta"), args["dst"],
                              args["slots"])


@pytest.mark.parametrize("src, dst, words", [
    ("cuda:0", "cuda:0", "src and dst are both on cuda:0: a peer copy moves pages between "
     "two devices"),
    ("cpu", "cuda:1", "src is on cpu and dst on cuda:1: host <-> device moves are "
     "page_copy's"),
    ("cuda:1", "cpu", "src is on cuda:1 and dst on cpu"),
    ("meta", "meta", "src is on meta: pages move between CUDA devices"),
])
def test_a_peer_copy_needs_two_devices(src, dst, words):
    with pytest.raises(ValueError, match=words):
        pt.check_peer_devices(src, dst)


def test_two_devices_and_the_host_stand_in_pass_the_device_rule():
    pt.check_peer_devices("cuda:0", "cuda:1")
    pt.check_peer_devices("cpu", "cpu")


def test_pages_move_as_the_widest_whole_words():
    assert pt.words(torch.zeros(3, 2, 8, 128, dtype=torch.bfloat16)).dtype == torch.int64
    assert pt.words(torch.zeros(3, 6, dtype=torch.uint8)).dtype == torch.int16
    assert pt.words(torch.zeros(3, 5, dtype=torch.uint8)).shape == (3, 5)
    with pytest.raises(ValueError, match="pages of shape .* hold no bytes"):
        pt.check_pages(torch.zeros(3, 0), "src")


# ------------------------------------------------------------------ send / recv


def rank_cases(page_bytes: int) -> list[RankCase]:
    spec = MoveSpec.of_bytes(page_bytes, n=6, pool=16, seed=5)
    fewer = MoveSpec.of_bytes(page_bytes, n=5, pool=16, seed=5)
    other = MoveSpec(spec.page_shape, torch.float16, 16, 16, 6, seed=5)
    return [
        RankCase("staged", spec),
        RankCase("per_page", spec, staged=False),
        RankCase("empty", MoveSpec.of_bytes(page_bytes, n=0, pool=4)),
        RankCase("wrong_slots", spec, wrong_slots=True),
        RankCase("lengths", spec, receiver_spec=fewer),
        RankCase("dtypes", spec, receiver_spec=other),
        RankCase("staged_vs_per_page", spec, receiver_staged=False),
        RankCase("after_errors", spec),  # the channel is clean after the refused moves
    ]


SEND_RECV = [
    pytest.param("gloo", ("cpu", "cpu"), id="gloo-cpu"),
    pytest.param("nccl", ("cuda:0", "cuda:1"), id="nccl-cuda0-cuda1", marks=TWO_GPUS),
]


@pytest.mark.parametrize("backend, devices", SEND_RECV)
def test_send_recv_between_two_spawned_ranks(backend, devices, kvperf):
    sent, got = run_ranks(exchange_pages, devices, backend, (rank_cases(4 * KiB),),
                          timeout_s=60)
    by = {r["case"]: (s, r) for s, r in zip(sent, got, strict=True)}
    for name in ("staged", "per_page", "empty", "after_errors"):
        s, r = by[name]
        assert s["error"] is None and r["error"] is None, (name, s, r)
        assert r["check"] is None, (name, r["check"])  # bit for bit, untouched slots too
    s, r = by["wrong_slots"]  # negative control: the receiver's wrong mapping is caught
    assert s["error"] is None and r["error"] is None
    assert r["check"] and "differ from the expected bytes" in r["check"]
    for name, why in (("lengths", "lengths differ"), ("dtypes", "dtypes differ"),
                      ("staged_vs_per_page", "one side stages, the other sends per page")):
        s, r = by[name]
        assert s["error"] == r["error"], (name, s, r)  # the same words on both ranks
        assert why in s["error"] and s["error"].startswith("ValueError: send_pages/recv_pages")
    assert "sender rank 0 sends 6 pages of (2, 8, 128) torch.bfloat16 (staged); receiver " \
           "rank 1 expects 5 pages" in by["lengths"][0]["error"]
    kvperf.info("cases", len(by))


@pytest.fixture
def one_rank_group():
    """A gloo group of one rank in this process (the checks that need no peer)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_send_recv_without_a_group_is_a_clear_error():
    spec = MoveSpec.of_bytes(4 * KiB, n=2, pool=4)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        pt.send_pages(spec.source(), spec.ids(), 1)


@pytest.mark.parametrize("call, words", [
    (lambda s: pt.send_pages(s.source(), s.ids(), 0), "peer: rank 0 cannot move pages to "
     "itself"),
    (lambda s: pt.recv_pages(s.pool(), s.slots(), 3), r"peer: rank 3 is not in the group "
     r"\(ranks \[0\]\)"),
    (lambda s: pt.send_pages(s.source(), s.ids(), True), "peer must be an int rank"),
], ids=["self", "not-in-group", "bool-peer"])
def test_send_recv_peer_errors(one_rank_group, call, words):
    with pytest.raises((ValueError, TypeError), match=words):
        call(MoveSpec.of_bytes(4 * KiB, n=2, pool=4))


def test_send_recv_input_errors_come_before_any_message(one_rank_group, monkeypatch):
    """Checked before the header exchange: the peer is faked as rank 1 of a world of two,
    and a message sent would fail the test."""
    monkeypatch.setattr(pt, "_group_facts", lambda peer, group: (0, "gloo"))
    monkeypatch.setattr(pt, "_exchange_headers", lambda *a: pytest.fail("a header was sent"))
    spec = MoveSpec.of_bytes(4 * KiB, n=2, pool=4)
    src, dst = spec.source(), spec.pool()
    cases = [
        (lambda: pt.send_pages(src.to("meta"), spec.ids(), 1),
         "src is on meta: the group's backend is gloo"),
        (lambda: pt.send_pages(src, torch.tensor([0, 4]), 1, staging=src),
         r"ids: page id 4 out of range \[0, 4\)"),
        (lambda: pt.send_pages(src, spec.ids(), 1, staging=src[:1]),
         "staging: 2 pages do not fit its 1"),
        (lambda: pt.send_pages(src, spec.ids().to("meta"), 1),
         r"ids must be on cpu \(one message per page is issued from the host\)"),
        (lambda: pt.recv_pages(dst, torch.tensor([1, 1]), 1), "slots: a destination page "
         "is named twice"),
        (lambda: pt.recv_pages(dst, spec.slots(), 1, staging=torch.zeros(2, 3)),
         "staging .* and the pages .* of one page shape and dtype"),
    ]
    for call, words in cases:
        with pytest.raises((ValueError, TypeError), match=words):
            call()


def test_a_page_layout_the_peer_cannot_be_told_is_refused():
    with pytest.raises(TypeError, match="pages of torch.complex64 cannot be described"):
        pt._header(torch.zeros(2, 4, dtype=torch.complex64), 2, True)
    with pytest.raises(ValueError, match="pages of 9 dims cannot be described"):
        pt._header(torch.zeros((2,) + (1,) * 9), 2, True)


def counted_send(peer, sends, src, ids, staging):
    sends.append(1)
    peer.send(src, ids, staging=staging)


def test_served_receiver_pairs_with_a_timing_loop(kvperf):
    """rank 0 here (under a timing loop: any number of calls, decided as it runs), rank 1
    spawned, gloo: every timed send is received, the pool is right after the timing, the
    control's wrong mapping is caught, and a disagreement raises on both ranks. The loop
    is the host clock's (GPU timing of these sends is the NCCL test's)."""
    spec = MoveSpec.of_bytes(4 * KiB, n=32, pool=64, seed=7)
    with ServedReceiver("gloo", ("cpu", "cpu"), timeout_s=60) as peer:
        for staged in (True, False):
            label = "staged" if staged else "per_page"
            src, ids = spec.source(), spec.ids()
            staging = torch.empty((spec.n, *spec.page_shape), dtype=spec.dtype) if staged \
                else None
            peer.receive(spec, staged=staged)
            peer.send(src, ids, staging=staging, checked=True)
            sends = []
            t = measure(counted_send, args_sets=[(peer, sends, src, ids, staging)],
                        device="cpu", max_time_s=0.1)
            out = peer.finish()
            assert out == {"steps": len(sends) + 1, "error": None, "check": None}, out
            assert len(sends) >= t.rounds > 0
            kvperf.info(f"{label}.gloo_gbps", round(spec.bytes_moved / t.median_us / 1e3, 2))
        peer.receive(spec, wrong_slots=True)  # negative control on the receiving side
        peer.send(spec.source(), spec.ids(), staging=torch.empty_like(spec.source()[:32]),
                  checked=True)
        out = peer.finish()
        assert out["error"] is None and "differ from the expected bytes" in out["check"]
        fewer = MoveSpec.of_bytes(4 * KiB, n=31, pool=64, seed=7)
        peer.receive(fewer)
        with pytest.raises(ValueError, match="lengths differ") as sent:
            peer.send(spec.source(), spec.ids(), staging=torch.empty_like(spec.source()[:32]),
                      checked=True)
        out = peer.finish()
        assert out["error"] == f"ValueError: {sent.value}"


def test_free_port_is_bindable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


# ------------------------------------------------------------------ two GPUs


def _sync_both():
    for i in (0, 1):
        torch.cuda.synchronize(i)


@pytest.mark.parametrize("method", ["staged", "per_page"])
@pytest.mark.parametrize("src_dev, dst_dev", [("cuda:0", "cuda:1"), ("cuda:1", "cuda:0")],
                         ids=["0to1", "1to0"])
@pytest.mark.multi_gpu(2)
@pytest.mark.gpu
def test_peer_copy_between_gpus_bit_for_bit(src_dev, dst_dev, method):
    spec = MoveSpec.of_bytes(32 * KiB, n=24, pool=48, seed=11)
    fn, args, src, dst, before = peer_args(spec, src_dev, dst_dev, method)
    with pytest.raises(AssertionError, match="differ from the expected bytes"):
        check_pages_moved(src, spec.ids(), dst, spec.slots(), before)
    fn(*args)
    _sync_both()
    check_pages_moved(src, spec.ids(), dst, spec.slots(), before)
    assert torch.equal(dst.cpu().view(torch.uint8), spec.expected().view(torch.uint8))
    wrong = pt.PeerStaging.like(spec.n, src, src_dev, dst_dev)
    pt.peer_copy(src, spec.ids().to(src_dev), dst, spec.wrong_slots().to(dst_dev), wrong)
    _sync_both()
    with pytest.raises(AssertionError, match="differ from the expected bytes"):
        check_pages_moved(src, spec.ids(), dst, spec.slots(), before)


@pytest.mark.multi_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("page_bytes, n", GPU_SIZES, ids=[size_id(b) for b, _ in GPU_SIZES])
def test_peer_copy_speed(page_bytes, n, kv_bench, kvperf):
    """cuda:0 -> cuda:1, staged (gather, one copy, scatter) and one copy per page, each as
    GB/s of pages and a fraction of the measured peer peak; bytes checked after timing."""
    spec = MoveSpec.of_bytes(page_bytes, n=n)
    gbps = {}
    for method in ("staged", "per_page"):
        fn, args, src, dst, before = peer_args(spec, "cuda:0", "cuda:1", method)
        fn(*args)  # checked once; the timed calls skip the host-side checks
        dst.copy_(before)
        res = kv_bench(fn, *args, checked=False, bytes_moved=spec.bytes_moved, peak="peer",
                       label=method, max_time_s=0.5)
        _sync_both()
        check_pages_moved(src, spec.ids(), dst, spec.slots(), before)
        gbps[method] = res.gbps
        del src, dst, before, args
    kvperf.info("pages_per_call", n)
    kvperf.info("staged_over_per_page", round(gbps["staged"] / gbps["per_page"], 2))


@pytest.fixture(scope="module")
def nccl_peer():
    with ServedReceiver("nccl", ("cuda:0", "cuda:1"), timeout_s=120) as peer:
        yield peer


@pytest.mark.multi_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("page_bytes, n", GPU_SIZES, ids=[size_id(b) for b, _ in GPU_SIZES])
def test_nccl_send_recv_speed(page_bytes, n, nccl_peer, kv_bench, kvperf):
    """rank 0 (this process, cuda:0) sends, rank 1 (cuda:1) receives and scatters: staged
    (one message) and, for few large pages, one message per page. The sender's stream
    waits for each send, and a send waits for its receive, so the time per call is the
    pipeline's. Rank 1 checks its pool bit for bit after the timing."""
    spec = MoveSpec.of_bytes(page_bytes, n=n, seed=13)
    methods = ["staged"] + (["per_page"] if n <= DIRECT_NCCL_MAX_PAGES else [])
    for method in methods:
        staged = method == "staged"
        src = spec.source("cuda:0")
        ids = spec.ids().to("cuda:0" if staged else "cpu")
        staging = torch.empty((n, *spec.page_shape), dtype=spec.dtype,
                              device="cuda:0") if staged else None
        nccl_peer.receive(spec, staged=staged)
        nccl_peer.send(src, ids, staging=staging, checked=True)
        kv_bench(nccl_peer.send, src, ids, staging=staging, bytes_moved=spec.bytes_moved,
                 peak="peer", label=f"nccl_{method}", max_time_s=0.5)
        out = nccl_peer.finish()
        assert out["error"] is None and out["check"] is None, out
        kvperf.info(f"nccl_{method}.sends", out["steps"])
    kvperf.info("pages_per_call", n)


@pytest.mark.multi_gpu(2)
@pytest.mark.gpu
def test_peer_peak_is_measured_between_the_gpus(kv_bench, kvperf):
    """The named peak `peer` (cuda:0 -> cuda:1, 256 MiB) exists here and divides a plain
    peer copy: the copy's fraction of it is near 1."""
    a = torch.empty(64 * MiB // 4, dtype=torch.int32, device="cuda:0").fill_(7)
    b = torch.empty_like(a, device="cuda:1")
    res = kv_bench(copy_across, b, a, bytes_moved=a.nbytes, peak="peer", max_time_s=0.5)
    assert res.frac_of_peak is not None and 0.5 < res.frac_of_peak < 1.5, res
    assert torch.equal(b.cpu(), a.cpu())


def copy_across(dst, src):
    """dst.copy_(src) between two GPUs, complete on src's stream (where kv_bench times)."""
    dst.copy_(src, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(dst.device))
    torch.cuda.current_stream(src.device).wait_event(done)


def test_rank_failures_come_back_with_the_rank_named():
    """A rank's own exception (here: a case that is not a RankCase) reaches the parent as
    RankFailed, each rank named with its words."""
    with pytest.raises(RankFailed, match=r"(?s)rank 0: AttributeError: 'NoneType' object "
                       r"has no attribute 'spec'.*rank 1: AttributeError"):
        run_ranks(exchange_pages, ("cpu", "cpu"), "gloo", ([None],), timeout_s=30)
