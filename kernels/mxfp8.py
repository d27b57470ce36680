"""MXFP8 (OCP Microscaling, E4M3 elements): 32-element blocks with E8M0 power-of-two scales.

Rule (TE's MXFP8 cast, references and kernels bit for bit):

    amax = max |x| over 32 consecutive elements of the last dim (fp32, NaN-propagating)
    s    = amax * fp32(1/448)            TE multiplies by the rounded reciprocal
    e    = E8M0 code of the smallest power of two >= s   (ceil, saturating at 2^127:
           0x00 for s <= 2^-127 incl. amax 0, 0xFE for s > 2^127 or +Inf, 0xFF for NaN)
    q    = e4m3(clamp(x * 2^(127-e), -448, 448))   exact power-of-two scaling, then
           round to nearest even; the clamp is the saturation
    x_hat = float(q) * 2^(e-127)         (``dequantize_mxfp8``; 0xFF decodes to NaN)

Because 2^e >= amax/448, |x| * 2^-e <= 448 up to the reciprocal's rounding, so the
saturation only trims the last fp32 bit. A NaN in a block gives scale 0xFF and NaN for
every q of the block. One deliberate difference from TE: TE decodes code 0x00 as a
reciprocal of 1 instead of 2^127, which only matters for blocks with amax <= 448 * 2^-127
(~2.6e-36); here the format's own 2^-127 is used.

Scales are stored unpadded, one uint8 per block: [..., D // 32] (TE pads its swizzled
GEMM layout to multiples of [128, 4]; a KV cache does not need that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp_formats import (
    E4M3_MAX,
    EXACT_FP_OPTIONS,
    RCP_E4M3_MAX,
    TL_DTYPES,
    abs_max,
    as_rows,
    cast_out,
    check_device,
    check_float_input,
    check_out_dtype,
    decode_e4m3,
    e4m3_encode_ref,
    e8m0_decode_ref,
    e8m0_encode_ref,
    e8m0_pow2,
    e8m0_reciprocal_ref,
    encode_e4m3,
    encode_e8m0,
    group_tile,
    hw_cast_default,
    output_tensor,
    saturate,
    tile_config,
    tile_grid,
)

# The constants above as compile-time values: Triton kernels read only constexpr globals.
_E4M3_MAX_C = tl.constexpr(E4M3_MAX)
_RCP_E4M3_MAX_C = tl.constexpr(RCP_E4M3_MAX)

MX_BLOCK = 32

__all__ = [
    "MX_BLOCK",
    "quantize_mxfp8",
    "dequantize_mxfp8",
    "quantize_mxfp8_ref",
    "dequantize_mxfp8_ref",
]


@triton.jit
def _quantize_mxfp8_kernel(
    x_ptr, q_ptr, scale_ptr, n_rows, D, row_stride, n_groups,
    BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
    EVEN: tl.constexpr, HW_CAST: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows, groups, cols, mask = group_tile(pid_r, pid_g, n_rows, D, BLOCK_G, n_groups,
                                          BLOCK_R, GROUPS, BLOCK_G, EVEN)
    rows64 = rows.to(tl.int64)[:, None, None]
    x = tl.load(x_ptr + rows64 * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    amax = abs_max(x, 2)
    code = encode_e8m0(amax * _RCP_E4M3_MAX_C)  # [BLOCK_R, GROUPS]
    # 2^(127 - code) is exact for every code 0..254; 0xFF (NaN block) poisons the block
    recip = tl.where(code == 0xFF, float("nan"), e8m0_pow2(127 - code))
    q = encode_e4m3(saturate(x * recip[:, :, None], _E4M3_MAX_C), HW_CAST)
    tl.store(q_ptr + rows64 * D + cols, q.to(tl.uint8), mask=mask)
    s_offs = rows.to(tl.int64)[:, None] * n_groups + groups[None, :]
    s_mask = (rows[:, None] < n_rows) & (groups[None, :] < n_groups)
    tl.store(scale_ptr + s_offs, code.to(tl.uint8), mask=s_mask)


@triton.jit
def _dequantize_mxfp8_kernel(
    q_ptr, scale_ptr, out_ptr, n_rows, D, row_stride, n_groups,
    BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
    EVEN: tl.constexpr, OUT_DTYPE: tl.constexpr, HW_CAST: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows, groups, cols, mask = group_tile(pid_r, pid_g, n_rows, D, BLOCK_G, n_groups,
                                          BLOCK_R, GROUPS, BLOCK_G, EVEN)
    rows64 = rows.to(tl.int64)[:, None, None]
    q = tl.load(q_ptr + rows64 * row_stride + cols, mask=mask, other=0).to(tl.int32)
    s_offs = rows.to(tl.int64)[:, None] * n_groups + groups[None, :]
    s_mask = (rows[:, None] < n_rows) & (groups[None, :] < n_groups)
    code = tl.load(scale_ptr + s_offs, mask=s_mask, other=127).to(tl.int32)
    scale = tl.where(code == 0xFF, float("nan"), e8m0_pow2(code - 127))
    value = decode_e4m3(q, HW_CAST) * scale[:, :, None]
    tl.store(out_ptr + rows64 * D + cols, cast_out(value, OUT_DTYPE, HW_CAST), mask=mask)


def quantize_mxfp8(x: torch.Tensor, *, out: torch.Tensor | None = None,
                   scale_out: torch.Tensor | None = None,
                   hw_cast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (D % 32 == 0) -> q (float8_e4m3fn, x.shape), scale_e8m0 (uint8 [..., D//32]).

    `hw_cast` picks the hardware fp8 conversion (default: where the GPU has one) or the
    bit-exact integer path; both give identical bytes.
    """
    what = "quantize_mxfp8(x)"
    check_float_input(x, what)
    rows, row_stride = as_rows(x, what, block=MX_BLOCK)
    check_device(x, what)
    n_rows, d = rows.shape
    n_groups = d // MX_BLOCK
    q = output_tensor(out, x.shape, torch.float8_e4m3fn, x.device, f"{what} out")
    scale = output_tensor(scale_out, tuple(x.shape[:-1]) + (n_groups,), torch.uint8, x.device,
                          f"{what} scale_out")
    if x.numel() == 0:
        return q, scale
    hw = hw_cast_default(x.device) if hw_cast is None else bool(hw_cast)
    tile = tile_config(n_rows, d, MX_BLOCK, n_groups)
    _quantize_mxfp8_kernel[tile_grid(n_rows, n_groups, tile)](
        rows, q.view(torch.uint8), scale, n_rows, d, row_stride, n_groups, HW_CAST=hw,
        **tile, **EXACT_FP_OPTIONS,
    )
    return q, scale


