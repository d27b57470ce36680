"""Overlapped KV swaps: each step copies a chunk in, decodes over the resident pages and
copies a chunk out (the lab's nvlink_offload, on one workload for both versions).

The schedule is data (``plan``): ops ``in`` (host -> a device slot), ``compute`` (our paged
decode over that slot's pages, ``repeats`` times: the layers of a step) and ``out`` (the
slot -> host), each on a stream with the ops it waits for. ``check_plan`` proves from the
happens-before order (waits + stream order) that no slot is overwritten before it is read
and no chunk is read before it has arrived, so the overlap can never trade data for speed.

``execute`` runs a plan either
* serially on the current stream (the baseline: pageable memory, blocking copies; and the
  CPU, where the same ops run in issue order), or
* on three streams (copy-in, compute = the current stream, copy-out) with CUDA events for
  the waits (the optimized version: pinned memory, non_blocking copies); ``timeline=True``
  records an event pair around every op, so each stream's busy time is measured on the GPU,
  never on the host clock.

``timeline`` runs a plan that way behind a GPU spin, so the whole plan is queued before the
GPU starts it: the op times are then the GPU's schedule, not the pace at which Python
launches the ops. (Without the spin, the H200's timeline of 32 chunks took 11.4 ms, in
and out taking turns, where the same plan timed behind kv_bench's spin took 5.8 ms with
them overlapped: as we read it, each copy started when the host got to it.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.formats.checks import check_int

STREAMS = ("copy_in", "compute", "copy_out")


@dataclass(frozen=True)
class Op:
    index: int
    kind: str  # "in" | "compute" | "out"
    chunk: int
    slot: int
    stream: str
    waits: tuple[int, ...]


def plan(n_chunks: int, slots: int, *, compute: bool = True) -> list[Op]:
    """in(i), compute(i), out(i) for each chunk i into slot i % slots; in(i) waits for
    out(i - slots) (its slot free), compute(i) for in(i), out(i) for compute(i) (or for in(i)
    when ``compute=False``: the copies alone, for timing the copy-bound side)."""
    check_int(n_chunks, "n_chunks", 0)
    check_int(slots, "slots", 1)
    ops: list[Op] = []
    last: dict[tuple[str, int], int] = {}
    for i in range(n_chunks):
        s = i % slots
        free = (last[("out", i - slots)],) if i >= slots else ()
        ops.append(Op(len(ops), "in", i, s, "copy_in", free))
        last[("in", i)] = ops[-1].index
        if compute:
            ops.append(Op(len(ops), "compute", i, s, "compute", (last[("in", i)],)))
            last[("compute", i)] = ops[-1].index
        ops.append(Op(len(ops), "out", i, s, "copy_out",
                      (last[("compute", i)] if compute else last[("in", i)],)))
        last[("out", i)] = ops[-1].index
    return ops


def happens_before(ops: list[Op]) -> list[set[int]]:
    """For each op, every op that completes before it starts (its waits and the ops before
    it on its stream, transitively). Waits must point at earlier ops (issue order)."""
    before: list[set[int]] = []
    last_on: dict[str, int] = {}
    for op in ops:
        if op.index != len(before):
            raise ValueError(f"op {op.index} out of order: ops must be numbered 0..n-1")
        deps = set(op.waits)
        if op.stream in last_on:
            deps.add(last_on[op.stream])
        if any(d >= op.index or d < 0 for d in deps):
            raise ValueError(f"op {op.index} waits for a later or unknown op {sorted(deps)}")
        anc = set(deps)
        for d in deps:
            anc |= before[d]
        before.append(anc)
        last_on[op.stream] = op.index
    return before


def check_plan(ops: list[Op]) -> None:
    """ValueError naming the first hazard: a chunk read (compute / out) before its in, or a
    slot written (in) while an earlier chunk's reads of it may still be pending."""
    before = happens_before(ops)
    arrived: dict[int, int] = {}  # chunk -> its in
    readers: dict[int, list[int]] = {}  # slot -> ops reading its current chunk
    for op in ops:
        if op.kind == "in":
            for r in readers.get(op.slot, []):
                if r not in before[op.index]:
                    raise ValueError(f"in({op.chunk}) may overwrite slot {op.slot} before "
                                     f"{ops[r].kind}({ops[r].chunk}) has read it")
            readers[op.slot] = []
            arrived[op.chunk] = op.index
        elif op.kind in ("compute", "out"):
            src = arrived.get(op.chunk)
            if src is None or src not in before[op.index]:
                raise ValueError(f"{op.kind}({op.chunk}) may read slot {op.slot} before "
                                 f"in({op.chunk}) has filled it")
            readers.setdefault(op.slot, []).append(op.index)
        else:
            raise ValueError(f"op {op.index}: kind must be in, compute or out, got {op.kind!r}")


