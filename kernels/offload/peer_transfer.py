"""Moving KV pages between two devices, as disaggregated prefill / decode does: the prefill
GPU hands a request's pages to the decode GPU, whose page pool takes them into free slots.

``dst[slots[i]] = src[ids[i]]`` with src and dst on two devices, pages of any shape and
dtype (moved as integer words: bit for bit, NaN payloads and -0 included). Two ways:

* ``peer_copy``: one process sees both devices. The named pages are gathered into a
  contiguous staging buffer on the source device, cross in one copy (peer to peer over
  NVLink or PCIe), and are scattered into their slots on the destination device.
  ``peer_copy_per_page`` issues one copy per page instead (large blocks need no staging).
  The source device's current stream then waits for the scatter, so whatever is queued
  after the call there (a timing event, the next gather into the staging) sees the pages
  in place. Host tensors on both sides run the same steps (the CPU stand-in for two
  devices); a host and a device are page_copy's (pinned staging), one device is not a move.
* ``send_pages`` / ``recv_pages``: one rank per device, through torch.distributed (NCCL
  between GPUs, gloo between host processes). The sender packs the pages into its staging
  and sends it as one message; the receiver receives into its staging and scatters it into
  the slots. ``staging=None`` sends one message per page (``batch_isend_irecv``), from and
  into the page arrays themselves. With ``checked=True`` (the default) the two ranks first
  exchange a header (pages, page shape, dtype, staged or not) both ways, so a mismatch
  raises on both ranks with the same words instead of hanging or landing wrong bytes.

``checked=False`` skips the host-side checks (and their device syncs): for timed calls after
a checked one with the same arguments. ``moved_pages_ref`` is the torch reference: the
destination's expected bytes, built on the host. ``page_copy.check_pages_moved`` compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvperf_kernels.formats.checks import check_int

_WORD_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
# the header's dtype codes; a page dtype outside this list cannot be described to the peer
WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
               torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8,
               torch.int16, torch.int32, torch.int64)
_MAGIC = 0x4B56_5047  # "KVPG"
_MAX_PAGE_DIMS = 8
_HEADER_WORDS = 5 + _MAX_PAGE_DIMS


# ------------------------------------------------------------------ the input contract


def check_pages(t, name: str) -> None:
    """A page array: a contiguous [pages, ...] tensor of a non-empty page."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must be a [pages, ...] page array, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous page array, got stride {t.stride()}")
    if page_bytes(t) == 0:
        raise ValueError(f"{name}: pages of shape {tuple(t.shape[1:])} hold no bytes")


def check_index(t, name: str, n_pages: int, device: torch.device, where: str) -> None:
    """ids / slots: a 1-D int32/int64 tensor on ``device`` (``where`` says why), each entry
    in [0, n_pages)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor, got {t.dtype} "
                        f"{tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} ({where}), got {t.device}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_pages):
        bad = t[(t < 0) | (t >= n_pages)][0]
        raise ValueError(f"{name}: page id {int(bad)} out of range [0, {n_pages})")


def check_same_pages(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
        raise ValueError(f"{a_name} {tuple(a.shape)} {a.dtype} and {b_name} {tuple(b.shape)} "
                         f"{b.dtype} must be [pages, ...] of one page shape and dtype")


def check_unique_slots(slots: torch.Tensor) -> None:
    if slots.numel() and torch.unique(slots).numel() != slots.numel():
        raise ValueError("slots: a destination page is named twice")


def check_move(src, ids, dst, slots, *, ids_on, slots_on, why: tuple[str, str]) -> None:
    """src/dst page arrays of one layout, ids (on ids_on) and slots (on slots_on) of one
    length, in range, no slot named twice."""
    check_pages(src, "src")
    check_pages(dst, "dst")
    check_same_pages(src, "src", dst, "dst")
    for name, t in (("ids", ids), ("slots", slots)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if ids.dim() == 1 and slots.dim() == 1 and ids.numel() != slots.numel():
        raise ValueError(f"ids ({ids.numel()}) and slots ({slots.numel()}) differ in length")
    check_index(ids, "ids", src.shape[0], torch.device(ids_on), why[0])
    check_index(slots, "slots", dst.shape[0], torch.device(slots_on), why[1])
    check_unique_slots(slots)


def _cuda_index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else torch.cuda.current_device()


def check_peer_devices(src_device, dst_device) -> None:
    """Two CUDA devices, or host and host (the CPU stand-in); anything else is not a peer
    move, and the message says what is."""
    s, d = torch.device(src_device), torch.device(dst_device)
    for what, dev in (("src", s), ("dst", d)):
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"{what} is on {dev}: pages move between CUDA devices "
                             "(or between host tensors, the CPU stand-in)")
    if s.type != d.type:
        raise ValueError(f"src is on {s} and dst on {d}: host <-> device moves are "
                         "page_copy's (pinned staging); a peer copy moves pages between "
                         "two devices")
    if s.type == "cuda" and _cuda_index(s) == _cuda_index(d):
        raise ValueError(f"src and dst are both on cuda:{_cuda_index(s)}: a peer copy "
                         "moves pages between two devices (within one device: "
                         "page_copy.gather_pages)")


def check_staging(staging, name: str, pages: torch.Tensor, n: int) -> None:
    """A staging buffer for n pages of ``pages``' layout, on its device."""
    check_pages(staging, name)
    check_same_pages(staging, name, pages, "the pages")
    if staging.device != pages.device:
        raise ValueError(f"{name} must be on {pages.device} (beside its pages), got "
                         f"{staging.device}")
    if staging.shape[0] < n:
        raise ValueError(f"{name}: {n} pages do not fit its {staging.shape[0]}")


