"""Named bandwidth peaks: the denominator each transfer's "fraction of peak" is taken from.

A host-to-device copy divided by the HBM copy rate says nothing (PCIe is ~50x slower), so
`kv_bench(..., peak=NAME)` names the peak its transfer is measured against:

* ``device_copy``: HBM ``copy_`` (peaks.py; bytes read + written, as kernels count them);
* ``h2d_pinned`` / ``h2d_pageable``: pinned / pageable host memory to the GPU;
* ``d2h_pinned``: the GPU to pinned host memory;
* ``bidir_pinned``: H2D and D2H at once on two streams (bytes of both directions);
* ``peer``: GPU to GPU, cuda:0 to cuda:1 (NVLink or PCIe peer to peer; KV pages moved
  between a prefill and a decode GPU).

Link peaks count the bytes that cross the link once (a 2 MB H2D copy moves 2 MB). They are
measured once per machine (GPU model and host: the link is the host's; for ``peer`` the
pair of GPUs by UUID) with ``LINK_BYTES`` buffers, cached as JSON beside peaks.json
(``host_links.json``), and only when a test first names one. With fewer than two visible
GPUs (one GPU, an xdist worker) ``peer`` cannot be measured: no fraction, and kv_bench
records why (``peak_absent``). A conftest or plugin can supply recorded peaks through the
``pytest_kvperf_named_peaks`` hook (the CPU tests do: a CPU has no link to measure).
"""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from . import jsonfile
from .derived import gbps
from .timing import measure

DEVICE_COPY = "device_copy"
LINK_PEAKS = ("h2d_pinned", "h2d_pageable", "d2h_pinned", "bidir_pinned")
PEER_PEAKS = ("peer",)
NAMES = (DEVICE_COPY, *LINK_PEAKS, *PEER_PEAKS)
LINK_BYTES = 256 << 20  # per direction: far past the size where DMA reaches its plateau
_CACHE_FORMAT = 1
_MEMO: dict[str, LinkPeaks] = {}  # machine key -> measured or loaded in this process
_SECTIONS = {"machines": LINK_PEAKS, "peers": PEER_PEAKS}  # part of the cache -> its peaks


@dataclass(frozen=True)
class LinkPeaks:
    gbps: dict[str, float]  # one entry per LINK_PEAKS name (PEER_PEAKS for a GPU pair)
    machine: str  # "<GPU model> @ <host>"
    measured_at: str = ""
    link_bytes: int = LINK_BYTES
    torch_version: str = ""
    notes: tuple[str, ...] = field(default=())


def check_name(peak: Any) -> str:
    if peak not in NAMES:
        raise ValueError(f"peak must be one of {', '.join(NAMES)}; got {peak!r}")
    return peak


def default_cache_path() -> Path:
    from .peaks import default_cache_path as peaks_path

    return peaks_path().with_name("host_links.json")


def machine_key(gpu_name: str, host: str | None = None) -> str:
    return f"{gpu_name} @ {host or socket.gethostname()}"


class Resolver:
    """Per session: GB/s of a named peak, or None where there is none (a CPU)."""

    def __init__(self, config, device_peaks):
        self.config = config
        self.device_peaks = device_peaks  # callable() -> peaks.Peaks | None (session's)
        self._injected: dict | None = None
        self._asked = False

    def injected(self) -> dict | None:
        if not self._asked:
            got = self.config.hook.pytest_kvperf_named_peaks(config=self.config)
            self._injected = _validated(got) if got is not None else None
            self._asked = True
        return self._injected

    def gbps(self, name: str, *, device_timed: bool) -> float | None:
        return self.lookup(name, device_timed=device_timed)[0]

    def lookup(self, name: str, *, device_timed: bool) -> tuple[float | None, str | None]:
        """(GB/s, None), or (None, why there is no such peak here)."""
        check_name(name)
        rec = self.injected()
        if rec is not None:  # recorded peaks hold whatever the timing method
            if name in rec:
                return rec[name], None
            return None, (f"{name} is not among the recorded peaks "
                          f"({', '.join(sorted(rec)) or 'none'})")
        if not device_timed:  # a host-clock timing against a GPU's peak means nothing
            return None, "timed by the host clock: a GPU's peak does not divide it"
        if name == DEVICE_COPY:
            pk = self.device_peaks()
            return (pk.copy_gbps, None) if pk is not None else (None, "no CUDA GPU")
        if name in PEER_PEAKS:
            peers, why = get_peer_peaks()
            return (peers.gbps[name], None) if peers is not None else (None, why)
        links = get_link_peaks()
        return (links.gbps[name], None) if links is not None else (None, "no CUDA GPU")


