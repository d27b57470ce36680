"""FP8 E4M3 (``float8_e4m3fn``) quantisation: per-token, per-tensor and 1xB-block scales.

Rule, identical in kernels and references (bit-exact):
  amax  = max |x| over the scale's group, in float32 (bf16/fp16 widen exactly)
  scale = amax / 448 (IEEE division, round-to-nearest-even, subnormals kept); a scale of 0
          (amax 0, or below 448 * 2^-150 where the quotient underflows) -> scale = 1
  q     = e4m3( clamp(x / scale, -448, 448) )  IEEE division; the cast rounds to nearest
          even; the clamp is the saturation, so the cast never overflows.
  x_hat = float(q) * scale                               (``dequantize``)
The stored scale is the *decode* scale (x ~ q * scale), float32.

Non-finite input is never hidden: a NaN anywhere in a group makes its amax, hence its
scale, NaN, so the whole group dequantises to NaN (the same rule as the MXFP8 and NVFP4
modules: a NaN poisons its scale group). fmaxf-style max and min/max clamps would turn NaN
into a plausible finite value; the kernels use a NaN-propagating integer max instead.
+-Inf makes the scale Inf (finite neighbours become 0, the Inf itself NaN).

Groups: per-token = the last dim (any leading dims, flattened); per-tensor = everything;
per-block = ``block`` consecutive elements of the last dim (DeepSeek-style 1x128).
Inputs: bfloat16 / float16 / float32, last dim contiguous, leading dims collapsible into
one row stride (e.g. a contiguous tensor or a slice of its last dim); anything else is
refused rather than silently copied (a copy would double the traffic of this memory-bound
kernel). On an FP8 GPU the cast is the hardware ``cvt.rn.satfinite.e4m3x2.f32``; elsewhere
(and in Triton's CPU interpreter, whose own fp8 cast is wrong) it is the bit-exact integer
encoder of ``fp_formats``.
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
    E4M3_MAX,
    IEEE_SUBNORMALS,
    cast_out,
    decode_e4m3,
    e4m3_encode_ref,
    encode_e4m3,
    saturate,
)
from kvperf_kernels.quant.groups import (
    amax_propagate_nan,
    check_group,
    group_offsets,
    tensor_amax,
    tensor_amax_ref,
    tile_config,
)

__all__ = [
    "E4M3_MAX", "div_rn_by_scale", "quantize_per_token", "quantize_per_tensor",
    "quantize_per_block", "dequantize",
    "quantize_per_token_ref", "quantize_per_tensor_ref", "quantize_per_block_ref",
    "dequantize_ref",
]

# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

@triton.jit
def div_rn_by_scale(x, s):
    """RN(x / s) (IEEE division, round to nearest even) for x [M, D], s [M, 1] or [1, 1].

    A div.rn.f32 per element costs ~10 instructions on the GPU, about what a bf16
    quantiser may spend per element at HBM speed. Markstein's correction gives the same
    correctly rounded quotient from one reciprocal per scale, a multiply and two FMAs:
      r = RN(1/s), y = RN(x*r) (within 1 ulp), e = x - y*s (exact in an FMA),
      q = RN(y + e*r) = RN(x/s)
    (Markstein 1990; Muller et al., Handbook of Floating-Point Arithmetic, "Markstein's
    theorem"), provided nothing underflows or overflows: every s of the tile in
    [2^-90, 2^126), so that r is normal. Then a quotient >= 2^-10, the smallest that E4M3
    does not flush to zero, has x >= 2^-100 and an exact (possibly subnormal) remainder;
    quotients below 2^-126 may differ in their last bit and encode to +-0 either way.
    Tiles outside that range (NaN/Inf/0 scales, amax below ~4e-25) take plain divisions.
    Launch with IEEE_SUBNORMALS: in libdevice's default flush-to-zero mode div_rn reads
    a subnormal x or s as 0.
    """
    s_bits = s.to(tl.int32, bitcast=True)
    in_range = ((s_bits >= 0x12800000) & (s_bits < 0x7E800000)).to(tl.int32)  # [2^-90, 2^126)
    if tl.min(in_range) == 1:  # one uniform branch per program
        r = tl.math.div_rn(1.0, s)
        y = x * r
        q = tl.fma(tl.fma(-y, s, x), r, y)
        q = tl.where(x == 0.0, y, q)  # the remainder of +-0 is +0: keep the zero's sign
    else:
        q = tl.math.div_rn(x, s)
    return q


@triton.jit
def _quantize_groups_kernel(
    x_ptr, q_ptr, scale_ptr, n_groups, x_row_stride,
    GROUP: tl.constexpr, GROUPS_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HW_CAST: tl.constexpr,
):
    """One scale per group of GROUP elements; BLOCK_M groups per program, one pass over x."""
    g = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    g_ok = g < n_groups
    mask = g_ok[:, None] & (cols < GROUP)[None, :]
    x_offs = group_offsets(g, x_row_stride, GROUP, GROUPS_PER_ROW)
    x = tl.load(x_ptr + x_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = amax_propagate_nan(x, 1)  # masked lanes are 0: they never win
    scale = tl.math.div_rn(amax, 448.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    y = saturate(div_rn_by_scale(x, scale[:, None]), 448.0)
    code = encode_e4m3(y, HW_CAST)
    q_offs = g.to(tl.int64)[:, None] * GROUP + cols[None, :]  # q is contiguous
    tl.store(q_ptr + q_offs, code.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + g, scale, mask=g_ok)


@triton.jit
def _quantize_tensor_scale_kernel(
    x_ptr, q_ptr, scale_ptr, n_rows, x_row_stride,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HW_CAST: tl.constexpr,
):
    """q = e4m3(sat(x / scale)) with the one scale read from device memory (second pass)."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (r < n_rows)[:, None] & (cols < GROUP)[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_ptr + tl.zeros([1, 1], tl.int32))
    code = encode_e4m3(saturate(div_rn_by_scale(x.to(tl.float32), scale), 448.0), HW_CAST)
    tl.store(q_ptr + r64[:, None] * GROUP + cols[None, :], code.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, out_ptr, n_groups, scale_stride,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HW_CAST: tl.constexpr,
):
    """out[g, :] = float(q[g, :]) * scale[g * scale_stride] (stride 0: one scale for all)."""
    g = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    g_ok = g < n_groups
    mask = g_ok[:, None] & (cols < GROUP)[None, :]
    g64 = g.to(tl.int64)
    offs = g64[:, None] * GROUP + cols[None, :]
    code = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scale_ptr + g64 * scale_stride, mask=g_ok, other=1.0)
    out = decode_e4m3(code, HW_CAST) * scale[:, None]
    tl.store(out_ptr + offs, cast_out(out, out_ptr.dtype.element_ty, HW_CAST), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def _quantize_groups(x: torch.Tensor, group: int, hw_cast: bool | None):
    rows, row_stride = as_rows(x, "x", block=group)
    d = x.shape[-1]
    groups_per_row = d // group
    n_groups = rows.shape[0] * groups_per_row
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(n_groups, dtype=torch.float32, device=x.device)
    hw = use_hw_cast(x.device, hw_cast)
    if n_groups:
        block_m, block_d, num_warps = tile_config(n_groups, group, x.element_size())
        _quantize_groups_kernel[(triton.cdiv(n_groups, block_m),)](
            rows, q.view(torch.uint8), scale, n_groups, row_stride,
            GROUP=group, GROUPS_PER_ROW=groups_per_row, BLOCK_M=block_m, BLOCK_D=block_d,
            HW_CAST=hw, num_warps=num_warps, **IEEE_SUBNORMALS,
        )
    return q, scale


def quantize_per_token(x: torch.Tensor, *, hw_cast: bool | None = None):
    """One scale per vector along the last dim.

    Returns (q float8_e4m3fn x.shape, scale float32 x.shape[:-1] + (1,)).
    ``hw_cast`` picks the hardware fp8 conversion (default: on an FP8 GPU) or the integer
    encoder; both give the same bytes.
    """
    check_float_input(x, "x")
    d = x.shape[-1] if x.dim() else 0
    check_group(d, "x: last dim")
    q, scale = _quantize_groups(x, d, hw_cast)
    return q, scale.view(*x.shape[:-1], 1)


def quantize_per_block(x: torch.Tensor, block: int = 128, *, hw_cast: bool | None = None):
    """One scale per ``block`` consecutive elements of the last dim (1 x block tiles).

    Returns (q float8_e4m3fn x.shape, scale float32 x.shape[:-1] + (D // block,)).
    """
    check_float_input(x, "x")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    check_group(block, "block")
    q, scale = _quantize_groups(x, block, hw_cast)
    return q, scale.view(*x.shape[:-1], x.shape[-1] // block)


def quantize_per_tensor(x: torch.Tensor, *, hw_cast: bool | None = None):
    """One scale for the whole tensor: (q float8_e4m3fn x.shape, scale float32 (1,)).

    Two passes: ``tensor_amax``, then the quantise pass reading the scale from device
    memory (no host sync).
    """
    check_float_input(x, "x")
    rows, row_stride = as_rows(x, "x")
    n_rows, d = rows.shape
    check_group(d, "x: last dim")
    hw = use_hw_cast(x.device, hw_cast)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    amax = tensor_amax(rows, row_stride)
    scale = _scale_from_amax(amax)
    if n_rows:
        block_m, block_d, num_warps = tile_config(n_rows, d, x.element_size())
        _quantize_tensor_scale_kernel[(triton.cdiv(n_rows, block_m),)](
            rows, q.view(torch.uint8), scale, n_rows, row_stride, GROUP=d, BLOCK_M=block_m,
            BLOCK_D=block_d, HW_CAST=hw, num_warps=num_warps, **IEEE_SUBNORMALS,
        )
    return q, scale


def _scale_layout(q: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    """(group length along the last dim, scale stride per group) read from the scale's shape."""
    d = q.shape[-1]
    lead = tuple(q.shape[:-1])
    if scale.dim() <= 1 and scale.numel() == 1:
        return d, 0  # per-tensor
    if tuple(scale.shape) in (lead + (1,), lead):
        return d, 1  # per-token (trailing 1 kept or squeezed)
    if scale.dim() == q.dim() and tuple(scale.shape[:-1]) == lead:
        nb = scale.shape[-1]
        if nb > 0 and d % nb == 0:
            return d // nb, 1  # per-block
    raise ValueError(
        f"scale shape {tuple(scale.shape)} fits no scaling of q with shape {tuple(q.shape)}: "
        f"expected (1,) per-tensor, {lead + (1,)} per-token or {lead + ('D // block',)} per-block"
    )


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, *,
               hw_cast: bool | None = None) -> torch.Tensor:
    """x_hat = float(q) * scale in ``dtype``: per-tensor / per-token broadcast, per-block expanded.

    The scaling is read from the scale's shape (see ``_scale_layout``). The product is
    formed in float32 and rounded once to ``dtype`` (nearest even).
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"q: expected a float8_e4m3fn tensor, got {getattr(q, 'dtype', type(q))}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError(
            f"scale: expected a float32 tensor, got {getattr(scale, 'dtype', type(scale))}"
        )
    check_out_dtype(dtype, "dtype")
    if q.dim() == 0 or q.shape[-1] == 0:
        raise ValueError(f"q: expected a non-empty last dim, got shape {tuple(q.shape)}")
    check_stored((q, "q"), (scale, "scale"))
    group, scale_stride = _scale_layout(q, scale)
    check_group(group, "scale: group")
    hw = use_hw_cast(q.device, hw_cast)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n_groups = q.numel() // group
    if n_groups:
        block_m, block_d, num_warps = tile_config(n_groups, group, 4)
        _dequantize_kernel[(triton.cdiv(n_groups, block_m),)](
            q.view(torch.uint8), scale, out, n_groups, scale_stride,
            GROUP=group, BLOCK_M=block_m, BLOCK_D=block_d, HW_CAST=hw, num_warps=num_warps,
        )
    return out


# --------------------------------------------------------------------------------------
# Torch references: the rule above with torch ops (bit-exact on any device)
# --------------------------------------------------------------------------------------

def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    # a tensor divisor: torch's CUDA division by a Python scalar multiplies by its
    # rounded reciprocal instead ("may lose one bit"), which is not amax / 448
    scale = amax / torch.full_like(amax, E4M3_MAX)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _encode(xf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return e4m3_encode_ref(xf / scale)  # clamp to +-448 (NaN kept), then RNE cast


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = _scale_from_amax(xf.abs().amax(dim=-1, keepdim=True))
    return _encode(xf, scale), scale


def quantize_per_tensor_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _scale_from_amax(tensor_amax_ref(x))
    return _encode(x.float(), scale), scale


def quantize_per_block_ref(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    if d % block:
        raise ValueError(f"x: last dim {d} is not a multiple of the block size {block}")
    xb = x.float().reshape(*x.shape[:-1], d // block, block)
    scale = _scale_from_amax(xb.abs().amax(dim=-1, keepdim=True))
    return _encode(xb, scale).reshape(x.shape), scale.squeeze(-1)


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    group, scale_stride = _scale_layout(q, scale)
    qf = q.float().reshape(-1, group)
    s = scale.reshape(-1, 1) if scale_stride else scale.reshape(1, 1)
    return (qf * s).to(dtype).reshape(q.shape)
