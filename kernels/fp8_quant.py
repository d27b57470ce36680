"""FP8 E4M3 (``float8_e4m3fn``) quantisation with per-token, per-tensor and 1xB-block scales.

Rule (the references below and the kernels follow it bit for bit):

    amax  = max |x| over the scale's group, in fp32 (bf16/fp16 widen exactly)
    scale = amax / 448                  IEEE division, round to nearest even
            max(scale, 2^-126)          so 1/scale is finite (only fp32/bf16 inputs with
                                        amax < 5.3e-36 reach this floor)
            amax == 0 -> scale = 1
    inv   = 1 / scale                   IEEE division, once per group
    q     = e4m3(clamp(x * inv, -448, 448))   the clamp is the saturation (x * inv can
                                        exceed 448 by a few fp32 ulps); the cast rounds
                                        to nearest even
    x_hat = float(q) * scale            (``dequantize``)

``scale`` is the *decode* scale (x ~ q * scale), float32. Multiplying by the rounded
reciprocal rather than dividing every element costs one division per group instead of
one per element and is what vLLM/TE do; it can differ from x / scale in the last fp32
bit, so the reference does the same multiplication.

Groups: per-token = the last dim (leading dims flattened: for a (tokens, heads, head_dim)
KV tensor that is one scale per token and head); per-tensor = all elements; per-block =
``block`` consecutive elements of the last dim (DeepSeek-style 1x128).

Non-finite input is never hidden: the group max is NaN-propagating, so a NaN makes its
group's scale NaN and every q of the group NaN; +-Inf makes the scale Inf, and the whole
group dequantises to NaN.

Inputs: bfloat16 / float16 / float32 with a contiguous last dim and leading dims that
flatten into rows without a copy. Outputs can be passed in (``out``, ``scale_out``) to
write into an existing cache; otherwise they are allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp_formats import (
    E4M3_MAX,
    EXACT_FP_OPTIONS,
    FP32_MIN_NORMAL,
    MAX_ROW_ELEMENTS,
    TL_DTYPES,
    abs_max,
    as_rows,
    cast_out,
    check_device,
    check_float_input,
    check_out_dtype,
    decode_e4m3,
    e4m3_encode_ref,
    encode_e4m3,
    group_tile,
    hw_cast_default,
    output_tensor,
    saturate,
    tile_config,
    tile_grid,
)

# The constants above as compile-time values: Triton kernels read only constexpr globals.
_E4M3_MAX_C = tl.constexpr(E4M3_MAX)
_FP32_MIN_NORMAL_C = tl.constexpr(FP32_MIN_NORMAL)

__all__ = [
    "E4M3_MAX",
    "quantize_per_token",
    "quantize_per_tensor",
    "quantize_per_block",
    "dequantize",
    "quantize_per_token_ref",
    "quantize_per_tensor_ref",
    "quantize_per_block_ref",
    "dequantize_ref",
]

_PER_TENSOR_GROUP = 4096  # per-tensor rows are walked in chunks of this many elements


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _amax_kernel(x_ptr, amax_bits_ptr, n_rows, D, row_stride, group_len, n_groups,
                 BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
                 EVEN: tl.constexpr):
    """Global max |x| for per-tensor scaling.

    |x| >= 0, so its fp32 bit pattern orders like an int32: one integer atomic max per
    program combines the tiles; NaN patterns sort above +Inf, so a NaN wins, as intended.
    """
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows, _, cols, mask = group_tile(pid_r, pid_g, n_rows, D, group_len, n_groups,
                                      BLOCK_R, GROUPS, BLOCK_G, EVEN)
    offs = rows.to(tl.int64)[:, None, None] * row_stride + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tile_max = abs_max(abs_max(abs_max(x, 2), 1), 0)
    tl.atomic_max(amax_bits_ptr, tile_max.to(tl.int32, bitcast=True))


@triton.jit
def _quantize_groups_kernel(
    x_ptr, q_ptr, scale_ptr, amax_bits_ptr,
    n_rows, D, row_stride, group_len, n_groups,
    SHARED_AMAX: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
    EVEN: tl.constexpr, HW_CAST: tl.constexpr,
):
    """One program quantises BLOCK_R rows x GROUPS groups; a group gets one scale.

    Per-token: one group of D elements per row. Per-block: D / block groups per row.
    Per-tensor (SHARED_AMAX): the amax comes from _amax_kernel and program (0, 0)
    stores the single scale.
    """
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows, groups, cols, mask = group_tile(pid_r, pid_g, n_rows, D, group_len, n_groups,
                                           BLOCK_R, GROUPS, BLOCK_G, EVEN)
    rows64 = rows.to(tl.int64)[:, None, None]
    x = tl.load(x_ptr + rows64 * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if SHARED_AMAX:
        amax = tl.load(amax_bits_ptr).to(tl.float32, bitcast=True)
    else:
        amax = abs_max(x, 2)  # [BLOCK_R, GROUPS]
    # IEEE divisions (tl's `/` on fp32 is an approximate division on NVIDIA GPUs)
    scale = tl.math.div_rn(amax, _E4M3_MAX_C)
    scale = tl.where(scale < _FP32_MIN_NORMAL_C, _FP32_MIN_NORMAL_C, scale)  # NaN passes through
    scale = tl.where(amax == 0.0, 1.0, scale)
    inv = tl.math.div_rn(1.0, scale)
    if SHARED_AMAX:
        y = x * inv
    else:
        y = x * inv[:, :, None]
    code = encode_e4m3(saturate(y, _E4M3_MAX_C), HW_CAST)
    tl.store(q_ptr + rows64 * D + cols, code.to(tl.uint8), mask=mask)
    if SHARED_AMAX:
        tl.store(scale_ptr, scale, mask=(pid_r == 0) & (pid_g == 0))
    else:
        s_offs = rows.to(tl.int64)[:, None] * n_groups + groups[None, :]
        s_mask = (rows[:, None] < n_rows) & (groups[None, :] < n_groups)
        tl.store(scale_ptr + s_offs, scale, mask=s_mask)


@triton.jit
def _dequantize_groups_kernel(
    q_ptr, scale_ptr, out_ptr,
    n_rows, D, row_stride, group_len, n_groups, scale_row_stride, scale_group_stride,
    BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
    EVEN: tl.constexpr, OUT_DTYPE: tl.constexpr, HW_CAST: tl.constexpr,
):
    """out = float(q) * scale of the element's group (stride 0 broadcasts a per-tensor scale)."""
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows, groups, cols, mask = group_tile(pid_r, pid_g, n_rows, D, group_len, n_groups,
                                           BLOCK_R, GROUPS, BLOCK_G, EVEN)
    rows64 = rows.to(tl.int64)[:, None, None]
    code = tl.load(q_ptr + rows64 * row_stride + cols, mask=mask, other=0).to(tl.int32)
    s_offs = (rows.to(tl.int64)[:, None] * scale_row_stride
              + groups[None, :].to(tl.int64) * scale_group_stride)
    s_mask = (rows[:, None] < n_rows) & (groups[None, :] < n_groups)
    scale = tl.load(scale_ptr + s_offs, mask=s_mask, other=1.0)
    value = decode_e4m3(code, HW_CAST) * scale[:, :, None]
    tl.store(out_ptr + rows64 * D + cols, cast_out(value, OUT_DTYPE, HW_CAST), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _quantize(x, rows, row_stride, what, *, group_len, scale_shape, shared_amax, out,
              scale_out, hw_cast):
    n_rows, d = rows.shape
    n_groups = triton.cdiv(d, group_len)
    q = output_tensor(out, x.shape, torch.float8_e4m3fn, x.device, f"{what} out")
    scale = output_tensor(scale_out, scale_shape, torch.float32, x.device, f"{what} scale_out")
    if x.numel() == 0:
        return q, scale.fill_(1.0)
    hw = hw_cast_default(x.device) if hw_cast is None else bool(hw_cast)
    tile = tile_config(n_rows, d, group_len, n_groups)
    grid = tile_grid(n_rows, n_groups, tile)
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device) if shared_amax else scale
    if shared_amax:
        _amax_kernel[grid](rows, amax_bits, n_rows, d, row_stride, group_len, n_groups,
                           **tile, **EXACT_FP_OPTIONS)
    _quantize_groups_kernel[grid](
        rows, q.view(torch.uint8), scale, amax_bits,
        n_rows, d, row_stride, group_len, n_groups,
        SHARED_AMAX=shared_amax, HW_CAST=hw, **tile, **EXACT_FP_OPTIONS,
    )
    return q, scale


