"""Measured peak rates of the GPU, the denominators of "fraction of peak".

Measured (not taken from a datasheet), because what matters is what this board reaches:
* copy_gbps: device-to-device ``copy_`` of >= 1 GiB buffers, bytes read + written per
  second (decimal GB/s), the bound for a memory-bound kernel;
* bf16_tflops: an 8192^3 bf16 matmul (2 n^3 flops) through torch (cuBLAS).

Measured once per process and GPU model, and cached as JSON keyed by the GPU model name
(default ``$XDG_CACHE_HOME/pytest-kvperf/peaks.json``, else
``~/.cache/pytest-kvperf/peaks.json``) so later sessions reuse them; ``refresh=True``
measures again. On a CPU-only machine there is no peak to measure: ``get_peaks`` returns
None and derived fractions stay None.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import jsonfile
from .derived import gbps, tflops
from .timing import measure

COPY_BYTES = 1 << 30  # per buffer: far beyond L2, so HBM is what is measured
MATMUL_N = 8192
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class Peaks:
    copy_gbps: float
    bf16_tflops: float
    gpu_name: str
    measured_at: str  # ISO 8601, UTC
    copy_bytes: int = COPY_BYTES
    matmul_n: int = MATMUL_N
    torch_version: str = ""


_MEMO: dict[str, Peaks] = {}  # GPU model name -> peaks measured or loaded in this process


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pytest-kvperf" / "peaks.json"


def get_peaks(device: Any = None, *, cache_path: str | os.PathLike | None = None,
              refresh: bool = False) -> Peaks | None:
    """Peaks of the GPU ``device`` (None: the current CUDA device); None on a CPU."""
    gpu = _resolve_gpu(device)
    if gpu is None:
        return None
    torch, index, name = gpu
    if not refresh and name in _MEMO:
        return _MEMO[name]
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    peaks = None if refresh else load_cached(path, name)
    if peaks is None:
        peaks = _measure(torch, index, name)
        try:
            store(path, peaks)
        except OSError as exc:  # a read-only home must not fail the test session
            warnings.warn(f"pytest-kvperf: could not cache peaks in {path}: {exc}",
                          stacklevel=2)
    _MEMO[name] = peaks
    return peaks


def load_cached(path: str | os.PathLike, gpu_name: str) -> Peaks | None:
    """The cached entry for this GPU model, or None (missing, unreadable or malformed)."""
    entry = _read(Path(path)).get("gpus", {}).get(gpu_name)
    if not isinstance(entry, dict):
        return None
    known = {f.name for f in fields(Peaks)}
    try:
        peaks = Peaks(**{k: v for k, v in entry.items() if k in known})
    except TypeError:  # a required field is missing
        return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             and v > 0 for v in (peaks.copy_gbps, peaks.bf16_tflops))
    return peaks if ok and peaks.gpu_name == gpu_name else None


def store(path: str | os.PathLike, peaks: Peaks) -> None:
    """Add/replace this GPU's entry, keeping the others (read again under the file's lock)."""
    with jsonfile.locked(path):
        data = _read(Path(path))
        gpus = data.get("gpus") if isinstance(data.get("gpus"), dict) else {}
        gpus[peaks.gpu_name] = asdict(peaks)
        jsonfile.replace(path, {"format": _CACHE_FORMAT, "gpus": gpus})


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == _CACHE_FORMAT else {}


def _resolve_gpu(device: Any):
    """(torch, device index, GPU model name), or None when there is no CUDA GPU to use."""
    if device is not None and str(device) == "cpu":
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        raise ValueError(f"device must be None, 'cpu' or a CUDA device, got {device!r}")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    return torch, index, torch.cuda.get_device_properties(index).name


def _measure(torch, index: int, name: str) -> Peaks:
    copy_gbps, copy_bytes = measure_copy_gbps(torch, index)
    return Peaks(
        copy_gbps=copy_gbps,
        bf16_tflops=measure_bf16_tflops(torch, index),
        gpu_name=name,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        copy_bytes=copy_bytes,
        matmul_n=MATMUL_N,
        torch_version=torch.__version__,
    )


def measure_copy_gbps(torch, index: int, nbytes: int = COPY_BYTES) -> tuple[float, int]:
    """(GB/s of dst.copy_(src), bytes per buffer); halves the size if memory is short."""
    dev = f"cuda:{index}"
    gen = torch.Generator(device=dev).manual_seed(0)
    size = nbytes
    while True:
        try:
            src = torch.rand(size // 4, dtype=torch.float32, device=dev, generator=gen)
            dst = torch.empty_like(src)
            break
        except torch.cuda.OutOfMemoryError:
            if size <= nbytes // 8:
                raise
            size //= 2
    if size < nbytes:
        warnings.warn(f"pytest-kvperf: copy peak measured with {size >> 20} MiB buffers "
                      f"(not enough free memory for {nbytes >> 20} MiB)", stacklevel=2)
    t = measure(dst.copy_, args_sets=[(src,)], device=dev, warmup=0.1, use_cuda_graph=False,
                min_rounds=10, max_time_s=2.0)
    return gbps(2 * size, t.median_us), size


def measure_bf16_tflops(torch, index: int, n: int = MATMUL_N) -> float:
    dev = f"cuda:{index}"
    gen = torch.Generator(device=dev).manual_seed(0)
    # Random operands: an all-zero matmul draws less power and may clock higher.
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev, generator=gen)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev, generator=gen)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=dev)
    t = measure(lambda: torch.matmul(a, b, out=c), device=dev, warmup=0.2,
                use_cuda_graph=False, min_rounds=10, max_time_s=2.0)
    return tflops(2.0 * n**3, t.median_us)
