"""NVFP4: E2M1 elements in 16-element blocks along the last dim, an E4M3 scale per block and
one float32 global scale. Bit-exact with TransformerEngine's NVFP4 reference quantiser
(``pytorch/custom_recipes/reference_nvfp4.py``, 1x16 rowwise tiles, round-to-nearest-even,
no random Hadamard transform, no stochastic rounding: the forward KV-cache case).

Rule (all float32, IEEE round-to-nearest-even at every step):
  global_amax = max |x| over the tensor (or the caller's calibrated value)
  g_enc  = min(448 * 6 / global_amax, FLT_MAX); 1 when global_amax == 0 or g_enc == 0
  g_dec  = 1 / g_enc                                   <- returned as ``global_scale``
  per block of 16:
  s      = e4m3( clamp(block_amax * (g_enc * fl32(1/6)), 0, 448) )    TE folds 1/6 in
  enc    = min(1 / (float(s) * g_dec), FLT_MAX)        (s == 0 -> FLT_MAX)
  code   = e2m1( clamp(x * enc, -6, 6) )               nearest-even (TE's threshold table)
  x_hat  = (e2m1(code) * float(s)) * g_dec             (``dequantize_nvfp4``)
``global_scale`` is the *decode* scale (x ~ e2m1 * block_scale * global_scale), like the
FP8 modules' scales; the encode scale is its reciprocal 448 * 6 / global_amax.

Packing: two codes per byte, element 2k in the low nibble, 2k+1 in the high nibble. As in
TE's table, -0.0 and values rounding to zero from below encode as +0/-0 by sign of x < 0
(exact -0.0 -> +0). E2M1 has no NaN: a NaN in a block makes its amax, hence its E4M3 scale,
NaN (its codes are 0), so the block decodes to NaN; a NaN global amax poisons everything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.formats.checks import (
    as_rows,
    check_float_input,
    check_out_dtype,
    check_same_device,
    check_stored,
    use_hw_cast,
)
from kvperf_kernels.formats.codecs import (
    E2M1_MAX,
    E4M3_MAX,
    FP32_MAX,
    IEEE_SUBNORMALS,
    RCP_E2M1_MAX,
    cast_out,
    decode_e2m1,
    decode_e4m3,
    e2m1_decode_ref,
    e2m1_encode_ref,
    e4m3_encode_ref,
    encode_e2m1,
    encode_e4m3,
    max_propagate_nan,
    pack_nibbles_ref,
    saturate,
    unpack_nibbles_ref,
)
from kvperf_kernels.quant.groups import (
    check_group,
    group_offsets,
    tensor_amax,
    tensor_amax_ref,
    tile_config,
)

NVFP4_BLOCK = 16
_FP32_MAX = tl.constexpr(FP32_MAX)
_E4M3_X_E2M1_MAX = tl.constexpr(E4M3_MAX * E2M1_MAX)  # 2688, exact in fp32
_RCP_E2M1_MAX = tl.constexpr(RCP_E2M1_MAX)


# --------------------------------------------------------------------------------------
# Global scale (a few scalar torch ops on the device: no host sync)
# --------------------------------------------------------------------------------------

def global_scales(global_amax: torch.Tensor) -> torch.Tensor:
    """[g_dec, g_enc * fl32(1/6)] as float32 (2,) from a float32 (1,) global amax."""
    amax = global_amax.reshape(1).float()
    enc = torch.minimum(torch.full_like(amax, E4M3_MAX * E2M1_MAX) / amax,
                        torch.full_like(amax, FP32_MAX))
    enc = torch.where((amax == 0) | (enc == 0), torch.ones_like(enc), enc)
    dec = torch.ones_like(enc) / enc
    return torch.cat([dec, enc * RCP_E2M1_MAX])


def _given_global_amax(x: torch.Tensor, global_amax) -> torch.Tensor:
    """A caller's calibrated global amax as float32 (1,) on x's device, checked."""
    if isinstance(global_amax, torch.Tensor):
        if global_amax.numel() != 1 or global_amax.dtype != torch.float32:
            raise ValueError(
                "global_amax: expected a float32 tensor with one element, got "
                f"{global_amax.dtype} of shape {tuple(global_amax.shape)}"
            )
        check_same_device(global_amax, "global_amax", x, "x")
        return global_amax.reshape(1)
    if isinstance(global_amax, bool) or not isinstance(global_amax, (int, float)):
        raise TypeError(f"global_amax: expected None, a float or a tensor, got {global_amax!r}")
    if not global_amax >= 0:
        raise ValueError(f"global_amax must be >= 0, got {global_amax!r}")
    # float32 rounds a larger value to +Inf (global scale 1, as for amax 0); an int beyond
    # float64 would not convert at all
    amax = min(global_amax, FP32_MAX * 2) if isinstance(global_amax, int) else global_amax
    return torch.tensor([float(amax)], dtype=torch.float32, device=x.device)


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

@triton.jit
def _quantize_nvfp4_kernel(
    x_ptr, packed_ptr, s_ptr, amax_ptr, g_dec_ptr, n_blocks, x_row_stride,
    BLOCKS_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, HW_CAST: tl.constexpr,
):
    """BLOCK_M consecutive 16-element blocks per program -> 8 packed bytes + 1 E4M3 scale each.

    Every program derives the global scales from the global amax itself (a few scalar ops,
    the same IEEE steps as ``global_scales``): no extra launches, no host round trip.
    """
    amax_g = tl.load(amax_ptr)
    g_enc = tl.math.div_rn(_E4M3_X_E2M1_MAX, amax_g)
    g_enc = tl.where(g_enc > _FP32_MAX, _FP32_MAX, g_enc)  # min(., FLT_MAX); NaN stays
    g_enc = tl.where((amax_g == 0.0) | (g_enc == 0.0), 1.0, g_enc)
    g_dec = tl.math.div_rn(1.0, g_enc)
    g_mult = g_enc * _RCP_E2M1_MAX
    if tl.program_id(0) == 0:
        tl.store(g_dec_ptr, g_dec)

    b = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, 16)
    b_ok = b < n_blocks
    x_offs = group_offsets(b, x_row_stride, 16, BLOCKS_PER_ROW)
    x = tl.load(x_ptr + x_offs[:, None] + cols[None, :], mask=b_ok[:, None], other=0.0)
    x = x.to(tl.float32)
    # block scale: saturate == TE's min(., FLT_MAX) then clamp(., +-448); NaN stays NaN
    # a NaN-propagating float max (max.NaN) rather than amax_propagate_nan's integer and +
    # max: this kernel is instruction-bound on Hopper (6 % on the H100)
    block_amax = tl.reduce(tl.abs(x), 1, max_propagate_nan)
    s_code = encode_e4m3(saturate(block_amax * g_mult, 448.0), HW_CAST)
    enc = tl.math.div_rn(1.0, decode_e4m3(s_code, HW_CAST) * g_dec)
    enc = tl.where(enc > _FP32_MAX, _FP32_MAX, enc)  # 1/0 = Inf -> FLT_MAX; NaN stays
    codes = encode_e2m1(x * enc[:, None])  # saturates at +-6 itself
    # A block's 8 bytes as two little-endian int32 words (packed_ptr is int32), 32-bit math
    # within each thread's 8 elements: element j in bits 4(j % 8).., so 2k is the low
    # nibble of byte k. The fields are disjoint, so the sum is their OR (the top one may
    # wrap the sign bit).
    shifts = (tl.arange(0, 16) % 8) * 4
    words = tl.sum(tl.reshape(codes << shifts[None, :], (BLOCK_M, 2, 8)), axis=2)
    b64 = b.to(tl.int64)
    tl.store(packed_ptr + b64[:, None] * 2 + tl.arange(0, 2)[None, :], words,
             mask=b_ok[:, None])
    tl.store(s_ptr + b64, s_code.to(tl.uint8), mask=b_ok)


@triton.jit
def _dequantize_nvfp4_kernel(
    packed_ptr, s_ptr, g_ptr, out_ptr, n_blocks, BLOCK_M: tl.constexpr, HW_CAST: tl.constexpr,
):
    b = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b_ok = b < n_blocks
    b64 = b.to(tl.int64)
    byte = tl.load(packed_ptr + b64[:, None] * 8 + tl.arange(0, 8)[None, :],
                   mask=b_ok[:, None], other=0).to(tl.int32)
    codes = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_M, 16))
    s = decode_e4m3(tl.load(s_ptr + b64, mask=b_ok, other=0).to(tl.int32), HW_CAST)
    out = (decode_e2m1(codes) * s[:, None]) * tl.load(g_ptr)
    offs = b64[:, None] * 16 + tl.arange(0, 16)[None, :]
    tl.store(out_ptr + offs, cast_out(out, out_ptr.dtype.element_ty, HW_CAST), mask=b_ok[:, None])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def quantize_nvfp4(x: torch.Tensor, global_amax=None, *, hw_cast: bool | None = None):
    """NVFP4 along the last dim (a multiple of 16).

    Returns (packed uint8 [..., D // 2], block_scale float8_e4m3fn [..., D // 16],
    global_scale float32 (1,), the decode scale). ``global_amax`` (None: max |x| of this
    tensor, one extra pass; else a calibrated value) sets the global scale; blocks above
    it saturate at scale 448 and elements at +-6. A calibrated float32 one-element tensor
    on x's device makes this one launch; a Python float costs a host-to-device copy.
    """
    check_float_input(x, "x")
    rows, row_stride = as_rows(x, "x", block=NVFP4_BLOCK)
    d = x.shape[-1]
    check_group(d, "x: last dim")
    hw = use_hw_cast(x.device, hw_cast)
    if global_amax is None:
        amax = tensor_amax(rows, row_stride)
    else:
        amax = _given_global_amax(x, global_amax)
    blocks_per_row = d // NVFP4_BLOCK
    n_blocks = rows.shape[0] * blocks_per_row
    packed = torch.empty((*x.shape[:-1], d // 2), dtype=torch.uint8, device=x.device)
    block_scale = torch.empty((*x.shape[:-1], blocks_per_row), dtype=torch.float8_e4m3fn,
                              device=x.device)
    if not n_blocks:  # nothing to launch: the scale from the same torch steps
        return packed, block_scale, global_scales(amax)[:1].clone()
    global_scale = torch.empty(1, dtype=torch.float32, device=x.device)
    block_m, _, num_warps = tile_config(n_blocks, NVFP4_BLOCK, x.element_size())
    _quantize_nvfp4_kernel[(triton.cdiv(n_blocks, block_m),)](
        rows, packed.view(torch.int32), block_scale.view(torch.uint8), amax, global_scale,
        n_blocks, row_stride, BLOCKS_PER_ROW=blocks_per_row, BLOCK_M=block_m, HW_CAST=hw,
        num_warps=num_warps, **IEEE_SUBNORMALS,
    )
    return packed, block_scale, global_scale


def _check_nvfp4_triple(packed, block_scale, global_scale) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(
            f"packed: expected a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}"
        )
    if not isinstance(block_scale, torch.Tensor) or block_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(
            "block_scale: expected a float8_e4m3fn tensor, got "
            f"{getattr(block_scale, 'dtype', type(block_scale))}"
        )
    if (not isinstance(global_scale, torch.Tensor) or global_scale.dtype != torch.float32
            or global_scale.numel() != 1):
        raise TypeError("global_scale: expected a float32 tensor with one element, got "
                        f"{getattr(global_scale, 'dtype', type(global_scale))}")
    if packed.dim() == 0 or packed.shape[-1] % (NVFP4_BLOCK // 2):
        raise ValueError(
            f"packed: last dim must be a multiple of {NVFP4_BLOCK // 2} bytes, got shape "
            f"{tuple(packed.shape)}"
        )
    expected = (*packed.shape[:-1], packed.shape[-1] * 2 // NVFP4_BLOCK)
    if tuple(block_scale.shape) != expected:
        raise ValueError(
            f"block_scale shape {tuple(block_scale.shape)} does not match packed "
            f"{tuple(packed.shape)}: expected {expected}"
        )


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor,
                     global_scale: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                     hw_cast: bool | None = None) -> torch.Tensor:
    """x_hat = (e2m1 * block_scale) * global_scale, shape [..., 2 * packed.shape[-1]]."""
    _check_nvfp4_triple(packed, block_scale, global_scale)
    check_out_dtype(dtype, "dtype")
    check_stored((packed, "packed"), (block_scale, "block_scale"), (global_scale, "global_scale"))
    hw = use_hw_cast(packed.device, hw_cast)
    out = torch.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=dtype,
                      device=packed.device)
    n_blocks = block_scale.numel()
    if n_blocks:
        block_m, _, num_warps = tile_config(n_blocks, NVFP4_BLOCK, 4)
        _dequantize_nvfp4_kernel[(triton.cdiv(n_blocks, block_m),)](
            packed, block_scale.view(torch.uint8), global_scale, out, n_blocks,
            BLOCK_M=block_m, HW_CAST=hw, num_warps=num_warps,
        )
    return out


# --------------------------------------------------------------------------------------
# Torch references (TE's reference_nvfp4 steps, written from the rule above)
# --------------------------------------------------------------------------------------

def quantize_nvfp4_ref(x: torch.Tensor, global_amax=None):
    d = x.shape[-1]
    if d % NVFP4_BLOCK:
        raise ValueError(f"x: last dim {d} is not a multiple of the block size {NVFP4_BLOCK}")
    xf = x.float()
    if global_amax is None:
        g = global_scales(tensor_amax_ref(xf))  # NaN propagates
    else:
        g = global_scales(_given_global_amax(x, global_amax))
    g_dec, g_mult = g[0], g[1]
    xb = xf.reshape(*x.shape[:-1], d // NVFP4_BLOCK, NVFP4_BLOCK)
    # clamp(max=) propagates NaN like TE's torch.min; e4m3_encode_ref clamps to +-448
    s = e4m3_encode_ref((xb.abs().amax(dim=-1, keepdim=True) * g_mult).clamp(max=FP32_MAX))
    t = s.float() * g_dec
    enc = (torch.ones_like(t) / t).clamp(max=FP32_MAX)  # tensor / tensor: IEEE on any device
    codes = e2m1_encode_ref((xb * enc).clamp(-E2M1_MAX, E2M1_MAX))
    packed = pack_nibbles_ref(codes.reshape(x.shape))
    return packed, s.squeeze(-1), g[:1].clone()


def dequantize_nvfp4_ref(packed: torch.Tensor, block_scale: torch.Tensor,
                         global_scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    _check_nvfp4_triple(packed, block_scale, global_scale)
    values = e2m1_decode_ref(unpack_nibbles_ref(packed))
    vb = values.reshape(*block_scale.shape, NVFP4_BLOCK)
    out = (vb * block_scale.float().unsqueeze(-1)) * global_scale.reshape(()).float()
    return out.to(dtype).reshape(values.shape)
