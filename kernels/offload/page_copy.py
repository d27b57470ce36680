"""Moving many small KV pages between host and device: three ways, one contract.

A 16-token page of 8 heads x 128 x 2 B is 32 KB, and a copy engine is inefficient at that
size (a fixed cost per copy). ``dst[slots[i]] = src[ids[i]]`` for pages of any byte size:
* ``copy_per_page``: one ``copy_`` per page (what a naive offload does);
* ``copy_batched``: gather the pages into a pinned staging buffer on the host, copy it in a
  few large chunks (the host gathers chunk j+1 while chunk j crosses the link), one scatter
  on the destination (a few DMAs instead of n);
* ``gather_pages``: a Triton kernel that reads the source pages where they are (pinned host
  memory is addressable from the GPU under unified addressing) and writes the destination
  slots, no copy engine at all (the same kernel runs on the CPU in the interpreter).

``gather_pages_ref`` is the torch reference; every path equals it bit for bit, and pages not
named in ``slots`` are left as they were.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.device import interpreted
from kvperf_kernels.formats.checks import check_device, check_int
from kvperf_kernels.offload.transfer import require_pinned

BLOCK_WORDS = 1024  # int32 words per program: 4 KB, 16-byte vectors per thread
# bytes per staged copy: 2 MB copies already run the copy engine at its full rate, and a
# 32 MB batch still splits into 8 chunks whose host gathers hide behind the copies
CHUNK_BYTES = 4 << 20


def _check(src: torch.Tensor, ids: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor):
    for name, t in (("src", src), ("dst", dst), ("ids", ids), ("slots", slots)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if src.dim() < 2 or dst.dim() != src.dim() or src.shape[1:] != dst.shape[1:] or (
            src.dtype != dst.dtype):
        raise ValueError(f"src {tuple(src.shape)} {src.dtype} and dst {tuple(dst.shape)} "
                         f"{dst.dtype} must be [pages, ...] of one page shape and dtype")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("src and dst must be contiguous page arrays")
    for name, t in (("ids", ids), ("slots", slots)):
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a 1-D int32/int64 tensor, got {t.dtype} "
                            f"{tuple(t.shape)}")
    if ids.numel() != slots.numel():
        raise ValueError(f"ids ({ids.numel()}) and slots ({slots.numel()}) differ in length")
    for name, t, n in (("ids", ids, src.shape[0]), ("slots", slots, dst.shape[0])):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            bad = t[(t < 0) | (t >= n)][0]
            raise ValueError(f"{name}: page id {int(bad)} out of range [0, {n})")
    if slots.numel() and torch.unique(slots).numel() != slots.numel():
        raise ValueError("slots: a destination page is named twice")


def page_bytes(t: torch.Tensor) -> int:
    return t[0].numel() * t.element_size()


def gather_pages_ref(src, ids, dst, slots) -> torch.Tensor:
    _check(src, ids, dst, slots)
    dst[slots.to(dst.device).long()] = src[ids.to(src.device).long()].to(dst.device)
    return dst


def copy_per_page(src, ids, dst, slots, *, non_blocking: bool = True) -> torch.Tensor:
    """One copy per page; ids/slots as Python lists on the host (no device reads)."""
    for i, s in zip(ids, slots, strict=True):
        dst[int(s)].copy_(src[int(i)], non_blocking=non_blocking)
    return dst


class Staging:
    """Where copy_batched stages up to ``pages`` pages shaped like ``like``'s: host memory
    (pinned when ``device`` is a GPU) and memory on ``device``, in chunks of ``chunk_bytes``
    (whole pages, at least one). A chunk's host part is gathered into again only after the
    copy that last read it has finished (an event per chunk): the copies are async, so a
    second call must not overwrite bytes the first one's copy is still reading."""

    def __init__(self, pages: int, like: torch.Tensor, device, *,
                 chunk_bytes: int = CHUNK_BYTES):
        check_int(pages, "pages", 1)
        check_int(chunk_bytes, "chunk_bytes", 1)
        if not isinstance(like, torch.Tensor) or like.dim() < 2:
            raise ValueError("like must be a [pages, ...] tensor (the source pages)")
        self.device = torch.device(device)
        self._gpu = self.device.type == "cuda"
        shape = (pages, *like.shape[1:])
        self.host = torch.empty(shape, dtype=like.dtype, pin_memory=self._gpu)
        self.dev = torch.empty(shape, dtype=like.dtype, device=self.device)
        self.pages = pages
        self.chunk_pages = max(1, chunk_bytes // page_bytes(like))
        self._read: list = [None] * -(-pages // self.chunk_pages)  # chunk -> its copy's end

    def chunks(self, n: int):
        """(index, first page, end page) of the chunks holding n staged pages."""
        for j, a in enumerate(range(0, n, self.chunk_pages)):
            yield j, a, min(a + self.chunk_pages, n)

    def wait_free(self, chunk: int) -> None:
        """Block the host until the last copy out of this chunk's host part is done."""
        if self._read[chunk] is not None:
            self._read[chunk].synchronize()

    def mark_read(self, chunk: int) -> None:
        """The copy out of this chunk was just queued on the current stream."""
        if self._gpu:
            if self._read[chunk] is None:
                self._read[chunk] = torch.cuda.Event()
            self._read[chunk].record()


def copy_batched(src, ids, dst, slots, staging: Staging):
    """Host gather into the pinned staging, one async copy per chunk to dst's device (the
    gather of the next chunk runs while it crosses the link), one scatter into dst's slots.
    ids on the host, slots on dst's device."""
    n = ids.numel()
    if n > staging.pages:
        raise ValueError(f"ids: {n} pages do not fit the staging's {staging.pages}")
    if n == 0:
        return dst
    for j, a, b in staging.chunks(n):
        staging.wait_free(j)
        torch.index_select(src, 0, ids[a:b], out=staging.host[a:b])
        staging.dev[a:b].copy_(staging.host[a:b], non_blocking=True)
        staging.mark_read(j)
    dst.index_copy_(0, slots, staging.dev[:n])
    return dst


@triton.jit
def _gather_kernel(src, ids, dst, slots, WORDS: tl.constexpr, BLOCK: tl.constexpr):
    page = tl.program_id(0)
    part = tl.program_id(1)
    s_page = tl.load(ids + page).to(tl.int64)
    d_page = tl.load(slots + page).to(tl.int64)
    offs = part * BLOCK + tl.arange(0, BLOCK)
    mask = offs < WORDS
    words = tl.load(src + s_page * WORDS + offs, mask=mask)
    tl.store(dst + d_page * WORDS + offs, words, mask=mask)


def gather_pages(src, ids, dst, slots, *, checked: bool = True) -> torch.Tensor:
    """dst[slots[i]] = src[ids[i]] by a kernel reading and writing in place: either side in
    device memory or pinned host memory (a gather to HBM, or a scatter back to the host),
    ids/slots on the kernel's device. Pages of a multiple of 4 bytes."""
    if checked:
        _check(src, ids, dst, slots)
        if "cuda" in (src.device.type, dst.device.type):  # gather H2D or scatter D2H
            for name, t in (("src", src), ("dst", dst)):
                if t.device.type == "cpu":  # pageable memory is not addressable from the GPU
                    require_pinned(t, name)
        elif not interpreted():
            raise ValueError("src and dst are both host memory: the kernel runs on a GPU, "
                             "one side must be a CUDA tensor (host to host only with "
                             "TRITON_INTERPRET=1)")
        check_device(ids, "ids")
        check_device(slots, "slots")
    nbytes = page_bytes(src)
    if nbytes % 4:
        raise ValueError(f"page bytes ({nbytes}) must be a multiple of 4")
    n = ids.numel()
    if n == 0:
        return dst
    words = nbytes // 4
    grid = (n, triton.cdiv(words, BLOCK_WORDS))
    _gather_kernel[grid](src.view(torch.int32), ids, dst.view(torch.int32), slots,
                         WORDS=words, BLOCK=BLOCK_WORDS)
    return dst


def check_pages_moved(src, ids, dst, slots, before: torch.Tensor) -> None:
    """Bit for bit: each named slot holds its page, every other slot is as ``before``."""
    check_int(len(ids), "ids", 0)
    got = dst.cpu()
    expect = before.cpu().clone()  # before: a copy of dst, on its device
    expect[slots.cpu().long()] = src.cpu()[ids.cpu().long()]
    if not torch.equal(got.view(torch.uint8), expect.view(torch.uint8)):
        bad = (got.view(torch.uint8) != expect.view(torch.uint8)).reshape(got.shape[0], -1)
        pages = bad.any(1).nonzero().flatten().tolist()
        raise AssertionError(f"pages {pages[:8]} of dst differ from the expected bytes")
