"""One GPU per pytest-xdist worker.

The controller lists the GPUs (CUDA_VISIBLE_DEVICES if set, else all torch sees) and
passes the list to the workers through the environment they inherit. Each worker sets
its own CUDA_VISIBLE_DEVICES to one entry before anything can initialise CUDA: xdist
sets PYTEST_XDIST_WORKER before the worker's config exists, and the plugin pins in
pytest_load_initial_conftests, ahead of every conftest.py and test module.

More workers than GPUs: a usage error, because two workers timing kernels on one GPU
measure each other. --kvperf-share-gpus allows it (round-robin); speed numbers are
then informational only, never compared or stored.

At the end each worker reports what it ran on (``worker_gpu_record``: its
CUDA_VISIBLE_DEVICES and the UUID of the device torch called cuda:0) through xdist's
workeroutput; the controller lists them in the results JSON (``workers``) and the summary.
"""

from __future__ import annotations

import os
import sys

GPU_LIST_ENV = "KVPERF_WORKER_GPUS"
SHARED_ENV = "KVPERF_GPU_SHARED"
WORKER_OUTPUT = "kvperf_gpu"  # key of the worker's record in xdist's workeroutput


def visible_gpus() -> list[str]:
    """The controller's GPUs as CUDA_VISIBLE_DEVICES entries (indices or UUIDs)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [entry.strip() for entry in env.split(",") if entry.strip()]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


class GpuSharingError(Exception):
    pass


def plan_for_workers(workers: int, gpus: list[str], allow_sharing: bool) -> dict[str, str]:
    """Environment for the workers: the GPU list, and whether GPUs are shared."""
    if not gpus:
        return {}  # CPU-only: nothing to pin, any number of workers is fine
    if workers > len(gpus) and not allow_sharing:
        raise GpuSharingError(
            f"-n {workers} starts {workers} workers but only {len(gpus)} GPUs are visible "
            f"({','.join(gpus)}): each worker needs a GPU of its own for honest timings. "
            f"Use -n {len(gpus)}, or --kvperf-share-gpus to share them round-robin "
            "(speed metrics are then not compared or stored)."
        )
    return {GPU_LIST_ENV: ",".join(gpus), SHARED_ENV: "1" if workers > len(gpus) else ""}


def pin_this_worker() -> str | None:
    """In an xdist worker: restrict CUDA to this worker's GPU. Returns it, or None."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    gpus = [g for g in os.environ.get(GPU_LIST_ENV, "").split(",") if g]
    if not worker or not gpus:
        return None
    index = int(worker.removeprefix("gw"))
    gpu = gpus[index % len(gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


def gpu_shared() -> bool:
    return bool(os.environ.get(SHARED_ENV))


def worker_gpu_record() -> dict:
    """What this process ran on: CUDA_VISIBLE_DEVICES and torch's cuda:0 (UUID, name), read
    only where torch is already imported (a worker that never imported it ran no GPU work)."""
    rec = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "gpu_uuid": None, "gpu_name": None, "shared": gpu_shared()}
    torch = sys.modules.get("torch")
    if torch is None:
        return rec
    try:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            uuid = str(getattr(props, "uuid", "")) or None
            rec["gpu_uuid"] = uuid if uuid is None or uuid.startswith("GPU-") else f"GPU-{uuid}"
            rec["gpu_name"] = props.name
    except Exception as exc:  # a broken CUDA state must not fail the worker's finish
        rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


def describe_workers(workers: dict[str, dict]) -> str:
    """'gw0 -> 0 (GPU-1a2b...), gw1 -> 1 (GPU-3c4d...)' for the summary."""
    def one(worker: str, rec: dict) -> str:
        where = rec.get("cuda_visible_devices")
        text = f"{worker} -> {where if where is not None else 'all GPUs'}"
        if rec.get("gpu_uuid"):
            text += f" ({rec['gpu_uuid']})"
        return text + (" shared" if rec.get("shared") else "")

    return ", ".join(one(w, workers[w]) for w in sorted(workers, key=_worker_order))


def _worker_order(worker: str):
    tail = worker.removeprefix("gw")
    return (0, int(tail)) if tail.isdigit() else (1, worker)