# ------------------------------------------------------------------ the workload


@dataclass
class Workload:
    """Chunks of paged K/V on the host, a device ring of ``slots`` chunk slots, the queries.

    Chunk i holds ``batch`` sequences of ``tokens`` tokens each ([pages, page_size, Hkv, D]
    per K and V); on the device it sits in slot i % slots of the page pool, where decode
    reads it through that slot's block table."""

    host_k: torch.Tensor  # [n, pages, page_size, Hkv, D]
    host_v: torch.Tensor
    back_k: torch.Tensor  # where copied-out chunks land, NaN until then
    back_v: torch.Tensor
    pool_k: torch.Tensor  # [slots * pages, page_size, Hkv, D] on the device
    pool_v: torch.Tensor
    q: torch.Tensor  # [n, batch, Hq, D]
    out: torch.Tensor  # [n, batch, Hq, D]
    tables: torch.Tensor  # int32 [slots, batch, pages_per_seq]
    seq_lens: torch.Tensor  # int32 [batch]
    tokens: int
    slots: int

    @property
    def n_chunks(self) -> int:
        return self.host_k.shape[0]

    @property
    def chunk_bytes(self) -> int:
        """K + V bytes of one chunk (one copy in or out)."""
        return 2 * self.host_k[0].numel() * self.host_k.element_size()


