"""Exact bytes of a KV cache in each storage format: values + scales + padding.

The cache holds, for every layer, one K and one V tensor of shape
``[batch, context, kv_heads, head_dim]``; each is quantised as one tensor (one call of the
format's quantiser), so a per-tensor scale exists once per (layer, K|V). Scales follow the
quantisers in this package:

=================  ============  ==================================================  ======
format             value bytes   scales                                               bits/el
=================  ============  ==================================================  ======
bf16, fp16         2             none                                                 16
fp8_per_tensor     1             one fp32 per tensor                                  ~8
fp8_per_token      1             one fp32 per (token, head) row of head_dim           8+32/D
fp8_per_block128   1             one fp32 per 128 elements of head_dim                8.25
mxfp8              1             one E8M0 byte per 32 elements (OCP MX)               8.25
nvfp4              0.5           one E4M3 byte per 16 elements + one fp32 per tensor  4.5
=================  ============  ==================================================  ======

Padding: our quantisers store scales densely (``compact`` layout, no padding). TE's MXFP8 and
NVFP4 tensors keep their rowwise scales padded to [round_up(rows, 128), round_up(D/block, 4)]
(the cuBLAS block-scaling layout; ``NVFP4Quantizer.get_scale_shape``); ``scale_layout="te"``
counts that padding so the difference is explicit, never hidden in the scale bytes.

The arithmetic is pure Python integers (exact for any size); ``allocate_kv_cache`` makes the
real tensors so the formula can be checked against allocations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

GIB = 1 << 30

# name -> (value bits, scale group along head_dim (0: one per tensor), scale bytes,
#          per-tensor global bytes, block size for TE padding (0: not a TE block format))
_FORMATS: dict[str, tuple[int, int, int, int, int]] = {
    "bf16": (16, 0, 0, 0, 0),
    "fp16": (16, 0, 0, 0, 0),
    "fp8_per_tensor": (8, 0, 4, 0, 0),  # group 0: one fp32 scale for the whole tensor
    "fp8_per_token": (8, -1, 4, 0, 0),  # -1: the whole head_dim is one group
    "fp8_per_block128": (8, 128, 4, 0, 0),
    "mxfp8": (8, 32, 1, 0, 32),
    "nvfp4": (4, 16, 1, 4, 16),
}
FORMATS = tuple(_FORMATS)
SCALE_LAYOUTS = ("compact", "te")


@dataclass(frozen=True)
class TensorBytes:
    """Bytes of one quantised tensor (or of a whole cache: the sum of its tensors)."""

    fmt: str
    elements: int
    values: int
    scales: int
    padding: int

    @property
    def total(self) -> int:
        return self.values + self.scales + self.padding

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.total / self.elements

    def __add__(self, other: TensorBytes) -> TensorBytes:
        if other.fmt != self.fmt:
            raise ValueError(f"cannot add {self.fmt} and {other.fmt} byte counts")
        return TensorBytes(self.fmt, self.elements + other.elements, self.values + other.values,
                           self.scales + other.scales, self.padding + other.padding)

    def __mul__(self, n: int) -> TensorBytes:
        return TensorBytes(self.fmt, self.elements * n, self.values * n, self.scales * n,
                           self.padding * n)

    __rmul__ = __mul__


def _check_format(fmt: str, scale_layout: str) -> None:
    if fmt not in _FORMATS:
        raise ValueError(f"unknown KV format {fmt!r}; known: {', '.join(FORMATS)}")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")


def check_positive(**dims: int) -> None:
    """ValueError naming the first argument that is not a positive int (bools rejected)."""
    for name, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tensor_bytes(shape: tuple[int, ...], fmt: str, *, scale_layout: str = "compact") -> TensorBytes:
    """Bytes of one tensor of ``shape`` (last dim = the scaled dim) stored in ``fmt``."""
    _check_format(fmt, scale_layout)
    if len(shape) < 1:
        raise ValueError("shape must have at least one dimension")
    *lead, _ = shape
    check_positive(**{f"shape[{len(lead)}]": shape[-1]})
    for i, s in enumerate(lead):  # an empty batch (a 0 leading dim) stores no values
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"shape[{i}] must be an int >= 0, got {s!r}")
    value_bits, group, scale_bytes, global_bytes, te_block = _FORMATS[fmt]
    d = shape[-1]
    rows = math.prod(shape[:-1])
    elements = rows * d
    if group > 0 and d % group:
        raise ValueError(f"{fmt}: head_dim {d} is not a multiple of its {group}-element block")
    if value_bits == 4 and d % 2:
        raise ValueError(f"{fmt}: head_dim {d} is odd; two FP4 values share a byte")
    values = elements * value_bits // 8
    if group == 0:  # per-tensor scale (fp8_per_tensor) or none (bf16/fp16)
        scales = scale_bytes
    else:
        per_row = 1 if group == -1 else d // group
        scales = rows * per_row * scale_bytes
    scales += global_bytes
    padding = 0
    if scale_layout == "te" and te_block:
        padded = _round_up(rows, 128) * _round_up(d // te_block, 4) * scale_bytes
        padding = padded - rows * (d // te_block) * scale_bytes
    return TensorBytes(fmt, elements, values, scales, padding)


def kv_cache_bytes(batch: int, layers: int, kv_heads: int, head_dim: int, context: int,
                   fmt: str, *, scale_layout: str = "compact") -> TensorBytes:
    """Bytes of the whole cache: K and V of every layer, [batch, context, kv_heads, head_dim]."""
    check_positive(batch=batch, layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                    context=context)
    one = tensor_bytes((batch, context, kv_heads, head_dim), fmt, scale_layout=scale_layout)
    return one * (2 * layers)


def max_batch(budget_bytes: int, layers: int, kv_heads: int, head_dim: int, context: int,
              fmt: str, *, scale_layout: str = "compact") -> int:
    """Largest batch whose cache fits in ``budget_bytes`` (0 if not even one sequence fits).

    Exact search over the integer byte count (scales per tensor and TE padding make it not
    quite linear in the batch).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be a non-negative int, got {budget_bytes!r}")

    def fits(b: int) -> bool:
        return kv_cache_bytes(b, layers, kv_heads, head_dim, context, fmt,
                              scale_layout=scale_layout).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# The lab's 70B-class example: batch 8, 32 layers, 32 KV heads, head_dim 128, 8K context.
