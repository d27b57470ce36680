"""Row tiling and group reductions shared by the quantisers (FP8, MXFP8, NVFP4).

A quantiser sees its input as rows of D elements split into groups (a token, a block of
32 or 16, a 1x128 tile); these pick the program's tile and read its group's elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.formats.checks import MAX_ROW_ELEMENTS

_TILE_BYTES = 16384  # input bytes per program: enough loads in flight per SM to stream HBM


def check_group(group: int, what: str) -> None:
    """A scale group one program holds in registers (``what`` names the argument)."""
    if group > MAX_ROW_ELEMENTS:
        raise ValueError(
            f"{what} = {group} exceeds {MAX_ROW_ELEMENTS}, the largest group one program "
            "holds in registers"
        )


def tile_config(n_groups: int, group: int, elem_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): one program streams about _TILE_BYTES of input."""
    block_d = triton.next_power_of_2(group)
    block_m = max(1, min(triton.next_power_of_2(max(n_groups, 1)),
                         (_TILE_BYTES // elem_bytes) // block_d))
    tile = block_m * block_d
    num_warps = 4 if tile <= 4096 else (8 if tile <= 8192 else 16)
    return block_m, block_d, num_warps


@triton.jit
def amax_propagate_nan(x, axis: tl.constexpr):
    """max |x| along axis, NaN if any element is NaN (fp32 in, fp32 out).

    For non-negative floats the int32 bit patterns order like the values and every NaN
    pattern of |x| lies above +Inf (0x7F800000), so an integer max is a NaN-propagating
    float max: one plain reduction on the GPU and in the interpreter alike.
    """
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(bits, axis=axis).to(tl.float32, bitcast=True)


@triton.jit
def group_offsets(g, x_row_stride, GROUP: tl.constexpr, GROUPS_PER_ROW: tl.constexpr):
    # group g = (row g // GROUPS_PER_ROW, block g % GROUPS_PER_ROW) of the strided input;
    # int64: row * stride passes 2^31 elements for large caches
    g64 = g.to(tl.int64)
    return (g64 // GROUPS_PER_ROW) * x_row_stride + (g64 % GROUPS_PER_ROW) * GROUP


@triton.jit
def _amax_partial_kernel(
    x_ptr, partial_ptr, n_rows, x_row_stride,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per-program amax of a [BLOCK_M, GROUP] tile (first pass of per-tensor scaling)."""
    pid = tl.program_id(0)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (r < n_rows)[:, None] & (cols < GROUP)[None, :]
    offs = r.to(tl.int64)[:, None] * x_row_stride + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = amax_propagate_nan(x, None)  # None: over the whole tile
    tl.store(partial_ptr + pid, amax)


def tensor_amax_ref(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor as float32 (1,), NaN-propagating; 0 for an empty
    tensor (as ``tensor_amax``)."""
    if x.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=x.device)
    return x.float().abs().amax().reshape(1)


def tensor_amax(rows: torch.Tensor, row_stride: int) -> torch.Tensor:
    """max |x| over a [rows, D] view as float32 (1,), NaN if any element is NaN.

    Per-program partials, then their max in torch (deterministic, NaN-propagating):
    one read of x, no temporary copy of it, no host sync.
    """
    n_rows, d = rows.shape
    if n_rows == 0:
        return torch.zeros(1, dtype=torch.float32, device=rows.device)
    block_m, block_d, num_warps = tile_config(n_rows, d, rows.element_size())
    grid = (triton.cdiv(n_rows, block_m),)
    partial = torch.empty(grid[0], dtype=torch.float32, device=rows.device)
    _amax_partial_kernel[grid](rows, partial, n_rows, row_stride, GROUP=d,
                               BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    return partial.amax().reshape(1)
