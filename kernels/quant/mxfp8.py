"""MXFP8 (OCP Microscaling, E4M3 elements): 32-element blocks along the last dim, each with
a power-of-two E8M0 scale. Bit-exact with TransformerEngine's MXFP8 cast (rowwise).

Rule per block of 32 (TE ``float_to_e8m0`` / ``exp2f_rcp``, common/util/ptx.cuh):
  amax  = max |x| in float32; NaN-propagating (a NaN anywhere in the block -> NaN)
  v     = amax * fl32(1/448)                 a multiply by the rounded reciprocal, as TE
  e     = E8M0 code of the smallest power of two >= v: the fp32 exponent field, plus one
          when any mantissa bit is set (ceil); fp32 values <= 2^-127 (0 included) -> 0x00;
          saturates at 0xFE (also +Inf); NaN -> 0xFF
  m     = 2^(127 - e); TE's exp2f_rcp edges: m = 1 for e == 0, 0 for 0xFE; NaN for 0xFF
  q     = e4m3( clamp(x * m, -448, 448) )    nearest-even; x * m is exact (power of two)
  x_hat = float(q) * 2^(e - 127)             (``dequantize_mxfp8``; 0xFF -> NaN)
So amax * m <= 448 up to the rounding of 1/448 (the clamp takes the rest) and every
element keeps E4M3's 3 mantissa bits relative to its own power-of-two binade.

Layout: q has x's shape (float8_e4m3fn); scales are uint8 ``[..., D // 32]``, in row order,
unpadded and unswizzled (TE pads rowwise scales to multiples of [128, 4] for its GEMMs).
A block whose scale is 0xFF (NaN input) holds NaN codes and decodes to NaN as a whole.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.formats.checks import (
    as_rows,
    check_float_input,
    check_out_dtype,
    check_stored,
    use_hw_cast,
)
from kvperf_kernels.formats.codecs import (
    E8M0_NAN,
    RCP_E4M3_MAX,
    cast_out,
    decode_e4m3,
    e4m3_encode_ref,
    e8m0_decode_ref,
    e8m0_encode_ref,
    encode_e4m3,
    encode_e8m0,
    saturate,
)
from kvperf_kernels.quant.groups import amax_propagate_nan, check_group, group_offsets, tile_config

MX_BLOCK = 32
_RCP_E4M3_MAX = tl.constexpr(RCP_E4M3_MAX)  # fl32(1/448): the constant TE multiplies by


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

@triton.jit
def _encode_multiplier(e):
    """TE's exp2f_rcp from bits (see encode_multiplier_ref): 1.0 for e == 0, 0.0 for 0xFE."""
    m = tl.where(e == 0, 127 << 23, tl.maximum(254 - e, 0) << 23).to(tl.float32, bitcast=True)
    return tl.where(e == 0xFF, float("nan"), m)


@triton.jit
def _decode_scale(e):
    """2^(e - 127) as fp32 (0x00 -> the subnormal 2^-127), 0xFF -> NaN."""
    s = tl.where(e == 0, 0x400000, e << 23).to(tl.float32, bitcast=True)
    return tl.where(e == 0xFF, float("nan"), s)


@triton.jit
def _quantize_mxfp8_kernel(
    x_ptr, q_ptr, e_ptr, n_blocks, x_row_stride,
    BLOCKS_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, HW_CAST: tl.constexpr,
):
    """BLOCK_M consecutive 32-element blocks per program: amax -> E8M0 -> scaled E4M3."""
    b = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, 32)
    b_ok = b < n_blocks
    mask = b_ok[:, None]
    x_offs = group_offsets(b, x_row_stride, 32, BLOCKS_PER_ROW)
    x = tl.load(x_ptr + x_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = amax_propagate_nan(x, 1)
    e = encode_e8m0(amax * _RCP_E4M3_MAX)
    y = saturate(x * _encode_multiplier(e)[:, None], 448.0)
    code = encode_e4m3(y, HW_CAST)
    b64 = b.to(tl.int64)
    tl.store(q_ptr + b64[:, None] * 32 + cols[None, :], code.to(tl.uint8), mask=mask)
    tl.store(e_ptr + b64, e.to(tl.uint8), mask=b_ok)


@triton.jit
def _dequantize_mxfp8_kernel(
    q_ptr, e_ptr, out_ptr, n_blocks, BLOCK_M: tl.constexpr, HW_CAST: tl.constexpr,
):
    b = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, 32)
    b_ok = b < n_blocks
    b64 = b.to(tl.int64)
    offs = b64[:, None] * 32 + cols[None, :]
    code = tl.load(q_ptr + offs, mask=b_ok[:, None], other=0).to(tl.int32)
    e = tl.load(e_ptr + b64, mask=b_ok, other=127).to(tl.int32)
    out = decode_e4m3(code, HW_CAST) * _decode_scale(e)[:, None]
    tl.store(out_ptr + offs, cast_out(out, out_ptr.dtype.element_ty, HW_CAST), mask=b_ok[:, None])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def quantize_mxfp8(x: torch.Tensor, *, hw_cast: bool | None = None):
    """MXFP8 along the last dim: (q float8_e4m3fn x.shape, scale_e8m0 uint8 [..., D // 32]).

    D must be a multiple of 32. ``hw_cast`` as in ``fp8_quant`` (same bytes either way).
    """
    check_float_input(x, "x")
    rows, row_stride = as_rows(x, "x", block=MX_BLOCK)
    d = x.shape[-1]
    check_group(d, "x: last dim")
    blocks_per_row = d // MX_BLOCK
    n_blocks = rows.shape[0] * blocks_per_row
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((*x.shape[:-1], blocks_per_row), dtype=torch.uint8, device=x.device)
    hw = use_hw_cast(x.device, hw_cast)
    if n_blocks:
        block_m, _, num_warps = tile_config(n_blocks, MX_BLOCK, x.element_size())
        _quantize_mxfp8_kernel[(triton.cdiv(n_blocks, block_m),)](
            rows, q.view(torch.uint8), scale, n_blocks, row_stride,
            BLOCKS_PER_ROW=blocks_per_row, BLOCK_M=block_m, HW_CAST=hw, num_warps=num_warps,
        )
    return q, scale


