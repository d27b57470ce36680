"""Where the kernels run: the CUDA GPU if there is one, else the CPU (Triton interpreter)."""

import functools
import os

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (its properties, read once); 1 elsewhere
    (the interpreter: a grid sized by SMs is then one program per multiple)."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else
                          torch.cuda.current_device())


def interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (no bit-exact fp8 rounding there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def run_where_kernels_run(fn, *args, **kwargs):
    """fn(*args) where the Triton kernels run, results back on the inputs' device.

    The Triton kernels need CUDA tensors except in the CPU interpreter; CPU tensors on a
    GPU machine visit the GPU, so callers on either device get the same (bit-exact) bytes.
    """
    home = next(a.device for a in args if isinstance(a, torch.Tensor))
    visit = home.type == "cpu" and not interpreted() and torch.cuda.is_available()
    if visit:
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = fn(*args, **kwargs)
    if not visit:
        return out
    if isinstance(out, torch.Tensor):
        return out.to(home)
    return tuple(t.to(home) for t in out)