# ------------------------------------------------------------------ pages as words


def page_bytes(t: torch.Tensor) -> int:
    """Bytes of one page of a [pages, ...] array (whether or not it holds any page)."""
    n = t.element_size()
    for d in t.shape[1:]:
        n *= d
    return n


def words(t: torch.Tensor) -> torch.Tensor:
    """[pages, ...] contiguous -> [pages, w] of the widest integer type that divides a page
    (a view: the same bytes, moved by integer ops that never touch a NaN's payload)."""
    flat = t.reshape(t.shape[0], page_bytes(t) // t.element_size()).view(torch.uint8)
    for dt in _WORD_DTYPES:
        if flat.shape[1] % dt.itemsize == 0:
            try:
                return flat.view(dt)
            except RuntimeError:  # a view whose offset is not aligned to dt
                continue
    return flat


def _long(index: torch.Tensor) -> torch.Tensor:
    return index if index.dtype == torch.int64 else index.long()


def _source_waits_for_destination(src: torch.device, dst: torch.device) -> None:
    if src.type == "cuda" and dst.type == "cuda" and src != dst:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(dst))
        torch.cuda.current_stream(src).wait_event(done)


# ------------------------------------------------------------------ peer copy


@dataclass(frozen=True)
class PeerStaging:
    """Where peer_copy stages up to ``pages`` pages: one buffer on each device."""

    src: torch.Tensor
    dst: torch.Tensor

    @classmethod
    def like(cls, pages: int, like: torch.Tensor, src_device, dst_device) -> PeerStaging:
        check_int(pages, "pages", 1)
        check_pages(like, "like")
        shape = (pages, *like.shape[1:])
        return cls(torch.empty(shape, dtype=like.dtype, device=src_device),
                   torch.empty(shape, dtype=like.dtype, device=dst_device))

    @property
    def pages(self) -> int:
        return min(self.src.shape[0], self.dst.shape[0])