def resolver(config, device_peaks) -> Resolver:
    key = _resolver_key
    if key not in config.stash:
        config.stash[key] = Resolver(config, device_peaks)
    return config.stash[key]


_resolver_key = pytest.StashKey[Resolver]()


def _validated(got: Any) -> dict:
    if not isinstance(got, dict):
        raise TypeError("pytest_kvperf_named_peaks must return a dict {name: GB/s} or None, "
                        f"got {type(got).__name__}")
    out = {}
    for name, value in got.items():
        check_name(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise ValueError(f"pytest_kvperf_named_peaks: {name} must be finite GB/s > 0, "
                             f"got {value!r}")
        out[name] = float(value)
    return out


# ------------------------------------------------------------------ link peaks, measured


def get_link_peaks(device: Any = None, *, cache_path: str | os.PathLike | None = None,
                   refresh: bool = False) -> LinkPeaks | None:
    """Link peaks of this machine (CUDA ``device``, None: current); None on a CPU."""
    from .peaks import _resolve_gpu

    gpu = _resolve_gpu(device)
    if gpu is None:
        return None
    torch, index, name = gpu
    key = machine_key(name)
    if not refresh and key in _MEMO:
        return _MEMO[key]
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    links = None if refresh else load_cached(path, key)
    if links is None:
        links = measure_links(torch, index, key)
        try:
            store(path, links)
        except OSError as exc:  # a read-only home must not fail the session
            warnings.warn(f"pytest-kvperf: could not cache link peaks in {path}: {exc}",
                          stacklevel=2)
    _MEMO[key] = links
    return links


def load_cached(path: str | os.PathLike, key: str, *,
                section: str = "machines") -> LinkPeaks | None:
    """The cached entry ``key`` of ``section`` (machines: host links, peers: GPU pairs)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    part = data.get(section) if isinstance(data, dict) and data.get(
        "format") == _CACHE_FORMAT else None
    entry = part.get(key) if isinstance(part, dict) else None
    if not isinstance(entry, dict) or entry.get("machine") != key:
        return None
    try:
        rates = _validated(entry.get("gbps"))
    except (TypeError, ValueError):
        return None
    if set(rates) != set(_SECTIONS[section]):
        return None
    return LinkPeaks(gbps=rates, machine=key, measured_at=str(entry.get("measured_at", "")),
                     link_bytes=int(entry.get("link_bytes", LINK_BYTES)),
                     torch_version=str(entry.get("torch_version", "")),
                     notes=tuple(entry.get("notes", ())))


def store(path: str | os.PathLike, links: LinkPeaks, *, section: str = "machines") -> None:
    """Add/replace this machine's (or GPU pair's) entry, keeping the others and the other
    section (read again under the lock)."""
    with jsonfile.locked(path):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            data = {}
        ok = isinstance(data, dict) and data.get("format") == _CACHE_FORMAT
        doc = {"format": _CACHE_FORMAT}
        for name in _SECTIONS:
            part = data.get(name) if ok else None
            doc[name] = part if isinstance(part, dict) else {}
        entry = asdict(links)
        entry["notes"] = list(links.notes)
        doc[section][links.machine] = entry
        if not doc["peers"]:
            del doc["peers"]  # host-link files as before when no pair was measured
        jsonfile.replace(path, doc)


def measure_links(torch, index: int, key: str, nbytes: int = LINK_BYTES) -> LinkPeaks:
    """Each link peak by CUDA events on ``nbytes`` buffers (GPU only)."""
    dev = f"cuda:{index}"
    n = nbytes // 4
    gpu_a = torch.empty(n, dtype=torch.float32, device=dev)
    gpu_b = torch.empty(n, dtype=torch.float32, device=dev)
    pinned_a = torch.empty(n, dtype=torch.float32, pin_memory=True)
    pinned_b = torch.empty(n, dtype=torch.float32, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.float32)
    pageable.fill_(1.0)  # touched: first-touch page faults are not the link
    pinned_a.fill_(1.0)
    h2d_stream, d2h_stream = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

    def both():
        main = torch.cuda.current_stream(dev)
        h2d_stream.wait_stream(main)
        d2h_stream.wait_stream(main)
        with torch.cuda.stream(h2d_stream):
            gpu_a.copy_(pinned_a, non_blocking=True)
        with torch.cuda.stream(d2h_stream):
            pinned_b.copy_(gpu_b, non_blocking=True)
        main.wait_stream(h2d_stream)
        main.wait_stream(d2h_stream)

    cases = {
        "h2d_pinned": (lambda: gpu_a.copy_(pinned_a, non_blocking=True), nbytes),
        "h2d_pageable": (lambda: gpu_a.copy_(pageable), nbytes),
        "d2h_pinned": (lambda: pinned_b.copy_(gpu_b, non_blocking=True), nbytes),
        "bidir_pinned": (both, 2 * nbytes),
    }
    rates = {}
    for name, (fn, moved) in cases.items():
        t = measure(fn, device=dev, warmup=0.1, use_cuda_graph=False, min_rounds=10,
                    max_time_s=1.0)
        rates[name] = gbps(moved, t.median_us)
    return LinkPeaks(gbps=rates, machine=key,
                     measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     link_bytes=nbytes, torch_version=torch.__version__)


# ------------------------------------------------------------------ GPU to GPU, measured


def _peer_devices():
    """(torch, key) for cuda:0 -> cuda:1, or (None, why not) with fewer than two GPUs."""
    try:
        import torch
    except ImportError:
        return None, "needs 2 CUDA GPUs (a GPU-to-GPU copy); found no torch"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return None, f"needs 2 CUDA GPUs (a GPU-to-GPU copy); found {count}"
    ends = []
    for i in (0, 1):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", f"index {i}"))
        ends.append(f"{props.name} {uuid if uuid.startswith('GPU-') else 'GPU-' + uuid}")
    return torch, machine_key(" -> ".join(ends))


def get_peer_peaks(*, cache_path: str | os.PathLike | None = None,
                   refresh: bool = False) -> tuple[LinkPeaks | None, str | None]:
    """(the ``peer`` peak of cuda:0 -> cuda:1, None), or (None, why not measurable)."""
    torch, key = _peer_devices()
    if torch is None:
        return None, key
    if not refresh and key in _MEMO:
        return _MEMO[key], None
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    peers = None if refresh else load_cached(path, key, section="peers")
    if peers is None:
        peers = measure_peer(torch, key)
        try:
            store(path, peers, section="peers")
        except OSError as exc:
            warnings.warn(f"pytest-kvperf: could not cache the peer peak in {path}: {exc}",
                          stacklevel=2)
    _MEMO[key] = peers
    return peers, None


def measure_peer(torch, key: str, nbytes: int = LINK_BYTES) -> LinkPeaks:
    """cuda:0 -> cuda:1 ``copy_`` by CUDA events on cuda:0 (whose stream waits for cuda:1's
    at the end, so the events span the copy on whichever stream runs it)."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda:0").fill_(1.0)
    dst = torch.empty(n, dtype=torch.float32, device="cuda:1")
    access = torch.cuda.can_device_access_peer(0, 1)

    def copy():
        dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(1))
        torch.cuda.current_stream(0).wait_event(done)

    t = measure(copy, device="cuda:0", warmup=0.1, use_cuda_graph=False, min_rounds=10,
                max_time_s=1.0)
    return LinkPeaks(gbps={"peer": gbps(nbytes, t.median_us)}, machine=key,
                     measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     link_bytes=nbytes, torch_version=torch.__version__,
                     notes=("cuda:0 -> cuda:1", "peer access " + (
                         "on" if access else "off: the driver stages through the host")))
