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
        self._lru: OrderedDict[int, int] = OrderedDict()  # logical page -> slot, oldest first
        self._free = list(range(hot_pages))
        self._prefetched: set[int] = set()
        self._ready: dict[int, torch.cuda.Event] = {}  # slot -> its load (GPU)
        self._last_read: dict[int, torch.cuda.Event] = {}  # slot -> its last decode (GPU)
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
    def _check_pages(self, pages) -> list[int]:
        out = []
        for p in pages:
            p = int(p)
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page id {p} out of range [0, {self.num_pages})")
            out.append(p)
        return out

    def _take_slot(self, keep: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for page, slot in self._lru.items():  # oldest first
            if page not in keep:
                del self._lru[page]
                self._prefetched.discard(page)
                self.stats.evictions += 1
                return slot
        return None

    def _load(self, page: int, slot: int) -> None:
        src = self._file_page(page) if self.tier == "file" else {
            name: t[page] for name, t in self._cold.items()}
        if not self._gpu:
            for name, t in src.items():
                self.pool[name][slot].copy_(t)
        else:
            if slot in self._last_read:  # a decode still reading the old page goes first
                self._stream.wait_event(self._last_read[slot])
            with torch.cuda.stream(self._stream):
                for name, t in src.items():
                    self.pool[name][slot].copy_(t, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._stream)
            self._ready[slot] = ev
        self.stats.bytes_loaded[self.tier] += self.page_bytes

    def ensure(self, pages) -> dict[int, int]:
        """Make every page resident; returns {page: slot}. A step's pages must fit."""
        pages = list(dict.fromkeys(self._check_pages(pages)))
        if len(pages) > self.hot_pages:
            raise ValueError(f"hot_pages ({self.hot_pages}) is smaller than the {len(pages)} "
                             "pages one step needs")
        keep = set(pages)
        where = {}
        for p in pages:
            if p in self._lru:
                self._lru.move_to_end(p)
                self.stats.hits += 1
                if p in self._prefetched:
                    self.stats.prefetch_hits += 1
                    self._prefetched.discard(p)
            else:
                slot = self._take_slot(keep)
                self._load(p, slot)
                self._lru[p] = slot
                self.stats.misses += 1
            where[p] = self._lru[p]
        if self._gpu:
            cur = torch.cuda.current_stream(self.device)
            for s in where.values():
                if s in self._ready:
                    cur.wait_event(self._ready.pop(s))
        return where

    def prefetch(self, pages, *, keep=()) -> None:
        """Start loading pages not resident, without evicting ``keep`` (the current step's)."""
        keep = set(self._check_pages(keep)) | set(self._check_pages(pages))
        for p in self._check_pages(pages):
            if p in self._lru:
                continue
            slot = self._take_slot(keep)
            if slot is None:
                self.stats.prefetch_dropped += 1
                continue
            self._load(p, slot)
            self._lru[p] = slot
            self._lru.move_to_end(p)
            self._prefetched.add(p)
            self.stats.prefetch_issued += 1

    # ------------------------------------------------------------- decode
    def owned_pages(self, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> list[int]:
        bt, lens = block_tables.cpu(), seq_lens.cpu().tolist()
        out = []
        for b, n in enumerate(lens):
            out.extend(bt[b, : -(-int(n) // self.page_size)].tolist())
        return out

    def decode(self, q, block_tables, seq_lens, *, next_pages=(), num_splits=None, **kw):
        """One decode step over the offloaded cache (block_tables: logical page ids)."""
        owned = self.owned_pages(block_tables, seq_lens)
        where = self.ensure(owned)
        table = torch.full(block_tables.shape, self.poison_slot, dtype=torch.int32)
        bt, lens = block_tables.cpu(), seq_lens.cpu().tolist()
        for b, n in enumerate(lens):
            for j in range(-(-int(n) // self.page_size)):
                table[b, j] = where[int(bt[b, j])]
        p = self.pool
        out = paged_decode_attention(
            q, p["k"], p["v"], table.to(self.device), seq_lens.to(self.device),
            k_scale=p.get("k_scale"), v_scale=p.get("v_scale"), num_splits=num_splits, **kw)
        if self._gpu:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            for s in where.values():
                self._last_read[s] = ev
        self.prefetch(next_pages, keep=owned)
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
        self._lru.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