def _check_peer_copy(src, ids, dst, slots, *, on_host: bool, why) -> None:
    for name, t in (("src", src), ("dst", dst)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    check_peer_devices(src.device, dst.device)
    ids_on, slots_on = ("cpu", "cpu") if on_host else (src.device, dst.device)
    check_move(src, ids, dst, slots, ids_on=ids_on, slots_on=slots_on, why=why)


def peer_copy(src, ids, dst, slots, staging: PeerStaging, *, checked: bool = True):
    """dst[slots[i]] = src[ids[i]]: gather on src's device (ids there), one copy across,
    scatter on dst's device (slots there; int64 slots save a conversion per call)."""
    if checked:
        _check_peer_copy(src, ids, dst, slots, on_host=False,
                         why=("the gather runs there", "the scatter runs there"))
        if not isinstance(staging, PeerStaging):
            raise TypeError(f"staging must be a PeerStaging, got {type(staging).__name__}")
        check_staging(staging.src, "staging.src", src, ids.numel())
        check_staging(staging.dst, "staging.dst", dst, ids.numel())
    n = ids.numel()
    if n == 0:
        return dst
    packed = words(staging.src)[:n]
    landed = words(staging.dst)[:n]
    torch.index_select(words(src), 0, ids, out=packed)
    landed.copy_(packed, non_blocking=True)
    words(dst).index_copy_(0, _long(slots), landed)
    _source_waits_for_destination(src.device, dst.device)
    return dst


def peer_copy_per_page(src, ids, dst, slots, *, checked: bool = True):
    """dst[slots[i]] = src[ids[i]], one copy per page; ids and slots on the host (the copies
    are issued from there)."""
    if checked:
        _check_peer_copy(src, ids, dst, slots, on_host=True,
                         why=("one copy per page is issued from the host",) * 2)
    for i, s in zip(ids.tolist(), slots.tolist(), strict=True):
        dst[s].copy_(src[i], non_blocking=True)
    if ids.numel():
        _source_waits_for_destination(src.device, dst.device)
    return dst


def moved_pages_ref(src, ids, before, slots) -> torch.Tensor:
    """The torch reference: ``before`` (the destination as it was) with src[ids[i]] in slot
    slots[i], every other page unchanged; built on the host, returned there."""
    src, ids, before, slots = (t.cpu() for t in (src, ids, before, slots))
    check_move(src, ids, before, slots, ids_on="cpu", slots_on="cpu",
               why=("the reference runs on the host",) * 2)
    expect = before.clone()
    expect[slots.long()] = src[ids.long()]
    return expect


# ------------------------------------------------------------------ send / recv


def _group_facts(peer, group) -> tuple[int, str]:
    """(this rank, backend) after checking the group and the peer."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call "
                           "init_process_group(...) on both ranks first")
    if isinstance(peer, bool) or not isinstance(peer, int):
        raise TypeError(f"peer must be an int rank, got {type(peer).__name__}")
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    me = dist.get_rank()
    if peer not in ranks:
        raise ValueError(f"peer: rank {peer} is not in the group (ranks {ranks})")
    if peer == me:
        raise ValueError(f"peer: rank {me} cannot move pages to itself (within one "
                         "device: page_copy.gather_pages)")
    return me, dist.get_backend(group)


def _check_backend_device(backend: str, pages: torch.Tensor, name: str) -> None:
    if backend == "nccl" and pages.device.type != "cuda":
        raise ValueError(f"{name} is on {pages.device}: the group's backend is nccl, which "
                         "moves CUDA memory (host pages need gloo)")
    if backend == "gloo" and pages.device.type != "cpu":
        raise ValueError(f"{name} is on {pages.device}: the group's backend is gloo, which "
                         "moves host memory here (CUDA pages need nccl)")


def _header(pages: torch.Tensor, n: int, staged: bool) -> list[int]:
    page = tuple(pages.shape[1:])
    if len(page) > _MAX_PAGE_DIMS:
        raise ValueError(f"pages of {len(page)} dims cannot be described to the peer "
                         f"(at most {_MAX_PAGE_DIMS})")
    if pages.dtype not in WIRE_DTYPES:
        raise TypeError(f"pages of {pages.dtype} cannot be described to the peer; "
                        f"dtypes: {', '.join(str(d) for d in WIRE_DTYPES)}")
    dims = list(page) + [-1] * (_MAX_PAGE_DIMS - len(page))
    return [_MAGIC, n, int(staged), WIRE_DTYPES.index(pages.dtype), len(page), *dims]


def _describe(h: list[int], rank: int, verb: str) -> str:
    if len(h) != _HEADER_WORDS or h[0] != _MAGIC:
        return f"rank {rank} sent no page header ({h[:4]}...)"
    shape = tuple(h[5:5 + h[4]])
    how = "staged" if h[2] else "one message per page"
    return f"rank {rank} {verb} {h[1]} pages of {shape} {WIRE_DTYPES[h[3]]} ({how})"


def _disagreement(sent: list[int], expected: list[int]) -> str | None:
    if len(sent) != _HEADER_WORDS or sent[0] != _MAGIC:
        return "no page header"
    what = []
    if sent[1] != expected[1]:
        what.append("lengths differ")
    if sent[3] != expected[3]:
        what.append("dtypes differ")
    if sent[4:] != expected[4:]:
        what.append("page shapes differ")
    if sent[2] != expected[2]:
        what.append("one side stages, the other sends per page")
    return ", ".join(what) or None


def _exchange_headers(mine: list[int], me: int, peer: int, sender: bool, device, group):
    """Both ranks learn both headers (sender: send then recv; receiver: recv then send);
    a disagreement raises the same ValueError on both."""
    out = torch.tensor(mine, dtype=torch.int64, device=device)
    theirs = torch.empty(_HEADER_WORDS, dtype=torch.int64, device=device)
    if sender:
        dist.send(out, peer, group=group)
        dist.recv(theirs, peer, group=group)
    else:
        dist.recv(theirs, peer, group=group)
        dist.send(out, peer, group=group)
    other = theirs.tolist()
    sent, expected = (mine, other) if sender else (other, mine)
    s_rank, r_rank = (me, peer) if sender else (peer, me)
    why = _disagreement(sent, expected)
    if why:
        raise ValueError(f"send_pages/recv_pages: the ranks disagree ({why}): sender "
                         f"{_describe(sent, s_rank, 'sends')}; receiver "
                         f"{_describe(expected, r_rank, 'expects')}")


def _check_side(pages, index, peer: int, group, staging, *, sender: bool) -> None:
    """One side's input contract (src / ids of send_pages, dst / slots of recv_pages), then
    the header exchange, so that the two ranks agree before any page moves."""
    p_name, i_name = ("src", "ids") if sender else ("dst", "slots")
    me, backend = _group_facts(peer, group)
    check_pages(pages, p_name)
    _check_backend_device(backend, pages, p_name)
    if staging is None:
        on, why = torch.device("cpu"), "one message per page is issued from the host"
    else:
        on, why = pages.device, f"the {'gather' if sender else 'scatter'} runs there"
    check_index(index, i_name, pages.shape[0], on, why)
    if not sender:
        check_unique_slots(index)
    if staging is not None:
        check_staging(staging, "staging", pages, index.numel())
    _exchange_headers(_header(pages, index.numel(), staging is not None), me, peer, sender,
                      pages.device, group)


def send_pages(src, ids, peer: int, *, staging: torch.Tensor | None = None, group=None,
               checked: bool = True) -> None:
    """Send src[ids] to rank ``peer``: packed into ``staging`` (beside src, ids there) and
    sent as one message, or with ``staging=None`` one message per page (ids on the host).
    The peer calls recv_pages with as many slots."""
    if checked:
        _check_side(src, ids, peer, group, staging, sender=True)
    n = ids.numel()
    if n == 0:
        return
    if staging is None:
        w = words(src)
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, w[i], peer, group)
                                            for i in ids.tolist()]):
            work.wait()
        return
    packed = words(staging)[:n]
    torch.index_select(words(src), 0, ids, out=packed)
    dist.send(packed, peer, group=group)


def recv_pages(dst, slots, peer: int, *, staging: torch.Tensor | None = None, group=None,
               checked: bool = True):
    """Receive the pages rank ``peer`` sends into dst[slots]: through ``staging`` (beside
    dst, slots there) and one scatter, or with ``staging=None`` straight into each slot
    (slots on the host). Returns dst."""
    if checked:
        _check_side(dst, slots, peer, group, staging, sender=False)
    n = slots.numel()
    if n == 0:
        return dst
    if staging is None:
        w = words(dst)
        for work in dist.batch_isend_irecv([dist.P2POp(dist.irecv, w[s], peer, group)
                                            for s in slots.tolist()]):
            work.wait()
        return dst
    landed = words(staging)[:n]
    dist.recv(landed, peer, group=group)
    words(dst).index_copy_(0, _long(slots), landed)
    return dst