def _checked_rows(x, what: str, block: int | None = None) -> tuple[torch.Tensor, int]:
    check_float_input(x, what)
    rows, row_stride = as_rows(x, what, block=block)
    check_device(x, what)
    return rows, row_stride


def quantize_per_token(x: torch.Tensor, *, out: torch.Tensor | None = None,
                       scale_out: torch.Tensor | None = None,
                       hw_cast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp32 scale per row of the last dim: q (e4m3fn, x.shape), scale (x.shape[:-1]+(1,)).

    `hw_cast` picks the hardware fp8 conversion (default: where the GPU has one) or the
    bit-exact integer path; both give identical bytes.
    """
    what = "quantize_per_token(x)"
    rows, row_stride = _checked_rows(x, what)
    d = x.shape[-1]
    if d > MAX_ROW_ELEMENTS:
        raise ValueError(
            f"{what}: last dim {d} exceeds {MAX_ROW_ELEMENTS}, the longest row one program "
            "holds; use quantize_per_block for longer rows"
        )
    return _quantize(x, rows, row_stride, what, group_len=d,
                     scale_shape=tuple(x.shape[:-1]) + (1,), shared_amax=False, out=out,
                     scale_out=scale_out, hw_cast=hw_cast)


def quantize_per_block(x: torch.Tensor, block: int = 128, *, out: torch.Tensor | None = None,
                       scale_out: torch.Tensor | None = None,
                       hw_cast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp32 scale per `block` consecutive elements of the last dim.

    Returns q (e4m3fn, x.shape) and scale (x.shape[:-1] + (D // block,)).
    """
    what = "quantize_per_block(x)"
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= MAX_ROW_ELEMENTS:
        raise ValueError(f"{what}: block must be an int in [1, {MAX_ROW_ELEMENTS}], got {block!r}")
    rows, row_stride = _checked_rows(x, what, block=block)
    return _quantize(x, rows, row_stride, what, group_len=block,
                     scale_shape=tuple(x.shape[:-1]) + (x.shape[-1] // block,),
                     shared_amax=False, out=out, scale_out=scale_out, hw_cast=hw_cast)


def quantize_per_tensor(x: torch.Tensor, *, out: torch.Tensor | None = None,
                        scale_out: torch.Tensor | None = None,
                        hw_cast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp32 scale for the whole tensor: q (e4m3fn, x.shape), scale (1,).

    Two launches (global amax, then quantise), no host synchronisation.
    """
    what = "quantize_per_tensor(x)"
    rows, row_stride = _checked_rows(x, what)
    return _quantize(x, rows, row_stride, what, group_len=min(x.shape[-1], _PER_TENSOR_GROUP),
                     scale_shape=(1,), shared_amax=True, out=out, scale_out=scale_out,
                     hw_cast=hw_cast)


def _scale_layout(q: torch.Tensor, scale: torch.Tensor, what: str) -> tuple[int, int, int, int]:
    """(group_len, n_groups, scale_row_stride, scale_group_stride) from the scale's shape.

    (1,) is per-tensor; q.shape[:-1] + (G,) is G groups of D // G per row (G = 1 is
    per-token). Anything else is refused.
    """
    d = q.shape[-1]
    if scale.dim() == 1 and scale.shape[0] == 1:
        return min(d, _PER_TENSOR_GROUP), triton.cdiv(d, min(d, _PER_TENSOR_GROUP)), 0, 0
    if scale.dim() == q.dim() and tuple(scale.shape[:-1]) == tuple(q.shape[:-1]):
        g = scale.shape[-1]
        if g >= 1 and d % g == 0:
            if not scale.is_contiguous():
                raise ValueError(f"{what}: scale must be contiguous, got strides {scale.stride()}")
            return d // g, g, g, 1
    raise ValueError(
        f"{what}: scale shape {tuple(scale.shape)} does not fit q shape {tuple(q.shape)}; "
        "expected (1,) (per-tensor) or q.shape[:-1] + (G,) with G dividing the last dim"
    )


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, *,
               out: torch.Tensor | None = None, hw_cast: bool | None = None) -> torch.Tensor:
    """x_hat = float(q) * scale in `dtype`; the scale layout (per-tensor/token/block) is
    read from its shape."""
    what = "dequantize(q, scale)"
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn:
        found = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"{what}: q must be a torch.float8_e4m3fn tensor, got {found}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        found = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise TypeError(f"{what}: scale must be a float32 tensor, got {found}")
    check_out_dtype(dtype, what)
    check_device(q, what)
    if scale.device != q.device:
        raise ValueError(f"{what}: scale is on {scale.device}, q on {q.device}")
    rows, row_stride = as_rows(q, what)
    group_len, n_groups, s_row, s_group = _scale_layout(q, scale, what)
    result = output_tensor(out, q.shape, dtype, q.device, f"{what} out")
    n_rows, d = rows.shape
    if q.numel() == 0:
        return result
    hw = hw_cast_default(q.device) if hw_cast is None else bool(hw_cast)
    tile = tile_config(n_rows, d, group_len, n_groups)
    _dequantize_groups_kernel[tile_grid(n_rows, n_groups, tile)](
        rows.view(torch.uint8), scale, result,
        n_rows, d, row_stride, group_len, n_groups, s_row, s_group,
        OUT_DTYPE=TL_DTYPES[dtype], HW_CAST=hw, **tile, **EXACT_FP_OPTIONS,
    )
    return result


# --------------------------------------------------------------------------------------
# Torch references (the rule in the module docstring, group by group)
# --------------------------------------------------------------------------------------


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    scale = amax / E4M3_MAX
    scale = torch.where(scale < FP32_MIN_NORMAL, torch.full_like(scale, FP32_MIN_NORMAL), scale)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def _encode(xf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    inv = torch.div(1.0, scale)
    return e4m3_encode_ref(xf * inv)


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = _scale_from_amax(xf.abs().amax(dim=-1, keepdim=True))
    return _encode(xf, scale), scale


def quantize_per_tensor_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = _scale_from_amax(xf.abs().amax().reshape(1))
    return _encode(xf, scale), scale


def quantize_per_block_ref(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    if d % block != 0:
        raise ValueError(f"last dim {d} is not a multiple of the block size {block}")
    xf = x.float().reshape(*x.shape[:-1], d // block, block)
    scale = _scale_from_amax(xf.abs().amax(dim=-1, keepdim=True))
    return _encode(xf, scale).reshape(x.shape), scale.squeeze(-1)


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qf = q.float()
    if scale.dim() == q.dim() and scale.shape[-1] > 1:
        scale = scale.repeat_interleave(q.shape[-1] // scale.shape[-1], dim=-1)
    return (qf * scale).to(dtype)