def dequantize_mxfp8(q: torch.Tensor, scale_e8m0: torch.Tensor,
                     dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None,
                     hw_cast: bool | None = None) -> torch.Tensor:
    """x_hat = float(q) * 2^(scale - 127) in `dtype` (scale 0xFF -> NaN for its block)."""
    what = "dequantize_mxfp8(q, scale_e8m0)"
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn:
        found = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"{what}: q must be a torch.float8_e4m3fn tensor, got {found}")
    if not isinstance(scale_e8m0, torch.Tensor) or scale_e8m0.dtype != torch.uint8:
        found = scale_e8m0.dtype if isinstance(scale_e8m0, torch.Tensor) else type(
            scale_e8m0).__name__
        raise TypeError(f"{what}: scale_e8m0 must be a uint8 tensor, got {found}")
    check_out_dtype(dtype, what)
    rows, row_stride = as_rows(q, what, block=MX_BLOCK)
    check_device(q, what)
    n_rows, d = rows.shape
    n_groups = d // MX_BLOCK
    expected = tuple(q.shape[:-1]) + (n_groups,)
    if tuple(scale_e8m0.shape) != expected:
        raise ValueError(f"{what}: scale_e8m0 shape must be {expected} for q shape "
                         f"{tuple(q.shape)}, got {tuple(scale_e8m0.shape)}")
    if not scale_e8m0.is_contiguous() or scale_e8m0.device != q.device:
        raise ValueError(f"{what}: scale_e8m0 must be contiguous and on {q.device}")
    result = output_tensor(out, q.shape, dtype, q.device, f"{what} out")
    if q.numel() == 0:
        return result
    hw = hw_cast_default(q.device) if hw_cast is None else bool(hw_cast)
    tile = tile_config(n_rows, d, MX_BLOCK, n_groups)
    _dequantize_mxfp8_kernel[tile_grid(n_rows, n_groups, tile)](
        rows.view(torch.uint8), scale_e8m0, result, n_rows, d, row_stride, n_groups,
        OUT_DTYPE=TL_DTYPES[dtype], HW_CAST=hw, **tile, **EXACT_FP_OPTIONS,
    )
    return result


def quantize_mxfp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of the rule in the module docstring."""
    d = x.shape[-1]
    if d % MX_BLOCK != 0:
        raise ValueError(f"last dim {d} is not a multiple of the block size {MX_BLOCK}")
    xf = x.float().reshape(*x.shape[:-1], d // MX_BLOCK, MX_BLOCK)
    amax = xf.abs().amax(dim=-1)
    code = e8m0_encode_ref(amax * torch.tensor(RCP_E4M3_MAX, dtype=torch.float32))
    q = e4m3_encode_ref(xf * e8m0_reciprocal_ref(code).unsqueeze(-1))
    return q.reshape(x.shape), code


def dequantize_mxfp8_ref(q: torch.Tensor, scale_e8m0: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    scale = e8m0_decode_ref(scale_e8m0).repeat_interleave(MX_BLOCK, dim=-1)
    return (q.float() * scale).to(dtype)

