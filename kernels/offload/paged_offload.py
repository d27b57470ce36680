"""A paged KV cache whose hot window sits in device memory and whose cold pages sit in
pinned host memory or in an ``np.memmap`` file (standing in for NVMe), with LRU eviction
and prefetch of the pages the next step needs (the lab's paged_kv_offload).

Every logical page lives in the cold tier (the source of truth: decode never writes
pages here); ``hot_pages`` device slots hold copies, found through an LRU map. A decode
step ``ensure``s the pages its sequences own (a miss loads the page, evicting the least
recently used page the step does not need), maps the logical block table to slots (every
entry a sequence does not own points at a NaN poison slot), runs our paged decode over the
slot pool, then ``prefetch``es the next step's pages. On a GPU the loads run on a copy
stream: a load into a slot waits for the last decode that read it, and a decode waits for
the loads of its pages (CUDA events); on the CPU everything is synchronous. Pages are
BF16/FP16, or FP8 with per-token float32 scales (moved with their pages: half the bytes).

Counters (``stats``): hits, misses, evictions, prefetches issued, prefetch hits (a needed
page that a prefetch brought in), prefetches dropped (no slot free of the current step),
bytes loaded per tier.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.formats.checks import check_int
from kvperf_kernels.offload.page_copy import gather_pages
from kvperf_kernels.offload.transfer import require_pinned

TIERS = ("host", "file")


def fp8_decode_available() -> tuple[bool, str]:
    """(whether our fused FP8 decode can run here, why not)."""
    if not hasattr(torch, "float8_e4m3fn"):
        return False, f"needs torch.float8_e4m3fn; found torch {torch.__version__} without it"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "needs a CUDA GPU or Triton's interpreter (TRITON_INTERPRET=1)"
    return True, ""


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0
    prefetch_dropped: int = 0
    bytes_loaded: dict = field(default_factory=lambda: dict.fromkeys(TIERS, 0))


class PagedOffloadCache:
    """k, v: [num_pages, page_size, Hkv, D] on the host (copied into the cold tier);
    k_scale, v_scale: float32 [num_pages, page_size, Hkv] per-token scales (FP8 only);
    hot_pages: device slots; tier: "host" (pinned, on a GPU) or "file" (``path``: an
    np.memmap written once, then opened read-only; ``create=False`` opens an existing file
    of the right size instead)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_scale=None, v_scale=None, *,
                 hot_pages: int, tier: str = "host", path=None, device="cpu",
                 create: bool = True):
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")
        if k.shape != v.shape or k.dim() != 4 or k.dtype != v.dtype:
            raise ValueError(f"k and v must be [num_pages, page_size, Hkv, D] of one dtype; "
                             f"got {tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}")
        if (k_scale is None) != (v_scale is None) or (
                k_scale is not None and (k_scale.shape != k.shape[:3]
                                         or k_scale.dtype != torch.float32)):
            raise ValueError("k_scale and v_scale: both None or float32 [num_pages, "
                             f"page_size, Hkv] ({tuple(k.shape[:3])})")
        check_int(hot_pages, "hot_pages", 1)
        self.device = torch.device(device)
        self.num_pages, self.page_size = k.shape[0], k.shape[1]
        self.dtype, self.scaled = k.dtype, k_scale is not None
        self.tier, self.hot_pages = tier, hot_pages
        self.stats = Stats()
        self._parts = [("k", k), ("v", v)] + ([("k_scale", k_scale), ("v_scale", v_scale)]
                                              if self.scaled else [])
        self.page_bytes = sum(t[0].numel() * t.element_size() for _, t in self._parts)
        self._gpu = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._gpu else None
        self._cold: dict[str, torch.Tensor] = {}
        self._file = None
        if tier == "host":
            for name, t in self._parts:
                self._cold[name] = t.pin_memory() if self._gpu else t.clone()
                if self._gpu:
                    require_pinned(self._cold[name], f"host tier {name}")
        else:
            self._open_file(path, create)
        # the device pool: hot_pages slots + one NaN poison slot for unowned table entries
        self.pool = {name: torch.full((hot_pages + 1, *t.shape[1:]), float("nan"), dtype=t.dtype,
                                      device=self.device) if t.is_floating_point() else
                     torch.zeros((hot_pages + 1, *t.shape[1:]), dtype=t.dtype,
                                 device=self.device)
                     for name, t in self._parts}
        self.poison_slot = hot_pages
        self._staging = [torch.empty(self.page_bytes, dtype=torch.uint8,
                                     pin_memory=self._gpu) for _ in range(2)]
        # the page map as arrays (a step touches thousands of pages: no per-page Python)
        self._slot_of = np.full(self.num_pages, -1, dtype=np.int64)  # page -> slot or -1
        self._page_in = np.full(hot_pages, -1, dtype=np.int64)  # slot -> page or -1
        self._used = np.zeros(hot_pages, dtype=np.int64)  # slot -> last use (LRU clock)
        self._clock = 1
        self._prefetched = np.zeros(self.num_pages, dtype=bool)
        self._pending: list = []  # (event, pages) of loads no decode has waited for (GPU)
        self._read_step = np.full(hot_pages, -1, dtype=np.int64)  # slot -> last decode step
        self._step_events: dict[int, torch.cuda.Event] = {}  # decode step -> its end (GPU)
        self._step = 0
        self._stage_turn = 0

    # ------------------------------------------------------------- the file tier
    def _open_file(self, path, create: bool) -> None:
        if path is None:
            raise ValueError("tier='file' needs path (the memmap file)")
        path = os.fspath(path)
        size = self.num_pages * self.page_bytes
        if create:
            # a file with no write bit is left alone even where root could write it
            if os.path.exists(path) and not os.stat(path).st_mode & 0o222:
                raise ValueError(f"path {path!r} is read-only: cannot write the cold pages "
                                 "(no write permission bit)")
            try:
                mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(self.num_pages,
                                                                       self.page_bytes))
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                raise ValueError(f"path {path!r} is read-only: cannot write the cold pages "
                                 f"({exc.strerror})") from None
            off = 0
            for _, t in self._parts:
                n = t[0].numel() * t.element_size()
                mm[:, off:off + n] = t.contiguous().view(torch.uint8).reshape(
                    self.num_pages, n).numpy()
                off += n
            mm.flush()
            del mm
        have = os.path.getsize(path) if os.path.exists(path) else None
        if have is None or have < size:
            raise ValueError(f"path {path!r} is too small for {self.num_pages} pages of "
                             f"{self.page_bytes} B: {have} B, need {size} B")
        self.path = path
        self._file = np.memmap(path, dtype=np.uint8, mode="r",
                               shape=(self.num_pages, self.page_bytes))

    def _file_page(self, page: int) -> dict[str, torch.Tensor]:
        # the page's bytes through a pinned staging buffer (alternating, so the next read
        # does not overwrite a buffer an async copy may still be reading: the copy stream's
        # order makes one buffer per in-flight load enough for two)
        stage = self._staging[self._stage_turn]
        self._stage_turn ^= 1
        if self._gpu and self._stream is not None:
            self._stream.synchronize()  # the staging buffer's last copy is done
        stage.numpy()[:] = self._file[page]
        out, off = {}, 0
        for name, t in self._parts:
            n = t[0].numel() * t.element_size()
            out[name] = stage[off:off + n].view(t.dtype).view(t.shape[1:])
            off += n
        return out

    # ------------------------------------------------------------- slots
    def _check_pages(self, pages) -> np.ndarray:
        arr = np.asarray(pages.cpu() if torch.is_tensor(pages) else pages, dtype=np.int64)
        arr = arr.reshape(-1)
        bad = (arr < 0) | (arr >= self.num_pages)
        if bad.any():
            raise ValueError(f"page id {int(arr[bad][0])} out of range [0, {self.num_pages})")
        return arr

    def _to_device(self, a) -> torch.Tensor:
        """A small host array on the device without a stream sync: a blocking H2D copy
        would wait for the decode in flight and serialise the steps. Pinned through torch's
        caching host allocator, which keeps the block until its async copy is done. Numpy
        views of any stride are copied to a contiguous array first (torch.from_numpy refuses
        negative strides, e.g. the reversed free-slot list of _take_slots)."""
        t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
        if not self._gpu:
            return t.to(self.device)
        if t.device.type != "cpu":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def lru(self) -> OrderedDict[int, int]:
        """{page: slot} of the resident pages, least recently used first."""
        slots = np.flatnonzero(self._page_in >= 0)
        slots = slots[np.argsort(self._used[slots], kind="stable")]
        return OrderedDict((int(self._page_in[s]), int(s)) for s in slots)

    def _take_slots(self, count: int, protect: np.ndarray) -> np.ndarray:
        """Up to ``count`` slots: free ones first, then the least recently used whose page
        is not in ``protect`` (a bool mask over pages), evicting those pages."""
        take = np.flatnonzero(self._page_in < 0)[::-1][:count]
        need = count - take.size
        if need > 0:
            occupied = np.flatnonzero(self._page_in >= 0)
            cand = occupied[~protect[self._page_in[occupied]]]
            victims = cand[np.argsort(self._used[cand], kind="stable")][:need]
            pages = self._page_in[victims]
            self._slot_of[pages] = -1
            self._prefetched[pages] = False
            self._page_in[victims] = -1
            self.stats.evictions += int(victims.size)
            take = np.concatenate([take, victims])
        return take

    def _place(self, pages: np.ndarray, slots: np.ndarray) -> None:
        self._load(pages, slots)
        self._slot_of[pages] = slots
        self._page_in[slots] = pages
        self._used[slots] = self._clock + np.arange(pages.size)
        self._clock += int(pages.size)

    def _load(self, pages: np.ndarray, slots: np.ndarray) -> None:
        """Copy cold pages into slots: on the CPU by indexing; on a GPU on the copy stream,
        after the last decode that read those slots: the host tier by one gather kernel
        per part reading pinned memory in place (one launch, not a copy per page: a page
        is tens of KB), the file tier page by page through pinned staging."""
        if pages.size == 0:
            return
        self.stats.bytes_loaded[self.tier] += self.page_bytes * int(pages.size)
        if not self._gpu:
            for page, slot in zip(pages.tolist(), slots.tolist(), strict=True):
                src = self._file_page(page) if self.tier == "file" else {
                    name: t[page] for name, t in self._cold.items()}
                for name, t in src.items():
                    self.pool[name][slot].copy_(t)
            return
        step = int(self._read_step[slots].max())
        if step in self._step_events:  # decodes still reading the old pages go first
            self._stream.wait_event(self._step_events[step])
        with torch.cuda.stream(self._stream):
            if self.tier == "host":
                ids, dst = self._to_device(pages), self._to_device(slots)
                for name, t in self._cold.items():
                    gather_pages(t, ids, self.pool[name], dst, checked=False)
            else:
                for page, slot in zip(pages.tolist(), slots.tolist(), strict=True):
                    for name, t in self._file_page(page).items():
                        self.pool[name][slot].copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._pending.append((ev, pages.copy()))

    def ensure(self, pages) -> np.ndarray:
        """Make every page resident; returns the slot of each (in the order given). The
        pages of one step must fit the window."""
        arr = self._check_pages(pages)
        _, first = np.unique(arr, return_index=True)
        uniq = arr[np.sort(first)]
        if uniq.size > self.hot_pages:
            raise ValueError(f"hot_pages ({self.hot_pages}) is smaller than the {uniq.size} "
                             "pages one step needs")
        resident = self._slot_of[uniq] >= 0
        self.stats.hits += int(resident.sum())
        self.stats.misses += int((~resident).sum())
        self.stats.prefetch_hits += int(self._prefetched[uniq[resident]].sum())
        self._prefetched[uniq] = False
        missing = uniq[~resident]
        if missing.size:
            protect = np.zeros(self.num_pages, dtype=bool)
            protect[uniq] = True
            self._place(missing, self._take_slots(int(missing.size), protect))
        # recency in the order given (hits and misses alike)
        self._used[self._slot_of[uniq]] = self._clock + np.arange(uniq.size)
        self._clock += int(uniq.size)
        if self._gpu and self._pending:
            need = np.zeros(self.num_pages, dtype=bool)
            need[uniq] = True
            cur = torch.cuda.current_stream(self.device)
            keep = []
            for ev, loaded in self._pending:
                if need[loaded].any():  # later work on this stream is ordered after it too
                    cur.wait_event(ev)
                else:
                    keep.append((ev, loaded))
            self._pending = keep
        return self._slot_of[arr]

    def prefetch(self, pages, *, keep=()) -> None:
        """Start loading pages not resident, without evicting ``keep`` (the current step's)."""
        arr = self._check_pages(pages)
        _, first = np.unique(arr, return_index=True)
        todo = arr[np.sort(first)]
        todo = todo[self._slot_of[todo] < 0]
        if not todo.size:
            return
        protect = np.zeros(self.num_pages, dtype=bool)
        protect[self._check_pages(keep)] = True
        protect[arr] = True
        slots = self._take_slots(int(todo.size), protect)
        self.stats.prefetch_dropped += int(todo.size - slots.size)
        todo = todo[: slots.size]
        self._place(todo, slots)
        self._prefetched[todo] = True
        self.stats.prefetch_issued += int(todo.size)

    # ------------------------------------------------------------- decode
    def owned_pages(self, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> np.ndarray:
        bt = block_tables.cpu().numpy()
        n = -(-seq_lens.cpu().numpy().astype(np.int64) // self.page_size)
        return bt[np.arange(bt.shape[1])[None, :] < n[:, None]]

    def decode(self, q, block_tables, seq_lens, *, next_pages=(), num_splits=None, **kw):
        """One decode step over the offloaded cache (block_tables: logical page ids, on the
        host). Returns the output; the next step's pages are prefetched after the launch."""
        bt = block_tables.cpu().numpy()
        n = -(-seq_lens.cpu().numpy().astype(np.int64) // self.page_size)
        owned = np.arange(bt.shape[1])[None, :] < n[:, None]
        slots = self.ensure(bt[owned])
        table = np.full(bt.shape, self.poison_slot, dtype=np.int32)
        table[owned] = slots
        p = self.pool
        out = paged_decode_attention(
            q, p["k"], p["v"], self._to_device(table),
            self._to_device(seq_lens), k_scale=p.get("k_scale"), v_scale=p.get("v_scale"),
            num_splits=num_splits, **kw)
        self._read_step[slots] = self._step
        if self._gpu:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._step_events[self._step] = ev
            live = set(np.unique(self._read_step).tolist())  # events no slot needs can go
            for k in [k for k in self._step_events if k not in live]:
                del self._step_events[k]
        self._step += 1
        self.prefetch(next_pages, keep=bt[owned])
        return out

    # ------------------------------------------------------------- release
    def close(self) -> None:
        """Drop the pinned tier, the staging buffers and the memmap (its mapping unmapped)."""
        if self._stream is not None:
            self._stream.synchronize()
        self._cold.clear()
        self._staging = []
        if self._file is not None:
            mm = self._file._mmap  # numpy keeps the mmap object here
            self._file = None
            if mm is not None:
                mm.close()
        self.pool = {}
        self._slot_of[:] = -1
        self._page_in[:] = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
