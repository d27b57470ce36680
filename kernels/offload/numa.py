"""Host memory on a chosen NUMA node, and which node and link a GPU hangs off.

Placement is real, not requested-and-hoped: an anonymous mapping is bound to one node with
``mbind(MPOL_BIND)`` before its first touch (raw syscalls through ctypes, so no libnuma is
needed), touched, and then asked page by page with ``move_pages(nodes=NULL)`` where its
pages are; a buffer whose pages landed elsewhere is an error. Pinning (for DMA) registers
that memory with CUDA (``cudaHostRegister``), as libnuma users do with numa_alloc_onnode.

Topology comes from sysfs: ``/sys/devices/system/node`` (nodes, which have memory / CPUs)
and ``/sys/bus/pci/devices/<addr>/`` (the GPU's ``numa_node`` and its PCIe link). Both roots
are arguments, so the parsing is tested on recorded trees.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

NODE_ROOT = Path("/sys/devices/system/node")
PCI_ROOT = Path("/sys/bus/pci/devices")
MPOL_BIND = 2
MPOL_MF_STRICT = 1
MPOL_MF_MOVE = 2
# syscall numbers per architecture (unistd.h)
_SYSCALLS = {"x86_64": {"mbind": 237, "move_pages": 279},
             "aarch64": {"mbind": 235, "move_pages": 239}}
_VERIFY_PAGES = 64  # pages asked per buffer (evenly spread): enough to catch a wrong node
GRACE_GPUS = ("GH200", "GB200", "GB300", "GB10")  # GPUs on a Grace CPU's NVLink-C2C


def parse_list(text: str) -> list[int]:
    """sysfs list syntax: '0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]; '' -> []."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


@dataclass(frozen=True)
class Topology:
    nodes_with_memory: tuple[int, ...]
    nodes_with_cpus: tuple[int, ...]
    cpus: dict[int, tuple[int, ...]]  # node -> its CPUs

    def remote_of(self, node: int) -> int | None:
        """A memory node other than ``node`` (preferring one with CPUs: a socket, not a
        GPU's or CXL memory), or None on a one-node machine."""
        others = [n for n in self.nodes_with_memory if n != node]
        with_cpus = [n for n in others if n in self.nodes_with_cpus]
        return (with_cpus or others or [None])[0]


def topology(root: str | os.PathLike = NODE_ROOT) -> Topology:
    root = Path(root)

    def read(name: str) -> list[int]:
        try:
            return parse_list((root / name).read_text())
        except FileNotFoundError:
            return []

    online = read("online") or [0]
    mem = read("has_memory") or online
    cpu_nodes = read("has_cpu") or online
    cpus = {}
    for n in online:
        try:
            cpus[n] = tuple(parse_list((root / f"node{n}" / "cpulist").read_text()))
        except FileNotFoundError:
            cpus[n] = ()
    return Topology(tuple(mem), tuple(cpu_nodes), cpus)


def gpu_pci_address(device: int | torch.device | str = 0) -> str | None:
    """'0000:3b:00.0' of a CUDA device (torch's properties), None without one."""
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.device(device).index or 0
                                         if not isinstance(device, int) else device)
    bus, dev, dom = (getattr(p, k, None) for k in ("pci_bus_id", "pci_device_id",
                                                     "pci_domain_id"))
    if bus is None or dev is None:
        return None
    return f"{dom or 0:04x}:{bus:02x}:{dev:02x}.0"


