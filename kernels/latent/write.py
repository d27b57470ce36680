"""Fused latent KV write: kv_norm + GPT-J RoPE + FP8 quantise + paged write, one kernel,
for the three layouts of ``layouts`` (any block size, any slot mapping: ragged batches are
token lists with their slots; slot -1 skips a token).

Quantisation rules (identical in kernel and reference):
  lab:    one group of 512 values (nope and RoPE'd dims), scale = amax / 448 (IEEE
          division; 0 -> 1), q = e4m3(sat(y / scale)), the fp32 scale stored;
  v32:    groups of 128 of the 512 nope dims, model1: groups of 64 of the 448 nope dims;
          scale = the smallest power of two >= max(amax / 448, 1e-4) (exact: no log2),
          q = e4m3(sat(y / scale)) (exact division: a power of two); v32 stores the scale
          as fp32, model1 as its UE8M0 exponent byte (code = log2(scale) + 127) and a zero
          pad byte; the RoPE dims are stored as bf16 (round to nearest even).
A NaN in a group makes its scale NaN (E8M0 0xFF), so the group dequantises to NaN.
The values quantised are float32 (the norm and RoPE results are not rounded to bf16 first).
The reference writes through torch views of the cache built from the layout description;
the kernel computes byte offsets. The E4M3 / bf16 casts are the project's bit-exact
encoders (``formats.codecs``): the hardware conversion on an FP8 GPU, integer code elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvperf_kernels.device import sm_count
from kvperf_kernels.formats.checks import (
    QUANT_INPUT_DTYPES,
    check_device,
    check_flag,
    check_int,
    check_same_device,
    check_scale_value,
    check_tensor,
    use_hw_cast,
)
from kvperf_kernels.formats.codecs import (
    IEEE_SUBNORMALS,
    cast_out,
    e4m3_encode_ref,
    e8m0_decode_ref,
    e8m0_encode_ref,
    encode_e4m3,
    encode_e8m0,
    saturate,
)
from kvperf_kernels.latent.layouts import (
    D_NORM,
    D_ROPE,
    INDEX_DTYPES,
    LatentLayout,
    check_cache,
    check_slots,
    get_layout,
)
from kvperf_kernels.latent.norm_rope import (
    RMS_EPS,
    eps_f32,
    kv_norm_rope_ref,
    rope_pairs,
    rstd_from_parts,
    tile_amax_bits,
)
from kvperf_kernels.quant.fp8 import div_rn_by_scale

E4M3_MAX = 448.0
POW2_SCALE_FLOOR = 1e-4  # FlashMLA's amax margin: the scale is at least 2^-13
SCALE_KINDS = {"amax": 0, "pow2": 1, "ue8m0": 2}
_NORM_D = tl.constexpr(D_NORM)  # globals a @triton.jit body reads must be constexpr
_HALF = tl.constexpr(D_ROPE // 2)

__all__ = ["WRITE_SWEEP", "WriteLaunch", "latent_write", "latent_write_ref",
           "quantize_latent_ref", "cache_views"]


@dataclass(frozen=True)
class WriteLaunch:
    """Launch parameters of the write kernel.

    num_warps: Triton's: 1, 2 or 4. A token's norm, amax and scale reductions cross the
        program's warps through shared memory (a barrier each) unless it is one warp, and
        one-warp programs reside 32 to an SM (4-warp ones 16). On the H200 one warp was
        2.0-2.5x faster than four for every layout at 16K and 128K tokens (v32 128K: 149.6
        vs 332.8 us), two 1.5-1.6x; test_write_speed times the others beside the default.
        8 warps is refused: it stored wrong RoPE bytes for the lab layout there (95 of
        49,536 bytes, Triton 3.6) and was 1.8x slower than four.
    programs_per_sm: None launches one program per token, at most 32 tokens (programs) in
        flight per SM; one warp's v32 128K-token write reaches 0.44 of the copy peak on the
        H200, bound by instructions (ncu: SM 74 %, DRAM 37 %), not by its loads (starting
        them before the slot is known gained 2 %). An int launches
        that many programs per SM, each looping over tokens, so that the next token's loads
        are issued while one computes (num_stages: Triton's loop pipelining depth; offline
        for sm90 the loop's x loads become cp.async copies).
    """

    num_warps: int = 1
    programs_per_sm: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        w = check_int(self.num_warps, "WriteLaunch.num_warps", 1)
        if w not in (1, 2, 4):
            raise ValueError(f"WriteLaunch.num_warps must be 1, 2 or 4, got {w!r}")
        if self.programs_per_sm is not None:
            check_int(self.programs_per_sm, "WriteLaunch.programs_per_sm", 1)
        check_int(self.num_stages, "WriteLaunch.num_stages", 1)


# the launches test_write_speed times beside the default (their bytes checked on the GPU)
WRITE_SWEEP = {"warps2": WriteLaunch(num_warps=2), "warps4": WriteLaunch(num_warps=4),
               "loop16": WriteLaunch(programs_per_sm=16),
               "loop32s3": WriteLaunch(programs_per_sm=32, num_stages=3)}


# --------------------------------------------------------------------------------------
# Torch references, written from the layout description
# --------------------------------------------------------------------------------------

def cache_views(cache: torch.Tensor, layout: LatentLayout, block_size: int) -> dict:
    """Views [num_blocks, block_size, ...] of a cache's fields (writes go through):
    fp8 (uint8 codes), scale (float32 values, or uint8 UE8M0 codes for model1), rope (bf16,
    v32 / model1), pad (model1's footer byte)."""
    nb = cache.shape[0]
    rows_end = (block_size + layout.spare_rows) * layout.row_bytes
    rows = cache[:, :rows_end].view(nb, block_size + layout.spare_rows, layout.row_bytes)
    rows = rows[:, :block_size]
    views = {"fp8": rows[..., :layout.d_fp8]}
    if layout.name == "lab":
        views["scale"] = rows[..., 512:516].view(torch.float32)
    elif layout.name == "v32":
        views["scale"] = rows[..., 512:528].view(torch.float32)
        views["rope"] = rows[..., 528:656].view(torch.bfloat16)
    else:  # model1: rows of [448 e4m3][64 bf16], then footers of [7 ue8m0][pad]
        views["rope"] = rows[..., 448:576].view(torch.bfloat16)
        footer = cache[:, rows_end:rows_end + 8 * block_size].view(nb, block_size, 8)
        views["scale"] = footer[..., :7]
        views["pad"] = footer[..., 7]
    return views


def quantize_latent_ref(y: torch.Tensor, layout: LatentLayout) -> dict:
    """The stored fields of float32 tokens y [T, d_in] (after norm and RoPE):
    fp8 codes uint8 [T, d_fp8], scale [T, num_tiles] (float32, or uint8 UE8M0 codes),
    rope bf16 [T, 64] (v32 / model1)."""
    t = y.shape[0]
    tiles = y[:, :layout.d_fp8].float().reshape(t, layout.num_tiles, layout.tile)
    amax = tiles.abs().amax(dim=-1)
    # a tensor divisor: torch's CUDA division by a Python scalar multiplies by its rounded
    # reciprocal (one bit off amax / 448, the kernel's IEEE quotient)
    s = amax / torch.full_like(amax, E4M3_MAX)
    if layout.scale_kind == "amax":
        scale = torch.where(s == 0, torch.ones_like(s), s)
        stored = scale
    else:
        s = torch.where(s < POW2_SCALE_FLOOR, torch.full_like(s, POW2_SCALE_FLOOR), s)
        code = e8m0_encode_ref(s)  # the smallest power of two >= s, exactly
        scale = e8m0_decode_ref(code)
        stored = scale if layout.scale_kind == "pow2" else code
    codes = e4m3_encode_ref(tiles / scale[..., None]).view(torch.uint8).reshape(t, -1)
    fields = {"fp8": codes, "scale": stored}
    if not layout.rope_fp8:
        fields["rope"] = y[:, layout.rope_in:layout.rope_in + D_ROPE].to(torch.bfloat16)
    return fields


def latent_write_ref(x, kv_norm_weight, positions, cos_sin, slot_mapping, cache, *,
                     layout, block_size: int, eps: float = RMS_EPS) -> torch.Tensor:
    """What latent_write stores, in torch (same checks); returns the cache."""
    layout = get_layout(layout)
    _check_write_inputs(x, kv_norm_weight, positions, cos_sin, slot_mapping, cache, layout,
                        block_size, eps, checked=True, kernel=False)
    valid = slot_mapping >= 0
    if not valid.any():
        return cache
    y = kv_norm_rope_ref(x[valid], kv_norm_weight, positions[valid], cos_sin, layout, eps)
    fields = quantize_latent_ref(y, layout)
    slots = slot_mapping[valid].long()
    blk, off = slots // block_size, slots % block_size
    views = cache_views(cache, layout, block_size)
    views["fp8"][blk, off] = fields["fp8"]
    views["scale"][blk, off] = fields["scale"]
    if "rope" in fields:
        views["rope"][blk, off] = fields["rope"]
    if "pad" in views:
        views["pad"][blk, off] = 0
    return cache


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------

@triton.jit
def _store_bytes(ptr, value, mask, NBYTES: tl.constexpr):
    """Store the low NBYTES bytes of int32 ``value`` [N] little-endian at ptr [N] + 0..NBYTES-1."""
    j = tl.arange(0, NBYTES)[None, :]
    b = (value[:, None] >> (8 * j)) & 0xFF
    tl.store(ptr[:, None] + j, b.to(tl.uint8), mask=mask[:, None] & (j < NBYTES))


@triton.jit
def _write_token(
    t, x_ptr, x_stride, w_ptr, pos_ptr, cs_ptr, cs_stride, max_pos, slot_ptr, cache_ptr,
    eps, block_size, block_bytes, n_tokens,
    D_NOPE: tl.constexpr, TILE: tl.constexpr, NT: tl.constexpr, NT_PAD: tl.constexpr,
    ROPE_IN: tl.constexpr, NORM_ROPE: tl.constexpr, ROPE_FP8: tl.constexpr,
    SCALE_KIND: tl.constexpr, ROW_BYTES: tl.constexpr, SCALE_ROW_OFF: tl.constexpr,
    ROPE_ROW_OFF: tl.constexpr, FOOTER_BYTES: tl.constexpr, HW_CAST: tl.constexpr,
    NARROW_IN: tl.constexpr,
):
    """Token t (int64; none at t >= n_tokens): norm, RoPE, quantise, write its row (and
    footer). Only the stores wait for the slot: the loads need t alone (a token past the
    end reads the last one's rows and writes nothing), so the slot, position and x row are
    fetched together and the cos/sin rows wait only for the position."""
    slot = tl.load(slot_ptr + t, mask=t < n_tokens, other=-1).to(tl.int64)
    src = tl.minimum(t, n_tokens - 1)
    # clamped: a skipped token's position is never checked, and its rows are never used
    pos = tl.minimum(tl.maximum(tl.load(pos_ptr + src).to(tl.int64), 0), max_pos - 1)
    row_x = x_ptr + src * x_stride
    tile = tl.arange(0, NT_PAD)
    d = tile[:, None] * TILE + tl.arange(0, TILE)[None, :]  # [NT_PAD, TILE] nope dims
    nope = (d < D_NOPE) & (tile[:, None] < NT)
    xn = tl.load(row_x + d, mask=nope, other=0.0).to(tl.float32)
    i = tl.arange(0, _HALF)
    xe = tl.load(row_x + ROPE_IN + 2 * i).to(tl.float32)
    xo = tl.load(row_x + ROPE_IN + 2 * i + 1).to(tl.float32)
    wn = tl.load(w_ptr + d, mask=nope, other=0.0).to(tl.float32)
    if NORM_ROPE:
        rstd = rstd_from_parts(xn, xe, xo, eps, _NORM_D, NARROW_IN)
        ye = (xe * rstd) * tl.load(w_ptr + ROPE_IN + 2 * i).to(tl.float32)
        yo = (xo * rstd) * tl.load(w_ptr + ROPE_IN + 2 * i + 1).to(tl.float32)
    else:  # v32: k_pe after the 512 normalised dims, not normalised
        rstd = rstd_from_parts(xn, tl.zeros_like(xe), tl.zeros_like(xo), eps, _NORM_D,
                               NARROW_IN)
        ye, yo = xe, xo
    yn = (xn * rstd) * wn
    cos = tl.load(cs_ptr + pos * cs_stride + i)
    sin = tl.load(cs_ptr + pos * cs_stride + _HALF + i)
    re, ro = rope_pairs(ye, yo, cos, sin)

    amax_bits = tl.max(yn.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)  # [NT_PAD]
    if ROPE_FP8:  # lab: the RoPE'd dims share the one scale
        rope_bits = tl.maximum(tile_amax_bits(re), tile_amax_bits(ro))
        amax_bits = tl.maximum(amax_bits, rope_bits)
    amax = amax_bits.to(tl.float32, bitcast=True)
    s = tl.math.div_rn(amax, 448.0)
    if SCALE_KIND == 0:
        scale = tl.where(s == 0.0, 1.0, s)
        q = saturate(div_rn_by_scale(yn, scale[:, None]), 448.0)
        stored_bits = scale.to(tl.int32, bitcast=True)
    else:
        s = tl.where(s < 1e-4, 1e-4, s)  # NaN stays NaN
        code = encode_e8m0(s)
        scale = tl.where(code == 255, float("nan"),
                         (code << 23).to(tl.float32, bitcast=True))
        # 1 / scale exactly (2^-127 for code 254 is an fp32 subnormal)
        recip = tl.where(code < 254, (254 - code) << 23, 0x00400000).to(tl.float32,
                                                                      bitcast=True)
        q = saturate(yn * recip[:, None], 448.0)
        q = tl.where((code == 255)[:, None], float("nan"), q)
        if SCALE_KIND == 1:
            stored_bits = scale.to(tl.int32, bitcast=True)
        else:
            stored_bits = code
    codes = encode_e4m3(q, HW_CAST)

    if slot >= 0:  # the stores alone wait for the slot
        blk = slot // block_size
        off = slot % block_size
        row = cache_ptr + blk * block_bytes + off * ROW_BYTES
        tl.store(row + d, codes.to(tl.uint8), mask=nope)
        if ROPE_FP8:
            ce = encode_e4m3(saturate(tl.reshape(div_rn_by_scale(re[None, :], scale[:, None]),
                                                 [_HALF]), 448.0), HW_CAST)
            co = encode_e4m3(saturate(tl.reshape(div_rn_by_scale(ro[None, :], scale[:, None]),
                                                 [_HALF]), 448.0), HW_CAST)
            _store_bytes(row + D_NOPE + 2 * i, ce | (co << 8), i >= 0, 2)
        else:
            be = cast_out(re, tl.bfloat16, HW_CAST).to(tl.int16, bitcast=True).to(tl.int32)
            bo = cast_out(ro, tl.bfloat16, HW_CAST).to(tl.int16, bitcast=True).to(tl.int32)
            _store_bytes(row + ROPE_ROW_OFF + 4 * i, (be & 0xFFFF) | (bo << 16), i >= 0, 4)
        if FOOTER_BYTES == 0:  # fp32 scales in the row
            _store_bytes(row + SCALE_ROW_OFF + 4 * tile, stored_bits, tile < NT, 4)
        else:  # model1: UE8M0 codes then a zero pad byte in the block's footer
            foot = cache_ptr + blk * block_bytes + block_size * ROW_BYTES + off * FOOTER_BYTES
            tl.store(foot + tile, tl.where(tile < NT, stored_bits, 0).to(tl.uint8),
                     mask=tile < FOOTER_BYTES)


@triton.jit
def _latent_write_kernel(
    x_ptr, x_stride, w_ptr, pos_ptr, cs_ptr, cs_stride, max_pos, slot_ptr, cache_ptr, eps,
    block_size, block_bytes, n_tokens,
    D_NOPE: tl.constexpr, TILE: tl.constexpr, NT: tl.constexpr, NT_PAD: tl.constexpr,
    ROPE_IN: tl.constexpr, NORM_ROPE: tl.constexpr, ROPE_FP8: tl.constexpr,
    SCALE_KIND: tl.constexpr, ROW_BYTES: tl.constexpr, SCALE_ROW_OFF: tl.constexpr,
    ROPE_ROW_OFF: tl.constexpr, FOOTER_BYTES: tl.constexpr, HW_CAST: tl.constexpr,
    NARROW_IN: tl.constexpr, TOKEN_LOOP: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One token per program, or (TOKEN_LOOP) a grid-stride loop over the tokens whose
    next token's loads the compiler may issue while this one computes (NUM_STAGES)."""
    if TOKEN_LOOP:
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0)
        # the same trip count in every program; a token past the end reads slot -1 (skip)
        for i in tl.range(0, tl.cdiv(n_tokens, step), num_stages=NUM_STAGES):
            _write_token(pid + i * step, x_ptr, x_stride, w_ptr, pos_ptr, cs_ptr, cs_stride,
                         max_pos, slot_ptr, cache_ptr, eps, block_size, block_bytes, n_tokens,
                         D_NOPE, TILE, NT, NT_PAD, ROPE_IN, NORM_ROPE, ROPE_FP8, SCALE_KIND,
                         ROW_BYTES, SCALE_ROW_OFF, ROPE_ROW_OFF, FOOTER_BYTES, HW_CAST,
                         NARROW_IN)
    else:
        _write_token(tl.program_id(0).to(tl.int64), x_ptr, x_stride, w_ptr, pos_ptr, cs_ptr,
                     cs_stride, max_pos, slot_ptr, cache_ptr, eps, block_size, block_bytes,
                     n_tokens, D_NOPE, TILE, NT, NT_PAD, ROPE_IN, NORM_ROPE, ROPE_FP8, SCALE_KIND,
                     ROW_BYTES, SCALE_ROW_OFF, ROPE_ROW_OFF, FOOTER_BYTES, HW_CAST, NARROW_IN)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------

def _check_write_inputs(x, weight, positions, cos_sin, slot_mapping, cache, layout,
                        block_size, eps, *, checked: bool, kernel: bool = True) -> None:
    num_blocks = check_cache(cache, layout, block_size, kernel=kernel)
    check_tensor(x, "x", QUANT_INPUT_DTYPES, dim=2)
    if x.shape[1] != layout.d_in:
        raise ValueError(f"x: layout {layout.name!r} takes [T, {layout.d_in}] latents, got "
                         f"shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x: last dim must be contiguous (stride 1), got stride {x.stride(1)}")
    if kernel:
        check_device(x, "x")
    check_same_device(x, "x", cache, "cache")
    check_tensor(weight, "kv_norm_weight", QUANT_INPUT_DTYPES, dim=1)
    if weight.shape[0] != D_NORM or not weight.is_contiguous():
        raise ValueError(f"kv_norm_weight must be a contiguous [{D_NORM}] tensor, got shape "
                         f"{tuple(weight.shape)}")
    check_same_device(weight, "kv_norm_weight", cache, "cache")
    check_tensor(cos_sin, "cos_sin", (torch.float32,), dim=2)
    if cos_sin.shape[1] != D_ROPE or cos_sin.stride(1) != 1:
        raise ValueError(f"cos_sin must be float32 [max_position, {D_ROPE}] with a contiguous "
                         f"last dim, got shape {tuple(cos_sin.shape)}")
    check_same_device(cos_sin, "cos_sin", cache, "cache")
    t = x.shape[0]
    check_tensor(positions, "positions", INDEX_DTYPES, dim=1)
    if positions.shape[0] != t:
        raise ValueError(f"positions must have {t} entries (x's tokens), got shape "
                         f"{tuple(positions.shape)}")
    check_same_device(positions, "positions", cache, "cache")
    check_slots(slot_mapping, "slot_mapping", t, num_blocks * block_size, cache,
                checked=checked)
    check_scale_value(eps, "eps")
    if checked and t:
        lo, hi = torch.aminmax(positions)
        if int(lo) < 0 or int(hi) >= cos_sin.shape[0]:
            raise ValueError(f"positions must be in [0, {cos_sin.shape[0]}) (cos_sin's rows), "
                             f"got min {int(lo)} max {int(hi)}")


def latent_write(x, kv_norm_weight, positions, cos_sin, slot_mapping, cache, *, layout,
                 block_size: int, eps: float = RMS_EPS, hw_cast: bool | None = None,
                 checked: bool = True, launch: WriteLaunch = WriteLaunch()) -> torch.Tensor:
    """Normalise, rotate, quantise and store tokens x [T, layout.d_in] (bf16/fp16/fp32) in
    ``cache`` at ``slot_mapping`` [T] (-1: skip); RoPE at ``positions`` [T] from ``cos_sin``
    (float32 [max_position, 64]). Returns the cache (written in place).

    ``checked`` (default) verifies slots and positions (one sync); timed calls pass False.
    """
    layout = get_layout(layout)
    check_flag(checked, "checked")
    if not isinstance(launch, WriteLaunch):
        raise TypeError(f"launch must be a WriteLaunch, got {type(launch).__name__}")
    _check_write_inputs(x, kv_norm_weight, positions, cos_sin, slot_mapping, cache, layout,
                        block_size, eps, checked=bool(checked))
    t = x.shape[0]
    if t == 0:
        return cache
    nt = layout.d_nope // layout.tile if not layout.rope_fp8 else 1
    tile = layout.tile if not layout.rope_fp8 else triton.next_power_of_2(layout.d_nope)
    programs = t if launch.programs_per_sm is None else min(
        t, launch.programs_per_sm * sm_count(cache.device))
    _latent_write_kernel[(programs,)](
        x, x.stride(0), kv_norm_weight, positions, cos_sin, cos_sin.stride(0), cos_sin.shape[0],
        slot_mapping, cache, eps_f32(eps), block_size, layout.block_bytes(block_size), t,
        D_NOPE=layout.d_nope, TILE=tile, NT=nt, NT_PAD=triton.next_power_of_2(nt),
        ROPE_IN=layout.rope_in, NORM_ROPE=layout.norm_rope, ROPE_FP8=layout.rope_fp8,
        SCALE_KIND=SCALE_KINDS[layout.scale_kind], ROW_BYTES=layout.row_bytes,
        SCALE_ROW_OFF=layout.scale_row_off, ROPE_ROW_OFF=layout.rope_row_off,
        FOOTER_BYTES=layout.footer_bytes, HW_CAST=use_hw_cast(cache.device, hw_cast),
        NARROW_IN=x.dtype != torch.float32,  # bf16 / fp16: squares exact in float32
        TOKEN_LOOP=launch.programs_per_sm is not None, NUM_STAGES=launch.num_stages,
        num_warps=launch.num_warps, **IEEE_SUBNORMALS,
    )
    return cache
