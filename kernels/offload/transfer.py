"""KV slabs in each kind of memory a KV offload reads from, and the checks every copy gets.

Source kinds (the lab's kv_locality_microbench, plus the Grace link):
* ``hbm``: device memory (HBM->HBM, the bound a GPU-resident cache gets);
* ``pageable``: ordinary host memory (the driver stages it through its own pinned buffer);
* ``pinned_local`` / ``pinned_remote``: host memory bound to the GPU's NUMA node / another
  node (numa.NodeBuffer: mbind + cudaHostRegister), the node recorded;
* ``c2c_pinned``: pinned host memory over NVLink-C2C, only on a Grace-coupled GPU.

``skip_reason`` says why a kind cannot run here (one NUMA node, no Grace, no GPU), in the
plugin's "needs X; found Y" words. Each slab's bytes are random from a seed, the copy's
destination starts as their complement (every byte differs: the negative control), and
``check_copied`` compares bit for bit, the source too (a copy must not write its source).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvperf_kernels.offload import numa

KINDS = ("hbm", "pageable", "pinned_local", "pinned_remote", "c2c_pinned")
PEAK = {"hbm": "device_copy", "pageable": "h2d_pageable", "pinned_local": "h2d_pinned",
        "pinned_remote": "h2d_pinned", "c2c_pinned": "h2d_pinned"}


@dataclass(frozen=True)
class Host:
    """What placement needs to know about this machine (numa.topology + the GPU's node)."""

    topo: numa.Topology
    gpu_node: int | None  # sysfs numa_node of the GPU (None: unknown)
    gpu_name: str
    link: str  # numa.host_link words
    has_cuda: bool

    @property
    def local_node(self) -> int:
        """The GPU's node, else the node of the CPU this process runs on, else the first."""
        if self.gpu_node is not None:
            return self.gpu_node
        cpu = _current_cpu()
        for node, cpus in self.topo.cpus.items():
            if cpu in cpus and node in self.topo.nodes_with_memory:
                return node
        return self.topo.nodes_with_memory[0]


def this_host(device: int = 0) -> Host:
    addr = numa.gpu_pci_address(device)
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else ""
    return Host(numa.topology(), numa.gpu_numa_node(addr), name, numa.host_link(addr, name),
                torch.cuda.is_available())


def _current_cpu() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[37])  # field 39: processor
    except (OSError, ValueError, IndexError):
        return None


def skip_reason(kind: str, host: Host) -> str | None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "c2c_pinned" and not numa.is_grace_coupled(host.gpu_name):
        return f"needs a Grace-coupled GPU (NVLink-C2C); found host link {host.link}"
    if kind == "pinned_remote" and host.topo.remote_of(host.local_node) is None:
        return ("needs two NUMA nodes with memory (a remote one); found one: node "
                f"{list(host.topo.nodes_with_memory)}")
    if not host.has_cuda:
        return "needs a CUDA GPU (host-to-HBM copies); found none"
    if kind == "pinned_remote":
        return numa.placement_error(host.topo.remote_of(host.local_node))
    if kind in ("pinned_local", "c2c_pinned"):
        return numa.placement_error(host.local_node)
    return None


@dataclass
class Slab:
    """A source of ``nbytes`` random bytes of one kind, its reference copy and its node."""

    kind: str
    src: torch.Tensor  # uint8 [nbytes]
    ref: torch.Tensor  # the same bytes where the destination lives
    node: int | None  # NUMA node of host memory (None: HBM or unplaced pageable)
    peak: str  # the named peak its copy is measured against (pytest_kvperf.named_peaks)
    bytes_moved: int  # bytes crossing the link (HBM->HBM: read + written)
    _buffers: list = field(default_factory=list)

    def close(self) -> None:
        for b in self._buffers:
            b.close()
        self._buffers.clear()
        self.src = self.ref = None


def make_slab(kind: str, nbytes: int, host: Host, *, device="cuda", seed: int = 0) -> Slab:
    """The source slab; raises RuntimeError with skip_reason where the kind cannot run."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes must be an int >= 1, got {nbytes!r}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    ref = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen)
    node, buffers = None, []
    if kind == "hbm":
        src = ref.clone()
    elif kind == "pageable":
        src = torch.empty(nbytes, dtype=torch.uint8)
        src.copy_(ref)
    else:
        why = skip_reason(kind, host) if device.type == "cuda" else None
        if why:
            raise RuntimeError(why)
        node = (host.topo.remote_of(host.local_node) if kind == "pinned_remote"
                else host.local_node)
        buf = numa.NodeBuffer(nbytes, node, pin=device.type == "cuda", topo=host.topo)
        buffers.append(buf)
        src = buf.tensor
        src.copy_(ref)
    return Slab(kind, src, ref, node, PEAK[kind], 2 * nbytes if kind == "hbm" else nbytes,
                buffers)


def destination(slab: Slab) -> torch.Tensor:
    """Where the copy lands: every byte the complement of the source's (negative control)."""
    dst = torch.bitwise_not(slab.ref)
    if bool((dst == slab.ref).any()):
        raise AssertionError("destination equals the source somewhere before the copy")
    return dst


def check_copied(slab: Slab, dst: torch.Tensor) -> None:
    """Bit for bit: the destination holds the source's bytes, and the source is unchanged."""
    if not torch.equal(dst, slab.ref):
        bad = int((dst != slab.ref).sum())
        raise AssertionError(f"{slab.kind}: {bad} of {dst.numel()} bytes differ after the copy")
    if not torch.equal(slab.src.to(slab.ref.device), slab.ref):
        raise AssertionError(f"{slab.kind}: the copy changed its source")


def require_pinned(t: torch.Tensor, name: str) -> None:
    """A host tensor an async copy reads must be pinned (else the copy is synchronous and
    staged, and timing it as async is the lab's flaw)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be host memory, got a tensor on {t.device}")
    if torch.cuda.is_available() and not t.is_pinned():
        raise ValueError(f"{name} must be pinned host memory (pin_memory() or a pinned "
                         "NodeBuffer): a pageable source makes the async copy synchronous")