def gpu_numa_node(pci_address: str | None, root: str | os.PathLike = PCI_ROOT) -> int | None:
    """The NUMA node sysfs gives the PCI device (None: unknown, -1 in sysfs or no file)."""
    if pci_address is None:
        return None
    try:
        node = int((Path(root) / pci_address.lower() / "numa_node").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return node if node >= 0 else None


def host_link(pci_address: str | None, gpu_name: str = "",
              root: str | os.PathLike = PCI_ROOT, machine: str | None = None) -> str:
    """How the GPU reaches host memory, in words: 'NVLink-C2C (Grace)' on a Grace-coupled
    GPU, else the PCIe link sysfs reports ('PCIe 32.0 GT/s x16'), else why it is unknown."""
    if is_grace_coupled(gpu_name, machine):
        return "NVLink-C2C (Grace)"
    if pci_address is None:
        return "unknown host link (no CUDA GPU or no PCI address)"
    d = Path(root) / pci_address.lower()
    try:
        speed = (d / "current_link_speed").read_text().strip()
        width = (d / "current_link_width").read_text().strip()
    except FileNotFoundError:
        return f"unknown host link (no PCIe link files for {pci_address})"
    return f"PCIe {speed.replace(' PCIe', '')} x{width}"


def is_grace_coupled(gpu_name: str, machine: str | None = None) -> bool:
    machine = machine or platform.machine()
    return machine == "aarch64" and any(g in gpu_name for g in GRACE_GPUS)


# ------------------------------------------------------------------ placement


def _syscall(name: str, *args) -> int:
    arch = platform.machine()
    if arch not in _SYSCALLS:
        raise OSError(f"NUMA placement: no syscall table for {arch}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(_SYSCALLS[arch][name]), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def pages_nodes(addr: int, nbytes: int, count: int = _VERIFY_PAGES) -> list[int]:
    """The node of up to ``count`` pages spread over [addr, addr + nbytes) (move_pages
    with nodes=NULL only reports; negative values are -errno, e.g. -14 never touched)."""
    page = mmap.PAGESIZE
    n_pages = max(1, nbytes // page)
    step = max(1, n_pages // count)
    idx = list(range(0, n_pages, step))[:count]
    pages = (ctypes.c_void_p * len(idx))(*[addr + i * page for i in idx])
    status = (ctypes.c_int * len(idx))()
    _syscall("move_pages", ctypes.c_int(0), ctypes.c_ulong(len(idx)), pages, None, status,
             ctypes.c_int(0))
    return list(status)


@functools.cache
def placement_error(node: int = 0) -> str | None:
    """Why host memory cannot be placed on ``node`` here (None: it can). Containers often
    forbid mbind / move_pages (Docker's seccomp profile allows them only with
    CAP_SYS_NICE): then NUMA cases skip with this reason instead of failing."""
    try:
        NodeBuffer(mmap.PAGESIZE, node).close()
    except (OSError, ValueError) as exc:
        return f"NUMA placement not possible here ({exc})"
    return None


class NodeBuffer:
    """``nbytes`` of host memory bound to NUMA node ``node``, as a uint8 tensor ``.tensor``;
    ``pin=True`` registers it with CUDA for DMA. ``close()`` (or the with-block) unpins it
    and drops the buffer's own references: the mapping is unmapped when the last view of
    ``.tensor`` dies (``released`` says whether it has been), never under a live view."""

    def __init__(self, nbytes: int, node: int, *, pin: bool = False,
                 topo: Topology | None = None):
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
            raise ValueError(f"nbytes must be an int >= 1, got {nbytes!r}")
        topo = topo or topology()
        if isinstance(node, bool) or not isinstance(node, int) or (
                node not in topo.nodes_with_memory):
            raise ValueError(f"node must be a NUMA node with memory here "
                             f"{list(topo.nodes_with_memory)}, got {node!r}")
        self.nbytes, self.node, self.pinned = nbytes, node, False
        self._size = size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._released = weakref.ref(self._map)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.address = ctypes.addressof(anchor)
        del anchor  # an exported buffer would keep the mapping from ever being unmapped
        try:
            mask = (ctypes.c_ulong * 16)()  # 1024 nodes
            mask[node // 64] = 1 << (node % 64)
            _syscall("mbind", ctypes.c_void_p(self.address), ctypes.c_ulong(size),
                     ctypes.c_int(MPOL_BIND), mask, ctypes.c_ulong(1024 + 1),
                     ctypes.c_uint(MPOL_MF_STRICT | MPOL_MF_MOVE))
            ctypes.memset(self.address, 0, size)  # first touch: pages come from `node`
            found = set(pages_nodes(self.address, size))
            if found != {node}:
                raise OSError(f"NUMA placement: asked for node {node}, pages are on {found}")
            self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]
            if pin:
                self._register()
        except BaseException:
            self.close()
            raise

    def _register(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("pin=True needs a CUDA GPU (cudaHostRegister)")
        err = torch.cuda.cudart().cudaHostRegister(self.address, self._size, 0)  # whole pages
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {self._size} B failed: error {err}")
        self.pinned = True

    @property
    def closed(self) -> bool:
        return self._map is None

    @property
    def released(self) -> bool:
        """True once the mapping is gone (closed and no view of .tensor left)."""
        return self._released() is None

    def nodes(self) -> set[int]:
        return set(pages_nodes(self.address, self.nbytes))

    def close(self) -> None:
        if self._map is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.address)
            self.pinned = False
        self.__dict__.pop("tensor", None)
        self._map = None  # torch.frombuffer's views hold the mapping until they die

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
