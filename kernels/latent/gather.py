"""Gather and dequantise latent tokens from a paged cache of any layout.

``latent_gather(cache, slots, layout=, block_size=)`` returns [N, layout.d_in]: the E4M3
values times their scale (float32 products: exact for the power-of-two layouts), the bf16
RoPE dims as stored (v32 / model1), rounded once to ``out_dtype``. Slot -1 gives a row of
zeros (the padding of a top-k list). The reference reads the same bytes through the
layout's torch views (``write.cache_views``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.formats.checks import check_flag, check_out_dtype, use_hw_cast
from kvperf_kernels.formats.codecs import cast_out, decode_e4m3, e8m0_decode_ref
from kvperf_kernels.latent.layouts import D_ROPE, check_cache, check_slots, get_layout
from kvperf_kernels.latent.write import SCALE_KINDS, cache_views

__all__ = ["latent_gather", "latent_gather_ref"]

_HALF = tl.constexpr(D_ROPE // 2)


def latent_gather_ref(cache, slots, *, layout, block_size: int,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantised tokens [N, d_in] at slots [N] (-1: zeros), from the layout's views."""
    layout = get_layout(layout)
    num_blocks = check_cache(cache, layout, block_size, kernel=False)
    check_out_dtype(out_dtype, "out_dtype")
    check_slots(slots, "slots", slots.shape[0] if torch.is_tensor(slots) else -1,
                num_blocks * block_size, cache)
    n = slots.shape[0]
    valid = slots >= 0
    s = torch.where(valid, slots, torch.zeros_like(slots)).long()
    blk, off = s // block_size, s % block_size
    views = cache_views(cache, layout, block_size)
    codes = views["fp8"][blk, off].contiguous().view(torch.float8_e4m3fn).float()
    scale = views["scale"][blk, off]
    if layout.scale_kind == "ue8m0":
        scale = e8m0_decode_ref(scale)
    out = torch.zeros(n, layout.d_in, dtype=torch.float32, device=cache.device)
    tiles = codes.reshape(n, layout.num_tiles, layout.tile) * scale.reshape(n, -1, 1)
    out[:, :layout.d_fp8] = tiles.reshape(n, -1)
    if not layout.rope_fp8:
        out[:, layout.rope_in:] = views["rope"][blk, off].float()
    out[~valid] = 0.0
    return out.to(out_dtype)


@triton.jit
def _load_bytes(ptr, mask, NBYTES: tl.constexpr):
    """int32 [N] from the NBYTES little-endian bytes at ptr [N] + 0..NBYTES-1."""
    j = tl.arange(0, NBYTES)[None, :]
    b = tl.load(ptr[:, None] + j, mask=mask[:, None], other=0).to(tl.int32)
    return tl.sum(b << (8 * j), axis=1)


@triton.jit
def _latent_gather_kernel(
    cache_ptr, slot_ptr, out_ptr, out_stride, block_size, block_bytes,
    D_FP8: tl.constexpr, TILE: tl.constexpr, NT: tl.constexpr, NT_PAD: tl.constexpr,
    ROPE_FP8: tl.constexpr, SCALE_KIND: tl.constexpr, ROW_BYTES: tl.constexpr,
    SCALE_ROW_OFF: tl.constexpr, ROPE_ROW_OFF: tl.constexpr, FOOTER_BYTES: tl.constexpr,
    HW_CAST: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    valid = slot >= 0
    slot = tl.where(valid, slot, 0)
    blk = slot // block_size
    off = slot % block_size
    row = cache_ptr + blk * block_bytes + off * ROW_BYTES
    tile = tl.arange(0, NT_PAD)
    d = tile[:, None] * TILE + tl.arange(0, TILE)[None, :]
    m = (d < D_FP8) & (tile[:, None] < NT)
    code = tl.load(row + d, mask=m, other=0).to(tl.int32)
    if FOOTER_BYTES == 0:
        bits = _load_bytes(row + SCALE_ROW_OFF + 4 * tile, tile < NT, 4)
        scale = bits.to(tl.float32, bitcast=True)
    else:
        foot = cache_ptr + blk * block_bytes + block_size * ROW_BYTES + off * FOOTER_BYTES
        e = tl.load(foot + tile, mask=tile < NT, other=127).to(tl.int32)
        scale = tl.where(e == 255, float("nan"), (e << 23).to(tl.float32, bitcast=True))
        # code 0 is 2^-127, an fp32 subnormal
        scale = tl.where(e == 0, 5.877471754111438e-39, scale)
    value = decode_e4m3(code, HW_CAST) * scale[:, None]
    value = tl.where(valid, value, 0.0)
    out_row = out_ptr + n * out_stride
    tl.store(out_row + d, cast_out(value, out_ptr.dtype.element_ty, HW_CAST), mask=m)
    if not ROPE_FP8:
        i = tl.arange(0, _HALF)
        pair = _load_bytes(row + ROPE_ROW_OFF + 4 * i, i >= 0, 4)
        re = (pair << 16).to(tl.float32, bitcast=True)  # bf16 -> fp32: the high half
        ro = (pair & -65536).to(tl.float32, bitcast=True)
        re = tl.where(valid, re, 0.0)
        ro = tl.where(valid, ro, 0.0)
        tl.store(out_row + D_FP8 + 2 * i, cast_out(re, out_ptr.dtype.element_ty, HW_CAST))
        tl.store(out_row + D_FP8 + 2 * i + 1, cast_out(ro, out_ptr.dtype.element_ty, HW_CAST))


def latent_gather(cache, slots, *, layout, block_size: int,
                  out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
                  hw_cast: bool | None = None, checked: bool = True) -> torch.Tensor:
    """Dequantised tokens [N, layout.d_in] at ``slots`` [N] (-1: zeros) of ``cache``.

    ``out`` (optional, [N, d_in] of out_dtype, last dim contiguous) receives the result;
    ``checked`` (default) verifies the slots (one sync).
    """
    layout = get_layout(layout)
    check_flag(checked, "checked")
    num_blocks = check_cache(cache, layout, block_size)
    check_out_dtype(out_dtype, "out_dtype")
    n = slots.shape[0] if torch.is_tensor(slots) and slots.dim() == 1 else -1
    check_slots(slots, "slots", n, num_blocks * block_size, cache, checked=bool(checked))
    if out is None:
        out = torch.empty(n, layout.d_in, dtype=out_dtype, device=cache.device)
    elif (not torch.is_tensor(out) or out.shape != (n, layout.d_in) or out.dtype != out_dtype
          or out.stride(1) != 1 or out.device != cache.device):
        raise ValueError(f"out must be a [{n}, {layout.d_in}] {out_dtype} tensor with a "
                         f"contiguous last dim on {cache.device}")
    if n == 0:
        return out
    nt = layout.num_tiles
    _latent_gather_kernel[(n,)](
        cache, slots, out, out.stride(0), block_size, layout.block_bytes(block_size),
        D_FP8=layout.d_fp8, TILE=layout.tile, NT=nt, NT_PAD=triton.next_power_of_2(nt),
        ROPE_FP8=layout.rope_fp8, SCALE_KIND=SCALE_KINDS[layout.scale_kind],
        ROW_BYTES=layout.row_bytes, SCALE_ROW_OFF=layout.scale_row_off,
        ROPE_ROW_OFF=layout.rope_row_off,
        FOOTER_BYTES=layout.footer_bytes, HW_CAST=use_hw_cast(cache.device, hw_cast),
        num_warps=4,
    )
    return out