def _check_mx_pair(q, scale) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"q: expected a float8_e4m3fn tensor, got {getattr(q, 'dtype', type(q))}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.uint8:
        raise TypeError(
            f"scale_e8m0: expected a uint8 tensor of E8M0 codes, got "
            f"{getattr(scale, 'dtype', type(scale))}"
        )
    if q.dim() == 0 or q.shape[-1] % MX_BLOCK:
        raise ValueError(
            f"q: last dim must be a multiple of {MX_BLOCK}, got shape {tuple(q.shape)}"
        )
    expected = (*q.shape[:-1], q.shape[-1] // MX_BLOCK)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale_e8m0 shape {tuple(scale.shape)} does not match q {tuple(q.shape)}: "
            f"expected {expected}"
        )


def dequantize_mxfp8(q: torch.Tensor, scale_e8m0: torch.Tensor,
                     dtype: torch.dtype = torch.float32, *, hw_cast: bool | None = None):
    """x_hat = float(q) * 2^(e - 127) per 32-element block, rounded once to ``dtype``."""
    _check_mx_pair(q, scale_e8m0)
    check_out_dtype(dtype, "dtype")
    check_stored((q, "q"), (scale_e8m0, "scale_e8m0"))
    hw = use_hw_cast(q.device, hw_cast)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n_blocks = q.numel() // MX_BLOCK
    if n_blocks:
        block_m, _, num_warps = tile_config(n_blocks, MX_BLOCK, 4)
        _dequantize_mxfp8_kernel[(triton.cdiv(n_blocks, block_m),)](
            q.view(torch.uint8), scale_e8m0, out, n_blocks, BLOCK_M=block_m, HW_CAST=hw,
            num_warps=num_warps,
        )
    return out


# --------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------

def encode_multiplier_ref(e: torch.Tensor) -> torch.Tensor:
    """TE's exp2f_rcp, the fp32 with exponent field 254 - e: 2^(127 - e) for e in 1..253.

    Its edges: e == 0 (amax <= 448 * 2^-127, below E4M3's range at any scale) gives 1.0,
    so the block encodes to zeros; e == 0xFE (Inf amax) gives the bit pattern 0, i.e.
    0.0, so finite elements encode to zero and the Inf to NaN; 0xFF (NaN) gives NaN here.
    """
    e32 = e.to(torch.int32)
    m = torch.pow(2.0, (127 - e32).double()).float()
    m = torch.where(e32 == 0, torch.ones_like(m), m)
    m = torch.where(e32 == 0xFE, torch.zeros_like(m), m)
    return torch.where(e32 == E8M0_NAN, torch.full_like(m, float("nan")), m)


def quantize_mxfp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    if d % MX_BLOCK:
        raise ValueError(f"x: last dim {d} is not a multiple of the block size {MX_BLOCK}")
    xb = x.float().reshape(*x.shape[:-1], d // MX_BLOCK, MX_BLOCK)
    amax = xb.abs().amax(dim=-1)  # NaN propagates
    e = e8m0_encode_ref(amax * RCP_E4M3_MAX)
    q = e4m3_encode_ref(xb * encode_multiplier_ref(e).unsqueeze(-1))
    return q.reshape(x.shape), e


def dequantize_mxfp8_ref(q: torch.Tensor, scale_e8m0: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _check_mx_pair(q, scale_e8m0)
    qb = q.float().reshape(*q.shape[:-1], q.shape[-1] // MX_BLOCK, MX_BLOCK)  # empty too
    return (qb * e8m0_decode_ref(scale_e8m0).unsqueeze(-1)).to(dtype).reshape(q.shape)
