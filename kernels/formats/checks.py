"""The input contract shared by the quantisers' launchers: dtypes, devices, row views.

Checked on the host, from shapes, strides and dtypes only (no device sync).
"""

from __future__ import annotations

import torch

from kvperf_kernels.device import interpreted

QUANT_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEQUANT_OUTPUT_DTYPES = QUANT_INPUT_DTYPES
MAX_ROW_ELEMENTS = 16384  # per-row kernels keep a whole row in one program


def check_float_input(x, what: str) -> None:
    """A quantiser's input: a bf16/fp16/fp32 tensor where the kernels run (check_device)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in QUANT_INPUT_DTYPES:
        raise TypeError(
            f"{what}: unsupported dtype {x.dtype}; expected one of bfloat16, float16, float32"
        )
    check_device(x, what)


def check_out_dtype(dtype, what: str) -> None:
    if dtype not in DEQUANT_OUTPUT_DTYPES:
        raise TypeError(
            f"{what}: unsupported output dtype {dtype}; expected one of bfloat16, float16, "
            "float32"
        )


def check_device(x: torch.Tensor, what: str) -> None:
    """Triton kernels need CUDA tensors, except in the CPU interpreter."""
    if x.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"{what}: tensor is on {x.device}, the Triton kernel needs a CUDA tensor "
            "(CPU tensors only run with TRITON_INTERPRET=1)"
        )


def as_rows(x: torch.Tensor, what: str, *, block: int | None = None) -> tuple[torch.Tensor, int]:
    """View x as (rows, D) without copying; returns the view and its row stride.

    The last dim must be contiguous and the leading dims collapsible into one row
    index with a single stride (any contiguous tensor, or a slice of its last dim).
    Anything else is refused instead of silently copied: a hidden copy would double
    the memory traffic of a bandwidth-bound kernel.
    """
    if x.dim() == 0:
        raise ValueError(f"{what}: expected at least 1 dimension, got a 0-dim tensor")
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"{what}: last dim is 0, nothing to quantise along it")
    if block is not None and d % block != 0:
        raise ValueError(
            f"{what}: last dim {d} is not a multiple of the block size {block}"
        )
    if x.stride(-1) != 1 and d > 1:
        raise ValueError(
            f"{what}: last dim must be contiguous (stride 1), got stride {x.stride(-1)}; "
            "call .contiguous() first"
        )
    try:
        rows = x.view(-1, d)
    except RuntimeError:
        raise ValueError(
            f"{what}: leading dims of shape {tuple(x.shape)} with strides {x.stride()} cannot "
            "be flattened into rows without a copy; call .contiguous() first"
        ) from None
    row_stride = rows.stride(0) if rows.shape[0] > 1 else d
    return rows, row_stride


def use_hw_cast(device: torch.device, requested: bool | None = None) -> bool:
    """The caller's hw_cast choice, or by default the hardware FP8 conversion where there is
    one (CUDA, compute capability >= 8.9)."""
    if requested is not None:
        return requested
    if interpreted() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)
