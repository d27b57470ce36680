"""NVFP4: E2M1 values, one E4M3 scale per 16 elements, one fp32 scale per tensor.

Rule (TE 2.x ``NVFP4QuantizerRef``, 1x16 rowwise blocks, round to nearest even, no
Hadamard transform, no stochastic rounding; references and kernels bit for bit):

    global_enc  = min(448 * 6 / global_amax, FP32_MAX); 0 -> 1     (fp32 IEEE division)
    global_dec  = 1 / global_enc
    block_amax  = max |x| over 16 consecutive elements of the last dim (NaN-propagating)
    s_fp32      = min(block_amax * (global_enc * fp32(1/6)), FP32_MAX), clamped to +-448
    block_scale = e4m3(s_fp32)                                      (round to nearest even)
    enc         = min(1 / (float(block_scale) * global_dec), FP32_MAX)
    code        = e2m1(clamp(x * enc, -6, 6))   nearest, ties to even; sign bit for x < 0
    packed byte = code[2k] | code[2k+1] << 4    (even element in the low nibble)
    x_hat       = (e2m1_value(code) * float(block_scale)) * global_dec   (dequantize_nvfp4)

``global_scale`` as returned and as taken by ``dequantize_nvfp4`` is the DECODE scale
``global_dec = 1 / global_enc`` (x ~ value * block_scale * global_scale), shape (1,).

``global_amax`` defaults to max |x| of the tensor being quantised (computed on the
device, no host sync); pass a calibrated value to keep one global scale for a cache that
is written in pieces. A NaN anywhere makes the default global amax NaN and poisons the
whole tensor; with a given global_amax a NaN poisons its 16-element block only (its
block scale becomes the E4M3 NaN). E2M1 has no NaN: a NaN element itself encodes as 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp_formats import (
    E2M1_MAX,
    E4M3_MAX,
    EXACT_FP_OPTIONS,
    FP32_MAX,
    RCP_E2M1_MAX,
    TL_DTYPES,
    abs_max,
    as_rows,
    cast_out,
    check_device,
    check_float_input,
    check_out_dtype,
    decode_e2m1,
    decode_e4m3,
    e2m1_decode_ref,
    e2m1_encode_ref,
    e4m3_encode_ref,
    encode_e2m1,
    encode_e4m3,
    group_tile,
    hw_cast_default,
    output_tensor,
    pack_nibbles_ref,
    saturate,
    tile_config,
    tile_grid,
    unpack_nibbles_ref,
)

# The constants above as compile-time values: Triton kernels read only constexpr globals.
_E4M3_MAX_C = tl.constexpr(E4M3_MAX)
_E2M1_MAX_C = tl.constexpr(E2M1_MAX)
_FP32_MAX_C = tl.constexpr(FP32_MAX)
_RCP_E2M1_MAX_C = tl.constexpr(RCP_E2M1_MAX)

NVFP4_BLOCK = 16
_HALF_BLOCK = NVFP4_BLOCK // 2

__all__ = [
    "NVFP4_BLOCK",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "quantize_nvfp4_ref",
    "dequantize_nvfp4_ref",
    "nvfp4_global_scales_ref",
]


@triton.jit
def _clamp_fp32_max(v):
    """min(v, FP32_MAX) with NaN kept (TE's torch.min propagates NaN; fminf would not)."""
    return tl.where(v > _FP32_MAX_C, _FP32_MAX_C, v)


@triton.jit
def _quantize_nvfp4_kernel(
    x_ptr, packed_ptr, scale_ptr, global_amax_ptr, global_scale_ptr,
    n_rows, D, row_stride, n_groups,
    BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
    EVEN: tl.constexpr, HW_CAST: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    # tensor-level scales: a few scalar ops per program instead of a separate launch
    global_amax = tl.load(global_amax_ptr)
    global_enc = _clamp_fp32_max(tl.math.div_rn(_E4M3_MAX_C * _E2M1_MAX_C, global_amax))
    global_enc = tl.where(global_enc == 0.0, 1.0, global_enc)
    global_dec = tl.math.div_rn(1.0, global_enc)
    multiplier = global_enc * _RCP_E2M1_MAX_C

    rows, groups, cols, mask = group_tile(pid_r, pid_g, n_rows, D, BLOCK_G, n_groups,
                                          BLOCK_R, GROUPS, BLOCK_G, EVEN)
    rows64 = rows.to(tl.int64)[:, None, None]
    x = tl.load(x_ptr + rows64 * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    block_amax = abs_max(x, 2)  # [BLOCK_R, GROUPS]
    s = saturate(_clamp_fp32_max(block_amax * multiplier), _E4M3_MAX_C)
    s_code = encode_e4m3(s, HW_CAST)
    enc = _clamp_fp32_max(tl.math.div_rn(1.0, decode_e4m3(s_code, HW_CAST) * global_dec))
    code = encode_e2m1(saturate(x * enc[:, :, None], _E2M1_MAX_C))  # [BLOCK_R, GROUPS, 16]
    # pairs (2k, 2k+1) -> one byte, even element in the low nibble
    lo, hi = tl.split(tl.reshape(code, (BLOCK_R, GROUPS, BLOCK_G // 2, 2)))
    byte = (lo | (hi << 4)).to(tl.uint8)
    p_cols = groups[None, :, None] * (BLOCK_G // 2) + tl.arange(0, BLOCK_G // 2)[None, None, :]
    p_mask = (rows[:, None, None] < n_rows) & (groups[None, :, None] < n_groups)
    tl.store(packed_ptr + rows64 * (D // 2) + p_cols, byte, mask=p_mask)
    s_offs = rows.to(tl.int64)[:, None] * n_groups + groups[None, :]
    s_mask = (rows[:, None] < n_rows) & (groups[None, :] < n_groups)
    tl.store(scale_ptr + s_offs, s_code.to(tl.uint8), mask=s_mask)
    tl.store(global_scale_ptr, global_dec, mask=(pid_r == 0) & (pid_g == 0))


@triton.jit
def _dequantize_nvfp4_kernel(
    packed_ptr, scale_ptr, global_scale_ptr, out_ptr,
    n_rows, D, packed_row_stride, n_groups,
    BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
    OUT_DTYPE: tl.constexpr, HW_CAST: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_G // 2
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    groups = pid_g * GROUPS + tl.arange(0, GROUPS)
    rows64 = rows.to(tl.int64)[:, None, None]
    mask = (rows[:, None, None] < n_rows) & (groups[None, :, None] < n_groups)
    p_cols = groups[None, :, None] * HALF + tl.arange(0, HALF)[None, None, :]
    byte = tl.load(packed_ptr + rows64 * packed_row_stride + p_cols, mask=mask,
                   other=0).to(tl.int32)
    s_offs = rows.to(tl.int64)[:, None] * n_groups + groups[None, :]
    s_mask = (rows[:, None] < n_rows) & (groups[None, :] < n_groups)
    s_code = tl.load(scale_ptr + s_offs, mask=s_mask, other=0).to(tl.int32)
    s = decode_e4m3(s_code, HW_CAST)[:, :, None]
    global_dec = tl.load(global_scale_ptr)
    lo = (decode_e2m1(byte & 0xF) * s) * global_dec
    hi = (decode_e2m1(byte >> 4) * s) * global_dec
    value = tl.reshape(tl.join(lo, hi), (BLOCK_R, GROUPS, BLOCK_G))
    cols = groups[None, :, None] * BLOCK_G + tl.arange(0, BLOCK_G)[None, None, :]
    tl.store(out_ptr + rows64 * D + cols, cast_out(value, OUT_DTYPE, HW_CAST),
             mask=(rows[:, None, None] < n_rows) & (groups[None, :, None] < n_groups))


def _global_amax_tensor(x: torch.Tensor, global_amax, what: str) -> torch.Tensor:
    if global_amax is None:
        if x.numel() == 0:
            return torch.zeros(1, dtype=torch.float32, device=x.device)
        return x.abs().amax().float().reshape(1)  # stays on the device: no host sync
    if isinstance(global_amax, bool):
        raise TypeError(f"{what}: global_amax must be a number or a 1-element tensor, got bool")
    if isinstance(global_amax, (int, float)):
        return torch.tensor([float(global_amax)], dtype=torch.float32, device=x.device)
    if not isinstance(global_amax, torch.Tensor):
        raise TypeError(f"{what}: global_amax must be a number or a 1-element tensor, "
                        f"got {type(global_amax).__name__}")
    if global_amax.numel() != 1:
        raise ValueError(f"{what}: global_amax must have exactly 1 element, got shape "
                         f"{tuple(global_amax.shape)}")
    if not global_amax.dtype.is_floating_point:
        raise TypeError(f"{what}: global_amax must be a float tensor, got {global_amax.dtype}")
    if global_amax.device != x.device:
        raise ValueError(f"{what}: global_amax is on {global_amax.device}, x on {x.device}")
    return global_amax.detach().float().reshape(1)


def quantize_nvfp4(x: torch.Tensor, global_amax: torch.Tensor | float | None = None, *,
                   out: torch.Tensor | None = None, scale_out: torch.Tensor | None = None,
                   hw_cast: bool | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] (D % 16 == 0) -> (packed uint8 [..., D//2], block_scale float8_e4m3fn
    [..., D//16], global_scale float32 (1,): the decode scale 1/global_enc).

    `hw_cast` picks the hardware fp8 conversion for the block scales (default: where the
    GPU has one) or the bit-exact integer path; both give identical bytes.
    """
    what = "quantize_nvfp4(x)"
    check_float_input(x, what)
    rows, row_stride = as_rows(x, what, block=NVFP4_BLOCK)
    check_device(x, what)
    n_rows, d = rows.shape
    n_groups = d // NVFP4_BLOCK
    lead = tuple(x.shape[:-1])
    amax = _global_amax_tensor(x, global_amax, what)
    packed = output_tensor(out, lead + (d // 2,), torch.uint8, x.device, f"{what} out")
    scale = output_tensor(scale_out, lead + (n_groups,), torch.float8_e4m3fn, x.device,
                          f"{what} scale_out")
    global_scale = torch.empty(1, dtype=torch.float32, device=x.device)
    hw = hw_cast_default(x.device) if hw_cast is None else bool(hw_cast)
    tile = tile_config(max(n_rows, 1), d, NVFP4_BLOCK, n_groups)
    grid = tile_grid(max(n_rows, 1), n_groups, tile)  # >= 1 program: it writes global_scale
    _quantize_nvfp4_kernel[grid](
        rows, packed, scale.view(torch.uint8), amax, global_scale,
        n_rows, d, row_stride, n_groups, HW_CAST=hw, **tile, **EXACT_FP_OPTIONS,
    )
    return packed, scale, global_scale


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor,
                     global_scale: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                     out: torch.Tensor | None = None, hw_cast: bool | None = None,
                     ) -> torch.Tensor:
    """x_hat [..., 2 * packed.shape[-1]] = e2m1 value * block_scale * global_scale (decode)."""
    what = "dequantize_nvfp4(packed, block_scale, global_scale)"
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        found = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"{what}: packed must be a uint8 tensor, got {found}")
    if not isinstance(block_scale, torch.Tensor) or block_scale.dtype != torch.float8_e4m3fn:
        found = (block_scale.dtype if isinstance(block_scale, torch.Tensor)
                 else type(block_scale).__name__)
        raise TypeError(f"{what}: block_scale must be a float8_e4m3fn tensor, got {found}")
    if (not isinstance(global_scale, torch.Tensor) or global_scale.dtype != torch.float32
            or global_scale.numel() != 1):
        found = (f"{global_scale.dtype} of shape {tuple(global_scale.shape)}"
                 if isinstance(global_scale, torch.Tensor) else type(global_scale).__name__)
        raise TypeError(f"{what}: global_scale must be a 1-element float32 tensor, got {found}")
    check_out_dtype(dtype, what)
    if packed.dim() >= 1 and packed.shape[-1] % _HALF_BLOCK != 0:
        raise ValueError(f"{what}: packed last dim {packed.shape[-1]} is not a multiple of "
                         f"{_HALF_BLOCK} (two E2M1 values per byte, {NVFP4_BLOCK} per block)")
    rows, row_stride = as_rows(packed, what)
    check_device(packed, what)
    n_rows, half_d = rows.shape
    d = 2 * half_d
    n_groups = d // NVFP4_BLOCK
    expected = tuple(packed.shape[:-1]) + (n_groups,)
    if tuple(block_scale.shape) != expected:
        raise ValueError(f"{what}: block_scale shape must be {expected} for packed shape "
                         f"{tuple(packed.shape)}, got {tuple(block_scale.shape)}")
    for name, t in (("block_scale", block_scale), ("global_scale", global_scale)):
        if not t.is_contiguous() or t.device != packed.device:
            raise ValueError(f"{what}: {name} must be contiguous and on {packed.device}")
    result = output_tensor(out, tuple(packed.shape[:-1]) + (d,), dtype, packed.device,
                           f"{what} out")
    if packed.numel() == 0:
        return result
    hw = hw_cast_default(packed.device) if hw_cast is None else bool(hw_cast)
    tile = tile_config(n_rows, d, NVFP4_BLOCK, n_groups)
    _dequantize_nvfp4_kernel[tile_grid(n_rows, n_groups, tile)](
        rows, block_scale.view(torch.uint8), global_scale, result,
        n_rows, d, row_stride, n_groups,
        BLOCK_R=tile["BLOCK_R"], GROUPS=tile["GROUPS"], BLOCK_G=tile["BLOCK_G"],
        OUT_DTYPE=TL_DTYPES[dtype], HW_CAST=hw, num_warps=tile["num_warps"],
        **EXACT_FP_OPTIONS,
    )
    return result


# --------------------------------------------------------------------------------------
# Torch references (TE's reference, step by step)
# --------------------------------------------------------------------------------------

_F32_MAX = torch.tensor(FP32_MAX, dtype=torch.float32)


def nvfp4_global_scales_ref(global_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global_enc, global_dec) from the tensor amax, as TE computes them."""
    amax = global_amax.float()
    enc = torch.minimum(torch.tensor(E4M3_MAX * E2M1_MAX, dtype=torch.float32,
                                     device=amax.device) / amax, _F32_MAX.to(amax.device))
    enc = torch.where(enc == 0, torch.ones_like(enc), enc)
    return enc, torch.div(1.0, enc)


def quantize_nvfp4_ref(x: torch.Tensor, global_amax: torch.Tensor | float | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    if d % NVFP4_BLOCK != 0:
        raise ValueError(f"last dim {d} is not a multiple of the block size {NVFP4_BLOCK}")
    if global_amax is None:
        global_amax = x.abs().amax().float().reshape(1)
    global_amax = torch.as_tensor(global_amax, dtype=torch.float32, device=x.device).reshape(1)
    enc_g, dec_g = nvfp4_global_scales_ref(global_amax)
    fmax = _F32_MAX.to(x.device)
    xf = x.float().reshape(*x.shape[:-1], d // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = xf.abs().amax(dim=-1, keepdim=True)
    multiplier = enc_g * torch.tensor(RCP_E2M1_MAX, dtype=torch.float32, device=x.device)
    block_scale = e4m3_encode_ref(torch.minimum(block_amax * multiplier, fmax))
    enc = torch.minimum(torch.div(1.0, block_scale.float() * dec_g), fmax)
    codes = e2m1_encode_ref((xf * enc).clamp(-E2M1_MAX, E2M1_MAX)).reshape(x.shape)
    return pack_nibbles_ref(codes), block_scale.squeeze(-1), dec_g


def dequantize_nvfp4_ref(packed: torch.Tensor, block_scale: torch.Tensor,
                         global_scale: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values = e2m1_decode_ref(unpack_nibbles_ref(packed))
    scale = block_scale.float().repeat_interleave(NVFP4_BLOCK, dim=-1)
    return ((values * scale) * global_scale.float()).to(dtype)
