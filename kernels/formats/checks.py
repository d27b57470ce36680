"""The input contract shared by the launchers: dtypes, devices, row views, scalar arguments.

Checked on the host, from shapes, strides, dtypes and Python scalars only (no device sync).
Every error is a TypeError (wrong type or dtype) or ValueError (shape, layout, device, value)
whose message starts with the argument's name.
"""

from __future__ import annotations

import math

import torch

from kvperf_kernels.device import interpreted

FP32_MAX = float(torch.finfo(torch.float32).max)

QUANT_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEQUANT_OUTPUT_DTYPES = QUANT_INPUT_DTYPES
MAX_ROW_ELEMENTS = 16384  # per-row kernels keep a whole row in one program


def check_float_input(x, what: str) -> None:
    """A quantiser's input: a bf16/fp16/fp32 tensor where the kernels run (check_device)."""
    check_tensor(x, what, QUANT_INPUT_DTYPES)
    check_device(x, what)


def check_out_dtype(dtype, what: str) -> None:
    if not isinstance(dtype, torch.dtype) or dtype not in DEQUANT_OUTPUT_DTYPES:
        raise TypeError(
            f"{what}: unsupported output dtype {dtype}; expected one of bfloat16, float16, "
            "float32"
        )


def check_device(x: torch.Tensor, what: str) -> None:
    """Triton kernels need CUDA tensors, except in the CPU interpreter (CPU or CUDA ones)."""
    allowed = ("cpu", "cuda") if interpreted() else ("cuda",)
    if x.device.type not in allowed:
        raise ValueError(
            f"{what}: tensor is on {x.device}, the Triton kernel needs a CUDA tensor "
            "(CPU tensors only run with TRITON_INTERPRET=1)"
        )


def check_stored(*parts: tuple[torch.Tensor, str]) -> None:
    """The stored parts of a quantised tensor, (tensor, name) each: contiguous, where the
    kernels run, all on the first part's device."""
    first, first_what = parts[0]
    for t, what in parts:
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous, got shape {tuple(t.shape)} "
                             f"stride {t.stride()}")
        check_device(t, what)
        check_same_device(t, what, first, first_what)


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
    one (CUDA, compute capability >= 8.9). hw_cast=True where there is none is a ValueError
    (the kernel would not compile)."""
    check_flag(requested, "hw_cast")
    has_fp8 = (not interpreted() and device.type == "cuda"
               and torch.cuda.get_device_capability(device) >= (8, 9))
    if requested is None:
        return has_fp8
    if requested and not has_fp8 and not interpreted():
        raise ValueError(f"hw_cast=True needs an FP8 GPU (compute capability >= 8.9); "
                         f"the tensors are on {device}")
    return requested


# --------------------------------------------------------------------------------------
# Arguments of any launcher
# --------------------------------------------------------------------------------------

def check_tensor(x, what: str, dtypes=None, *, dim: int | None = None) -> None:
    """x is a torch.Tensor (TypeError), of one of ``dtypes`` (TypeError) and ``dim``
    dimensions (ValueError), when those are given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{what}: unsupported dtype {x.dtype}; expected {names}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{what}: expected {dim} dimensions, got shape {tuple(x.shape)}")


def check_same_device(x: torch.Tensor, what: str, ref: torch.Tensor, ref_what: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{what} is on {x.device}, {ref_what} on {ref.device}")


def check_flag(value, what: str) -> None:
    """None or a bool (a tri-state option such as hw_cast or checked)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{what} must be None, True or False, got {value!r}")


def check_int(value, what: str, minimum: int) -> int:
    """A Python int (not a bool) >= minimum, else ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def check_scale_value(value, what: str) -> float:
    """A Python scale (sm_scale, a per-tensor k/v scale): a finite positive number that
    float32 holds (the kernels take it as float32), else TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float64
        v = math.inf
    if not (math.isfinite(v) and 0 < v <= FP32_MAX):
        raise ValueError(f"{what} must be a finite positive number within float32's range, "
                         f"got {value!r}")
    return v