LAB_70B = dict(batch=8, layers=32, kv_heads=32, head_dim=128, context=8192)
LAB_70B_VALUES_GIB = {"fp16": 32, "fp8": 16, "fp4": 8}  # the lab's values-only table


@dataclass(frozen=True)
class TableRow:
    fmt: str
    values_gib: Fraction
    scales_bytes: int
    padding_bytes: int
    total_bytes: int
    bits_per_element: float
    vs_fp16: float  # total bytes relative to fp16


def memory_table(*, batch: int, layers: int, kv_heads: int, head_dim: int, context: int,
                 formats: tuple[str, ...] = FORMATS,
                 scale_layout: str = "compact") -> list[TableRow]:
    """One row per format: values in GiB (exact), scale and padding bytes, total, ratio."""
    fp16 = kv_cache_bytes(batch, layers, kv_heads, head_dim, context, "fp16").total
    rows = []
    for fmt in formats:
        b = kv_cache_bytes(batch, layers, kv_heads, head_dim, context, fmt,
                           scale_layout=scale_layout)
        rows.append(TableRow(fmt, Fraction(b.values, GIB), b.scales, b.padding, b.total,
                             b.bits_per_element, b.total / fp16))
    return rows


def format_table(rows: list[TableRow]) -> str:
    """The table as text (for logs and the issue note)."""
    lines = [f"{'format':<18}{'values GiB':>11}{'scales':>16}{'padding':>12}"
             f"{'total GiB':>12}{'bits/el':>9}{'vs fp16':>9}"]
    for r in rows:
        lines.append(
            f"{r.fmt:<18}{float(r.values_gib):>11.3f}{r.scales_bytes:>16,}{r.padding_bytes:>12,}"
            f"{r.total_bytes / GIB:>12.4f}{r.bits_per_element:>9.4f}{r.vs_fp16:>9.4f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The real tensors (torch imported lazily: the formula above needs no torch)
# --------------------------------------------------------------------------------------

def tensor_layout(shape: tuple[int, ...], fmt: str) -> dict[str, tuple[tuple[int, ...], object]]:
    """name -> (shape, torch dtype) of every tensor ``fmt`` stores for one tensor of ``shape``.

    Matches what the quantisers return (compact layout): fp8_quant's q/scale,
    mxfp8's (q, E8M0 scale), nvfp4's (packed, E4M3 block scale, fp32 global scale).
    """
    import torch

    tensor_bytes(shape, fmt)  # validates
    lead, d = tuple(shape[:-1]), shape[-1]
    full = tuple(shape)
    e4m3 = torch.float8_e4m3fn
    layouts = {
        "bf16": {"values": (full, torch.bfloat16)},
        "fp16": {"values": (full, torch.float16)},
        "fp8_per_tensor": {"q": (full, e4m3), "scale": ((1,), torch.float32)},
        "fp8_per_token": {"q": (full, e4m3), "scale": (lead + (1,), torch.float32)},
        "fp8_per_block128": {"q": (full, e4m3), "scale": (lead + (d // 128,), torch.float32)},
        "mxfp8": {"q": (full, e4m3), "scale_e8m0": (lead + (d // 32,), torch.uint8)},
        "nvfp4": {"packed": (lead + (d // 2,), torch.uint8),
                  "block_scale": (lead + (d // 16,), e4m3),
                  "global_scale": ((1,), torch.float32)},
    }
    return layouts[fmt]


def allocate_kv_cache(batch: int, layers: int, kv_heads: int, head_dim: int, context: int,
                      fmt: str, *, device=None) -> list[dict[str, dict[str, object]]]:
    """Empty storage for the whole cache: ``[{"k": {...}, "v": {...}} per layer]``.

    Every tensor is allocated separately (as a serving engine's per-layer buffers are), so
    the allocation is exactly ``kv_cache_bytes(...)`` plus the allocator's rounding.
    """
    import torch

    check_positive(batch=batch, layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                    context=context)
    layout = tensor_layout((batch, context, kv_heads, head_dim), fmt)
    return [
        {kv: {name: torch.empty(shape, dtype=dtype, device=device)
              for name, (shape, dtype) in layout.items()} for kv in ("k", "v")}
        for _ in range(layers)
    ]


def stored_bytes(tensors) -> int:
    """Sum of numel * element_size over every tensor in a (nested) dict/list/tuple."""
    import torch

    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(stored_bytes(t) for t in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(stored_bytes(t) for t in tensors)
    raise TypeError(f"stored_bytes: expected tensors in dicts/lists/tuples, got {type(tensors)}")