def make_workload(n_chunks: int, *, batch: int = 2, tokens: int = 1024, hq: int = 64,
                  hkv: int = 8, head_dim: int = 128, page_size: int = 16, slots: int = 3,
                  pinned: bool = False, device="cuda", dtype=torch.bfloat16,
                  seed: int = 0) -> Workload:
    """The same seed gives the same bytes whether the host side is pinned or pageable."""
    for name, v, lo in (("n_chunks", n_chunks, 1), ("batch", batch, 1), ("tokens", tokens, 1),
                        ("page_size", page_size, 1), ("slots", slots, 1)):
        check_int(v, name, lo)
    if tokens % page_size:
        raise ValueError(f"tokens ({tokens}) must be a multiple of page_size ({page_size})")
    device = torch.device(device)
    per_seq = tokens // page_size
    pages = batch * per_seq
    gen = torch.Generator().manual_seed(seed)
    shape = (n_chunks, pages, page_size, hkv, head_dim)

    def host(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if pinned else t

    host_k = host(torch.randn(shape, generator=gen).to(dtype))
    host_v = host(torch.randn(shape, generator=gen).to(dtype))
    back_k = host(torch.full(shape, float("nan"), dtype=dtype))
    back_v = host(torch.full(shape, float("nan"), dtype=dtype))
    q = torch.randn((n_chunks, batch, hq, head_dim), generator=gen).to(dtype).to(device)
    pool = (slots * pages, page_size, hkv, head_dim)
    tables = (torch.arange(slots * pages, dtype=torch.int32).view(slots, batch, per_seq))
    return Workload(
        host_k, host_v, back_k, back_v,
        torch.full(pool, float("nan"), dtype=dtype, device=device),
        torch.full(pool, float("nan"), dtype=dtype, device=device),
        q, torch.full_like(q, float("nan")), tables.to(device),
        torch.full((batch,), tokens, dtype=torch.int32, device=device), tokens, slots)


def _slot(w: Workload, s: int, t: torch.Tensor) -> torch.Tensor:
    pages = w.host_k.shape[1]
    return t[s * pages:(s + 1) * pages]


class DecodeGraphs:
    """One CUDA graph per slot holding ``repeats`` decodes over that slot's pages (a step's
    layers, launched as serving engines launch them: one replay, not one Python launch per
    layer, which would make the host, not the GPU, the bound). The chunk's query is copied
    into the slot's static input before the replay and the output out of it after."""

    def __init__(self, w: Workload, repeats: int):
        check_int(repeats, "repeats", 1)
        self.repeats = repeats
        self.q = [torch.empty_like(w.q[0]) for _ in range(w.slots)]
        self.out = [torch.empty_like(w.out[0]) for _ in range(w.slots)]
        self.graphs = []
        side = torch.cuda.Stream(w.q.device)
        side.wait_stream(torch.cuda.current_stream(w.q.device))
        with torch.cuda.stream(side):  # warm-up (JIT, allocator) off the capture
            for s in range(w.slots):
                self.q[s].copy_(w.q[0])
                self._decodes(w, s)
        torch.cuda.current_stream(w.q.device).wait_stream(side)
        for s in range(w.slots):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._decodes(w, s)
            self.graphs.append(g)
        torch.cuda.synchronize(w.q.device)

    def _decodes(self, w: Workload, s: int) -> None:
        for _ in range(self.repeats):
            paged_decode_attention(self.q[s], w.pool_k, w.pool_v, w.tables[s], w.seq_lens,
                                   max_seq_len=w.tokens, checked=False, out=self.out[s])

    def run(self, w: Workload, chunk: int, slot: int) -> None:
        self.q[slot].copy_(w.q[chunk], non_blocking=True)
        self.graphs[slot].replay()
        w.out[chunk].copy_(self.out[slot], non_blocking=True)


def _do(w: Workload, op: Op, repeats: int, non_blocking: bool,
        graphs: DecodeGraphs | None = None) -> None:
    if op.kind == "in":
        _slot(w, op.slot, w.pool_k).copy_(w.host_k[op.chunk], non_blocking=non_blocking)
        _slot(w, op.slot, w.pool_v).copy_(w.host_v[op.chunk], non_blocking=non_blocking)
    elif op.kind == "out":
        w.back_k[op.chunk].copy_(_slot(w, op.slot, w.pool_k), non_blocking=non_blocking)
        w.back_v[op.chunk].copy_(_slot(w, op.slot, w.pool_v), non_blocking=non_blocking)
    elif graphs is not None:
        graphs.run(w, op.chunk, op.slot)
    else:
        for _ in range(repeats):  # the layers of one step, over the same resident pages
            paged_decode_attention(w.q[op.chunk], w.pool_k, w.pool_v, w.tables[op.slot],
                                   w.seq_lens, max_seq_len=w.tokens, checked=False,
                                   out=w.out[op.chunk])


class Streams:
    """copy-in and copy-out streams beside the current (compute) stream; ``priority`` of the
    copy streams (torch: lower is higher priority)."""

    def __init__(self, device=None, copy_priority: int = 0):
        self.device = torch.device(device or "cuda")
        self.copy_in = torch.cuda.Stream(self.device, priority=copy_priority)
        self.copy_out = torch.cuda.Stream(self.device, priority=copy_priority)

    def of(self, name: str):
        return torch.cuda.current_stream(self.device) if name == "compute" else getattr(
            self, name)


def execute(w: Workload, ops: list[Op], *, repeats: int = 1, streams: Streams | None = None,
            graphs: DecodeGraphs | None = None, timeline: bool = False):
    """Run the plan; streams=None: serially, blocking, in issue order (baseline / CPU).
    graphs: the compute as DecodeGraphs replays (GPU; its repeats replace ``repeats``).
    Returns per-op (start, end) CUDA event pairs when ``timeline`` (streams only)."""
    if streams is None:
        for op in ops:
            _do(w, op, repeats, non_blocking=False, graphs=graphs)
        return None
    main = torch.cuda.current_stream(streams.device)
    for s in (streams.copy_in, streams.copy_out):
        s.wait_stream(main)  # nothing starts before the caller's start event
    # the waits use events without timing (the kind cudaStreamWaitEvent is fastest with)
    # whether or not a timeline is kept: its timing events only mark, so the timed
    # schedule is the untimed one
    done: list[torch.cuda.Event] = []
    marks = []
    for op in ops:
        stream = streams.of(op.stream)
        with torch.cuda.stream(stream):
            for d in op.waits:
                stream.wait_event(done[d])
            if timeline:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
            _do(w, op, repeats, non_blocking=True, graphs=graphs)
            if timeline:
                end = torch.cuda.Event(enable_timing=True)
                end.record(stream)
                marks.append((start, end))
            ready = torch.cuda.Event()
            ready.record(stream)
        done.append(ready)
    main.wait_stream(streams.copy_in)
    main.wait_stream(streams.copy_out)
    return marks if timeline else None


# ------------------------------------------------------------------ overlap figures


def busy_and_wall(ops: list[Op], intervals_us: list[tuple[float, float]]) -> dict[str, float]:
    """Per-stream busy time (sum of its ops' durations) and the wall (first start to last
    end), from (start, end) times in microseconds relative to any origin."""
    if len(ops) != len(intervals_us) or not ops:
        raise ValueError(f"{len(intervals_us)} intervals for {len(ops)} ops")
    busy = dict.fromkeys(STREAMS, 0.0)
    for op, (a, b) in zip(ops, intervals_us, strict=True):
        if not b >= a:
            raise ValueError(f"op {op.index}: end {b} before start {a}")
        busy[op.stream] += b - a
    busy["wall"] = max(b for _, b in intervals_us) - min(a for a, _ in intervals_us)
    return busy


def event_intervals(marks) -> list[tuple[float, float]]:
    """(start, end) in microseconds from the first op's start (after a synchronize)."""
    torch.cuda.synchronize()
    t0 = marks[0][0]
    return [(t0.elapsed_time(a) * 1e3, t0.elapsed_time(b) * 1e3) for a, b in marks]


_SPIN_CYCLES_PER_US: dict[int, float] = {}


def spin(us: float) -> torch.cuda.Event:
    """Keep the current stream busy for about ``us`` microseconds (torch.cuda._sleep,
    calibrated once per device); returns an event recorded after the spin: still pending
    while the host queues work behind it, complete once the GPU got there."""
    dev = torch.cuda.current_device()
    if dev not in _SPIN_CYCLES_PER_US:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(100_000)  # the kernel loaded outside the calibration
        a.record()
        torch.cuda._sleep(1_000_000)
        b.record()
        b.synchronize()
        _SPIN_CYCLES_PER_US[dev] = 1_000_000 / (a.elapsed_time(b) * 1e3)
    torch.cuda._sleep(int(us * _SPIN_CYCLES_PER_US[dev]))
    after = torch.cuda.Event()
    after.record()
    return after


def timeline(w: Workload, ops: list[Op], *, streams: Streams,
             graphs: DecodeGraphs | None = None, repeats: int = 1) -> list[tuple[float, float]]:
    """Per-op (start, end) in microseconds of one streamed run, as the GPU schedules it: the
    run's host time is measured on an untimed run first, then the outputs are reset and the
    timed run is queued whole behind a spin of twice that (plus 2 ms). RuntimeError if the
    GPU still reached the plan before the host had queued it (the times would show the
    host's launch pace)."""
    t0 = time.perf_counter()
    execute(w, ops, repeats=repeats, streams=streams, graphs=graphs)
    host_us = (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    reset_outputs(w)  # what the checks see afterwards is the timed run's
    gate = spin(2 * host_us + 2000.0)
    t0 = time.perf_counter()
    marks = execute(w, ops, repeats=repeats, streams=streams, graphs=graphs, timeline=True)
    queued_us = (time.perf_counter() - t0) * 1e6
    if gate.query():
        raise RuntimeError(f"the GPU reached the plan before the host had queued it "
                           f"({queued_us:.0f} us to queue, spin {2 * host_us + 2000:.0f} us)")
    return event_intervals(marks)


def overlap_efficiency(wall_us: float, compute_us: float, copy_us: float) -> float:
    """max(compute, copy) / wall: 1 when the shorter side is wholly hidden, ~0.5 serial."""
    for name, v in (("wall_us", wall_us), ("compute_us", compute_us), ("copy_us", copy_us)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a time > 0, got {v!r}")
    return max(compute_us, copy_us) / wall_us


# ------------------------------------------------------------------ checks


def compute_only(ops: list[Op]) -> list[Op]:
    """The plan's compute ops alone, back to back (data already resident): the compute side
    of the overlap, timed on its own."""
    comp = [op for op in ops if op.kind == "compute"]
    return [Op(i, "compute", op.chunk, op.slot, "compute", ()) for i, op in enumerate(comp)]


def all_hbm_decode(w: Workload, chunk: int) -> torch.Tensor:
    """The same decode over chunk ``chunk`` held wholly in device memory (never swapped)."""
    dev = w.pool_k.device
    pages = w.host_k.shape[1]
    table = torch.arange(pages, dtype=torch.int32, device=dev).view(w.tables.shape[1:])
    return paged_decode_attention(w.q[chunk], w.host_k[chunk].to(dev), w.host_v[chunk].to(dev),
                                  table, w.seq_lens, max_seq_len=w.tokens, checked=True)


def reset_outputs(w: Workload) -> None:
    """NaN in every copied-back page and every output: a check after a run that skipped a
    chunk (or wrote it twice into the wrong place) sees it."""
    w.back_k.fill_(float("nan"))
    w.back_v.fill_(float("nan"))
    w.out.fill_(float("nan"))


def check_swaps(w: Workload, chunks=None) -> None:
    """Bit for bit: each chunk copied back equals its host original (K and V), and each
    decode output equals the all-HBM decode of that chunk."""
    for i in range(w.n_chunks) if chunks is None else chunks:
        for name, back, src in (("K", w.back_k, w.host_k), ("V", w.back_v, w.host_v)):
            if not torch.equal(back[i], src[i]):
                bad = int((back[i].view(torch.uint8) != src[i].view(torch.uint8)).sum())
                raise AssertionError(f"chunk {i}: {bad} {name} bytes differ after the swap")
        ref = all_hbm_decode(w, i)
        if not torch.equal(w.out[i], ref):
            bad = int((w.out[i] != ref).sum()) if not w.out[i].isnan().any() else "NaN"
            raise AssertionError(f"chunk {i}: decode over swapped pages differs from the "
                                 f"all-HBM decode ({bad} outputs)")
