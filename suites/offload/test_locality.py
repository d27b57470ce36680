"""KV slabs copied to HBM from each kind of memory (the lab's kv_locality_microbench,
without its flaws): HBM, pageable, pinned on the GPU's NUMA node and on another node, and
NVLink-C2C where the GPU is Grace-coupled. Real placement (mbind, checked page by page),
the node recorded, every copy checked bit for bit against a destination that differed at
every byte before; each rate is a fraction of the named peak of its transfer.

On the CPU: the topology parsing (recorded sysfs trees and this machine's), placement on
this machine's node, and the copy checks with host tensors; the HBM copies skip."""

from __future__ import annotations

import gc
import mmap

import pytest
import torch

from kvperf_kernels.offload import numa
from kvperf_kernels.offload.transfer import (
    Host,
    check_copied,
    destination,
    make_slab,
    skip_reason,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GPU = pytest.mark.gpu
CPU_SIZES = [4 * KiB, 64 * KiB]
GPU_SIZES = [4 * KiB, 32 * KiB, 256 * KiB, 2 * MiB, 16 * MiB, 128 * MiB, 1 * GiB]
LINK_GOAL_BYTES = 2 * MiB  # the goal: pinned H2D >= 0.9 of the link peak from 2 MB


def size_id(n: int) -> str:
    return f"{n // GiB}G" if n >= GiB else f"{n // MiB}M" if n >= MiB else f"{n // KiB}K"


def two_node_tree(tmp_path, *, gpu_node="1", speed="32.0 GT/s PCIe", width="16"):
    """A recorded sysfs: two sockets of 4 CPUs, the GPU at 0000:3b:00.0 on node 1."""
    nodes = tmp_path / "node"
    for n, cpus in ((0, "0-3"), (1, "4-7")):
        (nodes / f"node{n}").mkdir(parents=True)
        (nodes / f"node{n}" / "cpulist").write_text(cpus + "\n")
    for name in ("online", "has_memory", "has_cpu"):
        (nodes / name).write_text("0-1\n")
    gpu = tmp_path / "pci" / "0000:3b:00.0"
    gpu.mkdir(parents=True)
    (gpu / "numa_node").write_text(gpu_node + "\n")
    (gpu / "current_link_speed").write_text(speed + "\n")
    (gpu / "current_link_width").write_text(width + "\n")
    return nodes, tmp_path / "pci"


# ------------------------------------------------------------------ topology (CPU)


@pytest.mark.parametrize("text, nodes", [("0", [0]), ("0-3,8,10-11\n", [0, 1, 2, 3, 8, 10, 11]),
                                         ("", [])])
def test_sysfs_lists_parse(text, nodes):
    assert numa.parse_list(text) == nodes


def test_recorded_two_socket_tree(tmp_path):
    nodes, pci = two_node_tree(tmp_path)
    topo = numa.topology(nodes)
    assert topo.nodes_with_memory == (0, 1) and topo.cpus == {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}
    assert numa.gpu_numa_node("0000:3B:00.0", pci) == 1
    assert topo.remote_of(1) == 0 and topo.remote_of(0) == 1
    assert numa.host_link("0000:3b:00.0", "NVIDIA H200", pci, machine="x86_64") == (
        "PCIe 32.0 GT/s x16")
    host = Host(topo, 1, "NVIDIA H200", "PCIe 32.0 GT/s x16", has_cuda=True)
    assert host.local_node == 1
    assert skip_reason("pinned_remote", host) is None
    assert skip_reason("c2c_pinned", host) == (
        "needs a Grace-coupled GPU (NVLink-C2C); found host link PCIe 32.0 GT/s x16")


def test_recorded_trees_without_numa_facts(tmp_path):
    nodes, pci = two_node_tree(tmp_path, gpu_node="-1")
    assert numa.gpu_numa_node("0000:3b:00.0", pci) is None  # a VM's "-1": unknown
    assert numa.gpu_numa_node("0000:99:00.0", pci) is None  # no such device
    assert numa.host_link("0000:99:00.0", "NVIDIA H200", pci, machine="x86_64") == (
        "unknown host link (no PCIe link files for 0000:99:00.0)")
    # a Grace-coupled GPU reaches host memory over NVLink-C2C whatever PCIe says
    assert numa.host_link("0000:3b:00.0", "NVIDIA GH200 480GB", pci, machine="aarch64") == (
        "NVLink-C2C (Grace)")
    assert not numa.is_grace_coupled("NVIDIA GH200 480GB", machine="x86_64")
    one = numa.Topology((0,), (0,), {0: (0, 1)})
    host = Host(one, None, "NVIDIA H200", "PCIe", has_cuda=True)
    assert one.remote_of(0) is None and host.local_node == 0
    assert skip_reason("pinned_remote", host) == (
        "needs two NUMA nodes with memory (a remote one); found one: node [0]")
    with pytest.raises(ValueError, match="kind must be one of hbm, pageable"):
        skip_reason("nvme", host)


def test_this_machine(host, kvperf):
    topo = host.topo
    assert topo.nodes_with_memory and host.local_node in topo.nodes_with_memory
    assert (topo.remote_of(host.local_node) is None) == (len(topo.nodes_with_memory) == 1)
    kvperf.info("numa_nodes_with_memory", str(list(topo.nodes_with_memory)))
    kvperf.info("gpu_numa_node", str(host.gpu_node))
    kvperf.info("host_link", host.link)


# ------------------------------------------------------------------ placement (CPU)


def test_placement_is_real_and_released(host):
    node = host.local_node
    buf = numa.NodeBuffer(3 * mmap.PAGESIZE + 100, node)
    assert buf.nodes() == {node} and buf.tensor.numel() == 3 * mmap.PAGESIZE + 100
    view = buf.tensor[:8]
    buf.close()
    gc.collect()
    assert buf.closed and not buf.released  # a live view keeps the mapping, never dangles
    view.fill_(7)
    assert int(view.sum()) == 56
    del view
    gc.collect()
    assert buf.released


def test_placement_probe(host):
    """Where mbind / move_pages are forbidden (a container's seccomp) the NUMA cases skip
    with the probe's reason; here placement works, and a node that is not there says so."""
    assert numa.placement_error(host.local_node) is None
    assert "node must be a NUMA node with memory" in numa.placement_error(99)


def test_placement_check_can_fail():
    """Negative control: pages of a mapping nobody touched are on no node (-EFAULT /
    -ENOENT), so a buffer whose pages are not where asked is caught."""
    m = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    import ctypes

    anchor = ctypes.c_char.from_buffer(m)
    try:
        status = numa.pages_nodes(ctypes.addressof(anchor), 4 * mmap.PAGESIZE)
        assert all(s < 0 for s in status), status
    finally:
        del anchor
        m.close()


@pytest.mark.parametrize("nbytes, node, words", [
    (0, 0, "nbytes must be an int >= 1"), (4096, 64, "node must be a NUMA node with memory"),
    (4096, -1, "node must be a NUMA node"), (True, 0, "nbytes")])
def test_bad_placement_arguments(nbytes, node, words):
    with pytest.raises(ValueError, match=words):
        numa.NodeBuffer(nbytes, node)


# ------------------------------------------------------------------ copies


@pytest.mark.parametrize("nbytes", CPU_SIZES, ids=size_id)
@pytest.mark.parametrize("kind", ["pageable", "pinned_local"])
def test_host_copy_checks_on_the_cpu(kind, nbytes, host):
    """The data checks on host tensors (on the CPU "pinned_local" is placed, not pinned)."""
    slab = make_slab(kind, nbytes, host, device="cpu", seed=nbytes)
    try:
        assert slab.node == (host.local_node if kind == "pinned_local" else None)
        dst = destination(slab)
        assert bool((dst != slab.ref).all())  # the negative control: every byte differs
        with pytest.raises(AssertionError, match=f"{nbytes} of {nbytes} bytes differ"):
            check_copied(slab, dst)
        dst.copy_(slab.src)
        check_copied(slab, dst)
        dst[nbytes // 2] ^= 1  # one flipped bit is caught
        with pytest.raises(AssertionError, match="1 of"):
            check_copied(slab, dst)
    finally:
        buffers = list(slab._buffers)
        slab.close()
    gc.collect()
    assert all(b.released for b in buffers)  # placed memory is unmapped once closed


@GPU
@pytest.mark.parametrize("nbytes", GPU_SIZES, ids=size_id)
@pytest.mark.parametrize("kind", ["hbm", "pageable", "pinned_local", "pinned_remote",
                                  "c2c_pinned"])
def test_copy_to_hbm(kind, nbytes, host, kv_bench, kvperf):
    why = skip_reason(kind, host)
    if why:
        pytest.skip(why)
    slab = make_slab(kind, nbytes, host, device="cuda", seed=nbytes)
    try:
        dst = destination(slab)
        blocking = kind in ("hbm", "pageable")  # pageable: the copy is synchronous anyway
        res = kv_bench(lambda: dst.copy_(slab.src, non_blocking=not blocking),
                       bytes_moved=slab.bytes_moved, peak=slab.peak, max_time_s=0.5)
        torch.cuda.synchronize()
        check_copied(slab, dst)
        kvperf.info("numa_node", str(slab.node))
        kvperf.info("host_link", host.link)
        frac, gbps = (res.frac_of_peak, res.gbps) if res.timing is not None else (None, None)
        del res  # holds dst, not the source
    finally:
        buffers = list(slab._buffers)
        slab.close()
    gc.collect()
    assert all(b.released and not b.pinned for b in buffers)  # unpinned and unmapped
    if gbps is not None and kind == "pinned_local" and nbytes >= LINK_GOAL_BYTES:
        assert frac is not None
        assert frac >= 0.9, (f"pinned H2D of {size_id(nbytes)}: {gbps:.1f} GB/s is "
                             f"{frac:.2f} of the h2d_pinned peak (goal 0.9)")
