"""Split-KV paged decode attention with attention sinks (Triton), for GQA models like gpt-oss.

One query token per sequence attends to its paged KV cache (see ``kvperf_kernels.cache.paged_kv``
for the layout). Sink semantics are FlashInfer's (AttentionSink variant / ``sinks=``):
the sink is one natural-log logit per query head that joins the softmax denominator
exactly once, with a zero value row and no sm_scale or k_scale applied:

    out_h = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink_h)),   s_j = sm_scale * q_h . k_j

Sliding window as FlashInfer: ``window_left = w >= 0`` attends to the last w+1 tokens
(the current one included); -1 attends to all.

Design:
- one program per (sequence, HP KV heads, split) handles all Hq/Hkv query heads of its KV
  heads, so each KV byte is read from memory once (the kernel is bandwidth bound); HP
  KV heads side by side (2 at D 64) make a token's tile whole 128-byte lines in FP8, and
  heads vary fastest in the grid, so the programs reading one token's row run together;
- FP8 KV (float8_e4m3fn; float8_e4m3fnuz decoded from its bits, max 240) is decoded in
  registers to float16 (exact for E4M3; one packed convert per two bytes, where bfloat16
  needs a second convert per element) and fed to the tensor cores with a bf16 query
  rescaled per head into float16 range by a power of two (exact); per-tensor scales fold
  into the score / output multipliers, per-token scales scale score columns (K) and
  probability columns (V, relative to a running power of two so p * scale fits float16);
- MXFP8 and NVFP4 KV (K and V each in its own format, e.g. K FP8 + V NVFP4) are decoded
  in registers too, tile by tile as [tokens, groups, group] so each block scale is one
  load broadcast over its group (``_load_block_tile``): MXFP8 codes times their E8M0
  power of two relative to the token's largest (the rest is a per-token scale, as for
  FP8), NVFP4 E2M1 nibbles times their E4M3 block scale, exact in float16 (the global
  scale folds into the score / output multiplier);
- P enters the P.V product as a 16-bit value, plus its 16-bit rounding residue where one
  rounding would show in the output (``precise_pv``: bf16 P, or a float16 output);
- a tile's page ids load in the tile or a tile ahead (``DecodeLaunch.ids_ahead``): in the
  tile they sit in its K/V address chain, where Triton's pipeliner spends a stage on them
  (every wait then drains the copies in flight); a tile ahead, the K/V copies run
  num_stages - 1 tiles ahead (``sm_compile_report`` reads the depth offline);
- split-KV: a sequence's (windowed) range is cut into ``num_splits`` chunks; each writes
  an unnormalised partial (acc, running max, running sum) and a merge kernel combines
  them by log-sum-exp, adding the sink there, once. With one split the decode kernel
  normalises and adds the sink itself. The default split count fills the SMs with one
  wave of resident programs.

H100 (gpt-oss shapes, batch 64, Hq 64, Hkv 8, D 64, page 16): FP8 KV with sinks at kv 8192
reads 537 MB in ~205 us (2.6 TB/s, 0.87 of the 3.0 TB/s copy bandwidth), BF16 1074 MB
in ~368 us; see suites/sinks/tune_decode.py for the sweep.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvperf_kernels.attention.offline_compile import compile_offline, in_child, prefetch_depth
from kvperf_kernels.cache.paged_kv import check_table_stats, table_stats
from kvperf_kernels.device import interpreted, sm_count
from kvperf_kernels.formats.checks import (
    check_device,
    check_flag,
    check_int,
    check_same_device,
    check_scale_value,
    check_tensor,
)

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
MAX_SPLITS = 128
_FP8_QUERY_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
_E4M3FNUZ = getattr(torch, "float8_e4m3fnuz", None)
# KV formats the kernel decodes (constexprs K_FORMAT, V_FORMAT: each side its own, so a K FP8
# + V NVFP4 cache is one kernel): 16-bit, FP8 (fn / fnuz), MXFP8 (E4M3 codes with an E8M0
# scale per 32 along head_dim), NVFP4 (E2M1 pairs, an E4M3 scale per 16, a global scale).
_KV_16BIT, _KV_E4M3FN, _KV_E4M3FNUZ, _KV_MXFP8, _KV_NVFP4 = 0, 1, 2, 3, 4
KV_FORMAT_NAMES = {_KV_16BIT: "16bit", _KV_E4M3FN: "fp8_e4m3fn", _KV_E4M3FNUZ: "fp8_e4m3fnuz",
                   _KV_MXFP8: "mxfp8", _KV_NVFP4: "nvfp4"}
MX_BLOCK, NVFP4_BLOCK = 32, 16
# How a scale reaches the kernel (constexpr *_SCALE_MODE).
_SCALE_SCALAR, _SCALE_TENSOR1, _SCALE_PER_TOKEN = 0, 1, 2


@triton.jit
def _e4m3fn_bytes_to_f16(raw, OPAQUE: tl.constexpr):
    """float8_e4m3fn bytes (uint8) -> float16, exactly (one packed convert per two bytes)."""
    if OPAQUE:
        # The same PTX convert Triton emits, but in an impure asm block, which Triton does not
        # hoist past the layout conversion to the dot operand: the tile is decoded where it
        # was loaded and reaches the MMA as float16 through ldmatrix. Hoisted (the plain
        # cast), V's operand is gathered one byte at a time from shared memory, because P.V
        # needs V transposed and there is no 8-bit transposing ldmatrix on sm90.
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b16 lo, hi;
            mov.b32 {lo, hi}, $2;
            cvt.rn.f16x2.e4m3x2 $0, lo;
            cvt.rn.f16x2.e4m3x2 $1, hi;
            }""",
            constraints="=r,=r,r", args=[raw], dtype=tl.float16, is_pure=False, pack=4,
        )
    else:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float16)


@triton.jit
def load_kv_tile(ptr, offs, mask, KV_FORMAT: tl.constexpr, TILE: tl.constexpr,
                  OPAQUE: tl.constexpr, NAN_PATCH: tl.constexpr):
    """Load a [BLOCK_N, D] KV tile as TILE (16-bit). FP8 goes to float16, which holds every
    E4M3 value exactly and is one packed hardware convert per two bytes on sm89+ (bfloat16
    would take an extra per-element convert: that was the FP8 kernel's bottleneck).
    OPAQUE (FP8 only, GPU only): decode before the dot-operand layout conversion.
    NAN_PATCH (the CPU interpreter): E4M3 NaN codes made NaN by hand; Triton 3.9's
    interpreter decodes +-0x7F as +-480, so a poisoned FP8 byte would read as a number."""
    if KV_FORMAT == 0:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(TILE)
    else:
        raw = tl.load(ptr + offs, mask=mask, other=0)  # uint8 (the launcher passes bytes)
        x = _e4m3_codes_to_f16(raw, OPAQUE, NAN_PATCH)
        if KV_FORMAT == 2:
            # e4m3fnuz (bias 8, max 240, NaN only at 0x80) decoded as e4m3fn (bias 7) is
            # twice its value (the kernel folds the 1/2 into the scales); patch the codes
            # where the formats differ: +-0x7F (NaN in fn, +-240 in fnuz), 0x80 (-0 / NaN).
            x = tl.where((raw & 0x7F) == 0x7F, tl.where(raw >= 128, -480.0, 480.0), x)
            x = tl.where(raw == 0x80, float("nan"), x)
        return x.to(TILE)


@triton.jit
def _e4m3_codes_to_f16(raw, OPAQUE: tl.constexpr, NAN_PATCH: tl.constexpr):
    """E4M3 bytes -> float16 (the fn decode; NAN_PATCH: NaN codes fixed, see above)."""
    x = _e4m3fn_bytes_to_f16(raw, OPAQUE)
    if NAN_PATCH:
        x = tl.where((raw & 0x7F) == 0x7F, float("nan"), x)
    return x


@triton.jit
def _e2m1_codes_to_f16(nib):
    """E2M1 codes (the low 4 bits of int32 ``nib``) placed in float16's sign / low exponent /
    top mantissa bits: the code's value * 2^-14 (see _load_block_tile)."""
    return (((nib & 7) << 9) | ((nib & 8) << 12)).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _pow2_neg_f16(k):
    """2^-k as float16 for an int32 k >= 0 (subnormal from k = 15, 0 beyond 24): times an
    E4M3 value in float16 (one packed multiply per two elements) it rounds as the float32
    product rounded to float16 would; past 2^-24 it gives 0 where that kept at most
    448 * 2^-25 < 2^-16 (of the token's largest block scale, whose codes round by 2^-11)."""
    bits = tl.where(k <= 14, (15 - k) << 10, 1 << tl.maximum(24 - k, 0))
    return tl.where(k <= 24, bits, 0).to(tl.uint16).to(tl.float16, bitcast=True)


# _e2m1_bytes_to_f16x2's PTX: a byte pair spread into 16-bit halves (t0: bytes 0, 1; t1: 2, 3),
# then per output one field placed in both halves: the low nibbles (shift 9: the 3 magnitude
# bits, 12: the sign) into $0/$1, the high ones (5, 8) into $2/$3
_E2M1_FIELD = """
        shl.b32 x, {src}, {mag};
        shl.b32 y, {src}, {sign};
        and.b32 x, x, 0x0E000E00;
        and.b32 y, y, 0x80008000;
        or.b32 ${out}, x, y;"""
_E2M1_BYTES_ASM = tl.constexpr("""{
        .reg .b32 t0, t1, x, y;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;""" + "".join(
    _E2M1_FIELD.format(src=src, mag=mag, sign=mag + 3, out=out)
    for out, (src, mag) in enumerate([("t0", 9), ("t1", 9), ("t0", 5), ("t1", 5)])) + """
        }""")


@triton.jit
def _e2m1_bytes_to_f16x2(raw):
    """Packed E2M1 bytes (uint8) -> (low nibble, high nibble) as _e2m1_codes_to_f16 places
    them, in inline PTX: two bytes spread into the 16-bit halves of a register (prmt), then
    one shift-and-mask per field serves both halves (~2 instructions per code, where the
    per-element integer path took ~8 on sm90). Impure, like the FP8 decode: not hoisted."""
    return tl.inline_asm_elementwise(
        asm=_E2M1_BYTES_ASM,
        constraints="=r,=r,=r,=r,r", args=[raw], dtype=(tl.float16, tl.float16),
        is_pure=False, pack=4,
    )


@triton.jit
def _load_block_tile(ptr, rows, blk_ptr, blk_rows, n_mask, r_head, stride_h, stride_bh,
                     KV_FORMAT: tl.constexpr, HP: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_N: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
                     OPAQUE: tl.constexpr, NAN_PATCH: tl.constexpr, NIBBLE_MAJOR: tl.constexpr):
    """A block format's [BLOCK_N, HP * D] tile as TILE, and its per-token scales by row
    ([ROWS, BLOCK_N]; 1.0 for NVFP4). rows / blk_rows: each token's offset of its first
    head's codes / block scales. Loaded as [BLOCK_N, groups, group] so that each block
    scale is one load broadcast over its group, then flattened (column = h * D + d; an
    NVFP4 tile with NIBBLE_MAJOR: nvfp4_columns' order).

    MXFP8: E4M3 codes times 2^(e - ref) in float16 (_pow2_neg_f16), ref the token and
    head's largest E8M0 code (>= 1; factors <= 1, exact in float16 down to 2^-15 below the
    token's largest block); the token scale 2^(ref - 127) then scales its score column (K)
    or probability column (V) as a per-token FP8 scale does (NaN where a code is 0xFF).
    The float16 multiply took the loop from 1977 to 1501 SASS instructions per tile
    offline for sm90 (float32: 2 converts and a multiply per element).
    NVFP4: E2M1 placed in float16's sign / low exponent / top mantissa bits is its value
    * 2^-14 (0.5 lands on a subnormal); times an E4M3 block scale (4 significant bits,
    >= 2^-9) it stays exact in float16 (a multiple of 2^-24, at most 6 * 448 * 2^-14); the
    caller folds 2^14 into the per-tensor multiplier. OPAQUE (decode_asm's bit, V's by
    default) decodes the bytes in inline PTX (_e2m1_bytes_to_f16x2); on the H200 (gpt-oss,
    batch 64, kv 32K) that took K FP8 + V NVFP4 from 1135 to 1044 us, while K's too made
    NVFP4 slower (1800 against 1542 us) although its loop is shorter (1700 against 1959)."""
    group: tl.constexpr = 32 if KV_FORMAT == 3 else 16
    groups_per_head: tl.constexpr = HEAD_DIM // group
    GROUPS: tl.constexpr = HP * groups_per_head
    # the tile's column groups: each block once, or (nibble-major NVFP4) twice, low nibbles
    # first; g: a column group's block, g_head: its KV head
    SPAN: tl.constexpr = 2 * GROUPS if KV_FORMAT == 4 and NIBBLE_MAJOR else GROUPS
    offs_g = tl.arange(0, SPAN)
    g = offs_g % GROUPS
    g_head = g // groups_per_head
    blk = tl.load(blk_ptr + blk_rows[:, None] + (g_head * stride_bh + g % groups_per_head)
                  [None, :], mask=n_mask[:, None], other=0)  # [BLOCK_N, SPAN] bytes
    if KV_FORMAT == 3:
        offs_j = tl.arange(0, group)
        cols = (g_head * stride_h + (g % groups_per_head) * group)[None, :, None] \
            + offs_j[None, None, :]
        raw = tl.load(ptr + rows[:, None, None] + cols, mask=n_mask[:, None, None], other=0)
        x = _e4m3_codes_to_f16(raw, OPAQUE, NAN_PATCH)
        e = tl.where(n_mask[:, None], blk.to(tl.int32), 127)
        ref_g = tl.zeros([BLOCK_N, GROUPS], tl.int32)
        tok = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for h in tl.static_range(HP):
            ref_h = tl.maximum(tl.max(tl.where(g_head[None, :] == h, e, 0), axis=1), 1)
            ref_g = tl.where(g_head[None, :] == h, ref_h[:, None], ref_g)
            scale_h = tl.where(ref_h == 255, float("nan"),
                               pow2_from_biased_exponent(tl.minimum(ref_h, 254)))
            if h == 0:  # padding rows take head 0's (as token_scales_by_row)
                tok = tok + scale_h[None, :]
            else:
                tok = tl.where(r_head[:, None] == h, scale_h[None, :], tok)
        tile = (x * _pow2_neg_f16(ref_g - e)[:, :, None]).to(TILE)
    else:
        offs_j = tl.arange(0, group // 2)
        cols = (g_head * stride_h + (g % groups_per_head) * (group // 2))[None, :, None] \
            + offs_j[None, None, :]
        raw = tl.load(ptr + rows[:, None, None] + cols, mask=n_mask[:, None, None], other=0)
        sc = _e4m3_codes_to_f16(blk, False, NAN_PATCH)[:, :, None]
        if OPAQUE and not NIBBLE_MAJOR:
            lo, hi = _e2m1_bytes_to_f16x2(raw)
            tile = (tl.join(lo, hi) * sc[:, :, :, None]).to(TILE)
        elif NIBBLE_MAJOR:
            raw = raw.to(tl.int32)
            # each code byte loaded twice (column c is nvfp4_columns' (head, d)): no join.
            # Only for 16-token tiles, whose join Triton 3.6 miscompiles on sm90 (wrong
            # P.V); at 32 tokens it ran 1.9x slower than the join (H200, gpt-oss b64 kv
            # 32K: 2908 against 1548 us).
            nib = tl.where((offs_g >= GROUPS)[None, :, None], raw >> 4, raw)
            tile = (_e2m1_codes_to_f16(nib) * sc).to(TILE)
        else:
            # element 2k in the low nibble: join puts (lo, hi) side by side -> natural order
            raw = raw.to(tl.int32)
            lo = _e2m1_codes_to_f16(raw)
            hi = _e2m1_codes_to_f16(raw >> 4)
            tile = (tl.join(lo, hi) * sc[:, :, :, None]).to(TILE)
        tok = 1.0
    return tl.reshape(tile, [BLOCK_N, HP * HEAD_DIM]), tok


@triton.jit
def per_tensor_multipliers(sm_scale_log2, k_scale_value, k_scale_ptr, K_SCALE_MODE: tl.constexpr,
                           v_scale_value, v_scale_ptr, V_SCALE_MODE: tl.constexpr):
    """Per-tensor scales (mode 0: a value, 1: a one-element tensor, else none): K's folds into
    the score multiplier, V's into the output one. (score_mult, out_mult)."""
    score_mult = sm_scale_log2
    if K_SCALE_MODE == 0:
        score_mult = score_mult * k_scale_value
    elif K_SCALE_MODE == 1:
        score_mult = score_mult * tl.load(k_scale_ptr)
    out_mult = 1.0
    if V_SCALE_MODE == 0:
        out_mult = v_scale_value
    elif V_SCALE_MODE == 1:
        out_mult = tl.load(v_scale_ptr)
    return score_mult, out_mult


@triton.jit
def head_block_layout(GROUP: tl.constexpr, HP: tl.constexpr, ROWS: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
    """Rows and columns of a program that owns HP KV heads: rows [ROWS] are the HP * GROUP
    query heads (r_head: which KV head, >= HP a padding row; r_mask: a real one), columns
    [HP * D] the KV heads side by side (c_head, c_d); own [ROWS, HP * D]: a row's own head's
    columns (q's block diagonal, the output's store mask)."""
    offs_r = tl.arange(0, ROWS)
    offs_c = tl.arange(0, HP * HEAD_DIM)
    r_head = offs_r // GROUP
    c_head = offs_c // HEAD_DIM
    c_d = offs_c % HEAD_DIM
    r_mask = offs_r < GROUP * HP
    own = r_mask[:, None] & (r_head[:, None] == c_head[None, :])
    return offs_r, r_head, r_mask, c_head, c_d, own


@triton.jit
def nvfp4_columns(HP: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(c_head, c_d) of an NVFP4 tile's columns (_load_block_tile's nibble-major order): the
    HP heads' code bytes j = c mod (HP * D / 2) low nibbles first, then high, so column c
    holds head j // (D / 2), element 2 (j mod (D / 2)) + (c >= HP * D / 2). q's columns
    (NVFP4 K) and acc's (NVFP4 V) follow the tile's; the dots do not mind the order."""
    HALF: tl.constexpr = HP * HEAD_DIM // 2
    offs_c = tl.arange(0, HP * HEAD_DIM)
    j = offs_c % HALF
    return j // (HEAD_DIM // 2), 2 * (j % (HEAD_DIM // 2)) + offs_c // HALF


@triton.jit
def pow2_from_biased_exponent(e):
    """2^(e - 127) as float32 for an int32 biased exponent e in [1, 254] (exact)."""
    return (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def token_scales_by_row(base, stride_h, n_mask, r_head, HP: tl.constexpr):
    """Per-token scales of the program's HP KV heads as [rows, BLOCK_N] ([1, BLOCK_N] when
    HP == 1): row r takes its head's (r // GROUP) scales; padding rows take head 0's."""
    x = tl.load(base, mask=n_mask, other=0.0)[None, :]
    for h in tl.static_range(1, HP):
        x_h = tl.load(base + h * stride_h, mask=n_mask, other=0.0)
        x = tl.where(r_head[:, None] == h, x_h[None, :], x)
    return x


@triton.jit
def online_softmax_tile(s, m_i, l_i, acc, LAZY: tl.constexpr):
    """One tile's online softmax (scores s [rows, tokens] in log2 units, every row with a
    finite score): (p, m_i, l_i, acc, alpha). Eager: the running max m_i moves to the
    tile's, and the caller scales acc by alpha in its P.V (acc * alpha + p v). LAZY
    (FlashAttention-4's): m_i, the partial's reference as the merge and the sink take it,
    stays unless some row's max grows past it by more than 8, so p <= 2^8 (as exact in 16
    bits as any p), and acc comes back rescaled only on those tiles (alpha is not used)."""
    m_tile = tl.max(s, axis=1)
    if LAZY:
        if tl.max(m_tile - m_i, axis=0) > 8.0:
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.exp2(s - m_i[:, None])
        return p, m_i, l_i + tl.sum(p, axis=1), acc, tl.full(m_i.shape, 1.0, tl.float32)
    m_new = tl.maximum(m_i, m_tile)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, axis=1), acc, alpha


@triton.jit
def per_token_v_step(p, vs, e_v, acc, alpha, LAZY: tl.constexpr):
    """Per-token V scales vs [rows, tokens] into p for the 16-bit P.V: p * vs relative to the
    running power of two 2^(e_v - 127), raised to the tile's largest scale, with acc shrunk
    by as much (0 where that underflows: acc was negligible then); LAZY: acc now, where e_v
    grew, else through alpha in the caller's P.V. (pv, e_v, acc, alpha)."""
    e_new = tl.minimum(tl.maximum(e_v, tl.max(vs).to(tl.int32, bitcast=True) >> 23), 253)
    shrink = tl.where(e_v - e_new < -126, 0.0,
                      pow2_from_biased_exponent(tl.maximum(127 + e_v - e_new, 1)))
    if LAZY:
        if e_new != e_v:
            acc = acc * shrink
    else:
        alpha = alpha * shrink
    return p * (vs * pow2_from_biased_exponent(254 - e_new)), e_new, acc, alpha


@triton.jit
def tile_page_ids(bt_row, start, offs_tile, hi, PAGE_SIZE: tl.constexpr, LOAD: tl.constexpr):
    """Page ids of the tile from token ``start`` (0 past ``hi``); zeros unless LOAD."""
    offs = start + offs_tile
    if LOAD:
        return tl.load(bt_row + offs // PAGE_SIZE, mask=offs < hi, other=0)
    return tl.zeros_like(offs)


# window_left is -1 or a length, max_tokens and num_pages are sizes: keep Triton from turning
# the value 1 into a constant (or compiling a variant per divisibility by 16).
@triton.jit(do_not_specialize=["window_left", "max_tokens", "num_pages"])
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, k_scale_value, v_scale_value,
    k_blk_ptr, v_blk_ptr,
    block_tables_ptr, seq_lens_ptr, sinks_ptr, max_tokens, num_pages,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    sm_scale_log2, window_left,
    stride_qb, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ksp, stride_kss, stride_ksh,
    stride_vsp, stride_vss, stride_vsh,
    stride_kbp, stride_kbs, stride_kbh,
    stride_vbp, stride_vbs, stride_vbh,
    stride_bt,
    stride_ob, stride_oh,
    num_q_heads,
    GROUP: tl.constexpr, HP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr,
    K_SCALE_MODE: tl.constexpr, V_SCALE_MODE: tl.constexpr,
    HAS_SINKS: tl.constexpr, IS_SPLIT: tl.constexpr,
    TILE: tl.constexpr, DOT: tl.constexpr, Q_RESCALE: tl.constexpr, PRECISE_PV: tl.constexpr,
    DECODE_ASM: tl.constexpr, NAN_PATCH: tl.constexpr, IDS_AHEAD: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
):
    # Heads vary fastest in the grid: the programs that read the KV heads of one token (one
    # contiguous row of the cache) run side by side, so DRAM pages are opened once for all.
    head_block = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # Memory safety for any seq_lens / block_tables (checked=False trusts the caller): the
    # length is clamped to the block-table row's capacity (max_tokens = max_pages * page_size),
    # so no read passes the row, and page ids below to [0, num_pages), so none leaves the
    # cache. Free: one scalar min/max per program here, two integer ops per token lane of a
    # tile below (the tile's loads and dots are HP * D wide, the softmax per element).
    seq_len = tl.minimum(tl.maximum(tl.load(seq_lens_ptr + b), 0), max_tokens)
    # Sliding window: the decode query sits at seq_len - 1 and sees window_left + 1 tokens.
    first = tl.where(window_left >= 0, tl.maximum(seq_len - 1 - window_left, 0), 0)
    # Chunks are whole BLOCK_N tiles so only a sequence's last tile is ragged.
    chunk = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    # The program owns HP consecutive KV heads and their HP * GROUP query heads (rows). The
    # KV tile of a token is the HP heads side by side ([BLOCK_N, HP * D]: whole 128-byte
    # lines for FP8 at D 64) and q is block-diagonal ([ROWS, HP * D], row r holds its head's
    # q in its KV head's D columns, zeros elsewhere), so one dot gives every row the scores
    # against its own KV head; P.V computes the off-diagonal blocks too (discarded at the
    # store). With GROUP * HP <= 16 this costs no MMA work: the rows were padding before.
    kv_head0 = head_block * HP
    offs_r, r_head, r_mask, c_head, c_d, _ = head_block_layout(GROUP, HP, ROWS, HEAD_DIM)
    heads = kv_head0 * GROUP + offs_r  # query heads
    # q's columns follow K's tile, acc's V's (an NVFP4 tile's are nibble-major)
    NIBBLE_MAJOR: tl.constexpr = BLOCK_N < 32  # NVFP4 tiles (see _load_block_tile)
    q_head, q_d = c_head, c_d
    if K_FORMAT == 4 and NIBBLE_MAJOR:
        q_head, q_d = nvfp4_columns(HP, HEAD_DIM)
    o_head, o_d = c_head, c_d
    if V_FORMAT == 4 and NIBBLE_MAJOR:
        o_head, o_d = nvfp4_columns(HP, HEAD_DIM)
    o_own = r_mask[:, None] & (r_head[:, None] == o_head[None, :])
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + q_d[None, :],
        mask=r_mask[:, None] & (r_head[:, None] == q_head[None, :]), other=0.0,
    ).to(tl.float32)
    if Q_RESCALE:
        # A bf16 query meets float16 (FP8-decoded) K: scale each head's row by a power of
        # two that puts its largest |q| in [2^14, 2^15), so the float16 copy is exact (bar
        # elements 2^-28 below the row's max) and cannot overflow; the score undoes it.
        amax = tl.max(tl.abs(q), axis=1)
        e_q = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of amax
        e_q = tl.minimum(tl.maximum(e_q, 16), 254)  # 0 or tiny rows: scale <= 2^125
        q = q * pow2_from_biased_exponent(268 - e_q)[:, None]  # 2^(14 - (e_q - 127))
        q_unscale = pow2_from_biased_exponent(e_q - 14)  # 2^(e_q - 127 - 14)
    q = q.to(TILE).to(DOT)

    score_mult, out_mult = per_tensor_multipliers(
        sm_scale_log2, k_scale_value, k_scale_ptr, K_SCALE_MODE, v_scale_value, v_scale_ptr,
        V_SCALE_MODE)
    if K_FORMAT == 2:  # e4m3fnuz tiles hold twice the value (see load_kv_tile)
        score_mult = score_mult * 0.5
    elif K_FORMAT == 4:
        score_mult = score_mult * 16384.0  # NVFP4 tiles hold value * 2^-14 (_load_block_tile)
    if V_FORMAT == 2:
        out_mult = out_mult * 0.5
    elif V_FORMAT == 4:
        out_mult = out_mult * 16384.0

    row_mult = tl.full([ROWS], 1.0, tl.float32) * score_mult
    if Q_RESCALE:
        row_mult = row_mult * q_unscale
    # Per-token V scales: p * v_scale goes into float16, so it is taken relative to a running
    # power of two 2^(e_v - 127) <= the largest scale seen (p * scale / 2^(..) < 2: no
    # overflow, no underflow of the tokens that matter); acc is rescaled when it grows.
    e_v = tl.full([], 1, tl.int32)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HP * HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_cols = c_head * stride_kh + c_d
    v_cols = c_head * stride_vh + c_d
    # IDS_AHEAD: the tile's page ids load that many tiles ahead (0: in the tile). In the
    # tile, they sit in the chain of its K/V addresses and Triton's pipeliner spends a stage
    # on them: 3 stages then copy K/V one tile ahead, as 2 do (the loop waits for every copy
    # in flight). Ahead, K/V copy num_stages - 1 tiles ahead; what pays is per KV dtype.
    offs_tile = tl.arange(0, BLOCK_N)
    ids_1 = tile_page_ids(bt_row, lo, offs_tile, hi, PAGE_SIZE, IDS_AHEAD >= 1)
    ids_2 = tile_page_ids(bt_row, lo + BLOCK_N, offs_tile, hi, PAGE_SIZE, IDS_AHEAD >= 2)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_tile
        n_mask = offs_n < hi
        if IDS_AHEAD == 0:
            ids = tile_page_ids(bt_row, start, offs_tile, hi, PAGE_SIZE, True)
        elif IDS_AHEAD == 1:
            ids = ids_1
            ids_1 = tile_page_ids(bt_row, start + BLOCK_N, offs_tile, hi, PAGE_SIZE, True)
        else:
            ids = ids_1
            ids_1 = ids_2
            ids_2 = tile_page_ids(bt_row, start + 2 * BLOCK_N, offs_tile, hi, PAGE_SIZE, True)
        page = tl.minimum(tl.maximum(ids, 0), num_pages - 1).to(tl.int64)  # see seq_len
        slot = offs_n % PAGE_SIZE
        k_rows = page * stride_kp + slot * stride_ks + kv_head0 * stride_kh
        if K_FORMAT >= 3:  # MXFP8, NVFP4
            k, ks = _load_block_tile(
                k_ptr, k_rows, k_blk_ptr,
                page * stride_kbp + slot * stride_kbs + kv_head0 * stride_kbh, n_mask, r_head,
                stride_kh, stride_kbh, K_FORMAT, HP, HEAD_DIM, BLOCK_N, ROWS, TILE,
                (DECODE_ASM & 1) != 0, NAN_PATCH, NIBBLE_MAJOR)
        else:
            k = load_kv_tile(k_ptr, k_rows[:, None] + k_cols[None, :], n_mask[:, None],
                              K_FORMAT, TILE, (DECODE_ASM & 1) != 0, NAN_PATCH)
        s = tl.dot(q, tl.trans(k.to(DOT)))  # [ROWS, BLOCK_N], fp32
        if K_FORMAT == 3:
            s = s * row_mult[:, None] * ks
        elif K_SCALE_MODE == 2:
            ks = token_scales_by_row(
                k_scale_ptr + page * stride_ksp + slot * stride_kss + kv_head0 * stride_ksh,
                stride_ksh, n_mask, r_head, HP)
            s = s * row_mult[:, None] * ks
        else:
            s = s * row_mult[:, None]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds >= 1 valid token, so its row maxima are finite (p, alpha defined).
        p, m_i, l_i, acc, alpha = online_softmax_tile(s, m_i, l_i, acc, LAZY_RESCALE)
        v_rows = page * stride_vp + slot * stride_vs + kv_head0 * stride_vh
        if V_FORMAT >= 3:
            v, vs = _load_block_tile(
                v_ptr, v_rows, v_blk_ptr,
                page * stride_vbp + slot * stride_vbs + kv_head0 * stride_vbh, n_mask, r_head,
                stride_vh, stride_vbh, V_FORMAT, HP, HEAD_DIM, BLOCK_N, ROWS, TILE,
                (DECODE_ASM & 2) != 0, NAN_PATCH, NIBBLE_MAJOR)
        else:
            v = load_kv_tile(v_ptr, v_rows[:, None] + v_cols[None, :], n_mask[:, None],
                              V_FORMAT, TILE, (DECODE_ASM & 2) != 0, NAN_PATCH)
        if V_SCALE_MODE == 2 or V_FORMAT == 3:
            if V_FORMAT != 3:
                vs = token_scales_by_row(
                    v_scale_ptr + page * stride_vsp + slot * stride_vss + kv_head0 * stride_vsh,
                    stride_vsh, n_mask, r_head, HP)
            pv, e_v, acc, alpha = per_token_v_step(p, vs, e_v, acc, alpha, LAZY_RESCALE)
        else:
            pv = p
        # The tensor cores take p in 16 bits. Rounded once (as FlashAttention does) it costs
        # up to 2^-9 * sum(p|v|) in bf16 (2^-12 in fp16, FP8 KV's tile type), far above the
        # output's ulp when terms cancel; a second product with the rounding residue makes
        # it ~2^-17 (bf16) for a few extra MMAs.
        v = v.to(DOT)
        p_hi = pv.to(TILE)
        acc = tl.dot(p_hi.to(DOT), v, acc if LAZY_RESCALE else acc * alpha[:, None])
        if PRECISE_PV:
            p_lo = (pv - p_hi.to(tl.float32)).to(TILE)
            acc = tl.dot(p_lo.to(DOT), v, acc)
    if V_SCALE_MODE == 2 or V_FORMAT == 3:
        out_mult = out_mult * pow2_from_biased_exponent(e_v)
    acc = acc * out_mult

    if IS_SPLIT:
        # Unnormalised partial; an empty split leaves m=-inf, l=0, acc=0 for the merge.
        row = (b.to(tl.int64) * num_q_heads + heads) * num_splits + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + o_d[None, :], acc, mask=o_own)
        tl.store(part_m_ptr + row, m_i, mask=r_mask)
        tl.store(part_l_ptr + row, l_i, mask=r_mask)
    else:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + heads, mask=r_mask, other=0.0) * 1.4426950408889634
            m_all = tl.maximum(m_i, sink)
            keep = tl.exp2(m_i - m_all)
            denom = l_i * keep + tl.exp2(sink - m_all)
            o = acc * (keep / denom)[:, None]
        else:
            o = acc / l_i[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
                 + o_d[None, :], o.to(out_ptr.dtype.element_ty), mask=o_own)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, sinks_ptr, out_ptr,
    stride_ob, stride_oh, num_q_heads, num_splits,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """Log-sum-exp merge of one (sequence, query head)'s split partials; the sink joins here."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < num_splits
    row = (b.to(tl.int64) * num_q_heads + h) * num_splits + offs_s
    m = tl.load(part_m_ptr + row, mask=s_mask, other=float("-inf"))
    l_part = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)
    m_all = tl.max(m, axis=0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h) * 1.4426950408889634
        m_all = tl.maximum(m_all, sink)
    w = tl.exp2(m - m_all)  # empty splits: exp2(-inf) = 0
    denom = tl.sum(l_part * w, axis=0)
    if HAS_SINKS:
        denom += tl.exp2(sink - m_all)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty))


_launch_records: list[list[dict]] = []


@contextlib.contextmanager
def record_launches() -> Iterator[list[dict]]:
    """Collect, for every decode kernel launched inside the block, the compile-time
    variant it was launched with (its constexprs, the K/V format names, the grid): the
    path check that a cache was read by the kernel specialised for its format, not
    dequantised and attended by another path. Nested blocks each see every launch."""
    record: list[dict] = []
    _launch_records.append(record)
    try:
        yield record
    finally:
        _launch_records.remove(record)


def choose_num_splits(batch_size: int, num_kv_heads: int, kv_len: int, num_sms: int,
                      *, min_tokens_per_split: int = 256, programs_per_sm: int = 8) -> int:
    """Split count so that batch * Hkv * splits programs fill the SMs in one wave of
    ``programs_per_sm`` resident programs each (a second, partial wave would idle most SMs
    at its end), keeping at least ``min_tokens_per_split`` tokens per split (the merge must
    stay cheap). The launcher passes its grid's KV-head programs (Hkv / HP) as num_kv_heads."""
    programs = batch_size * num_kv_heads
    wanted = max(1, programs_per_sm * num_sms // programs)
    by_length = max(1, kv_len // min_tokens_per_split)
    return max(1, min(wanted, by_length, MAX_SPLITS))


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch parameters of the decode kernel; None picks the tuned default for the KV dtype.

    block_n: tokens per KV tile (a power of two >= 16); num_warps, num_stages: Triton's.
    ids_ahead: [tuning] tiles ahead that a tile's page ids load (0, 1, 2; 0: in the tile, where
        they sit in its K/V address chain and Triton's pipeliner spends a stage on them, so 3
        stages copy K/V no further ahead than 2). None: 1 for FP8 with per-tensor scales
        (H200: 6 % faster at kv 8K, 4.5 % at 32K), else 0 (see _launch_defaults).
    lazy_rescale: [tuning] rescale the accumulator only on tiles where some row's running max
        grows by more than 8 (log2 units; FlashAttention-4's trick), not on every tile. Offline
        for sm90 (Triton 3.9, FP8 per-tensor, 32-token tiles) the loop's path without the
        rescale is ~646 instructions against 737, at 228 registers against 255. None: on
        where it measured faster on the H200 (BF16, FP8 per-token, MXFP8), off for FP8
        per-tensor and NVFP4 (see _launch_defaults).
    precise_pv: multiply V by p's 16-bit rounding residue too (p effectively ~16 bits
        instead of 8 for BF16); False is FlashAttention's single rounding. None: on where
        one rounding of p costs more than a fraction of the output's ulp, i.e. off only for
        FP8 KV with a bf16 query (p in float16, 2^-11, under bf16's 2^-8 ulp).
    decode_asm: [tuning] FP8 tiles decoded in inline PTX (not hoisted into the dot-operand
        layout): bit 0 for K, bit 1 for V. GPU only (the interpreter cannot run PTX). K
        gains nothing (its 8-bit operand loads are contiguous already), V ~30 % of the FP8
        kernel's time.
    max_tile_cols: [tuning] columns of the program's KV tile: HP KV heads side by side,
        HP * D <= this (for D 64: two heads, 128 contiguous bytes per token in FP8, 256 in
        BF16; measured 15 % faster FP8 and 4 % faster BF16 on the H100 than one head).
    maxnreg: [tuning] registers per thread ptxas may use (Triton's maxnreg; None: its
        choice). On the H200 the FP8 default compiled to 189 and ran 8 warps per SM, a
        limit set by registers (ncu: 2 warps per scheduler, 0.36 issued per cycle); capped
        at 128 for more resident warps it ran 219 against 179 us at 32-token tiles, 175.4
        at 16 (tune_decode's occ stage): more warps did not pay.
    """

    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    ids_ahead: int | None = None
    lazy_rescale: bool | None = None
    precise_pv: bool | None = None
    decode_asm: int = 2
    max_tile_cols: int = 128
    maxnreg: int | None = None

    def __post_init__(self):
        bn = self.block_n
        if bn is not None and (_not_int(bn) or bn < 16 or bn & (bn - 1)):
            raise ValueError(f"DecodeLaunch.block_n must be a power of two >= 16, got {bn!r}")
        for name in ("num_warps", "num_stages", "max_tile_cols", "maxnreg"):
            v = getattr(self, name)
            if v is not None and (_not_int(v) or v < 1):
                raise ValueError(f"DecodeLaunch.{name} must be an int >= 1, got {v!r}")
        if self.ids_ahead not in (None, 0, 1, 2) or isinstance(self.ids_ahead, bool):
            raise ValueError(f"DecodeLaunch.ids_ahead must be 0, 1, 2 or None, got "
                             f"{self.ids_ahead!r}")
        if self.lazy_rescale is not None and not isinstance(self.lazy_rescale, bool):
            raise ValueError(f"DecodeLaunch.lazy_rescale must be a bool or None, got "
                             f"{self.lazy_rescale!r}")
        if self.decode_asm not in (0, 1, 2, 3):
            raise ValueError(f"DecodeLaunch.decode_asm must be 0..3 (bit 0 K, bit 1 V), "
                             f"got {self.decode_asm!r}")


def _not_int(v) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)


DEFAULT_LAUNCH = DecodeLaunch()


def heads_per_program(group: int, num_kv_heads: int, head_dim: int, max_tile_cols: int) -> int:
    """KV heads per program: the largest power of two that divides Hkv, keeps
    GROUP * HP <= 16 (the MMA's minimum rows, so the extra heads cost no MMA work) and
    HP * D within max_tile_cols."""
    hp = 1
    while (group * hp * 2 <= 16 and num_kv_heads % (hp * 2) == 0
           and hp * 2 * head_dim <= max_tile_cols):
        hp *= 2
    return hp


class LaunchDefaults(NamedTuple):
    block_n: int
    num_warps: int
    num_stages: int
    ids_ahead: int
    lazy_rescale: bool
    programs_per_sm: int  # resident programs per SM, for the split heuristic


def _launch_defaults(kv_dtype: torch.dtype, fp8_per_tensor: bool = False,
                     nvfp4: bool = False) -> LaunchDefaults:
    """The tuned launch per KV dtype (tiles are [block_n, HP * D], HP * D <= 128).

    [tuning] H100, gpt-oss decode (64 sequences x 8K/32K tokens): FP8 runs best as many
    one-warp programs with small tiles (no cross-warp softmax reductions or barriers; the
    kernel is latency bound at these sizes), ~8 resident per SM (~255 registers each);
    16-bit KV as four-warp programs of 64 tokens, ~4 per SM; page ids in the tile, 2
    stages. H200 (tune_decode's pipe stage, 2026-12-03): FP8 with per-tensor scales runs
    faster with the page ids a tile ahead (168.8 against 179.8 us at kv 8K, 633.7 against
    663.7 at 32K); per-token scales do not (201.8 / 796.9 against 202.5 / 763.5), nor does
    BF16 at 64-token tiles (at 32-token tiles, 3 stages: 253.2 against 261.2 at 8K but
    1019.2 against 1006.8 at 32K). See DecodeLaunch.ids_ahead. The lazy rescale (tune_decode's
    lazy and fmt stages, same day), us at kv 8K / 32K: BF16 263.5 / 1024.7 against 270.5 /
    1030.8, FP8 per-token 191.4 / 747.3 against 202.5 / 773.6, MXFP8 (32K) 1236.9 against
    1283.3; slower for FP8 per-tensor (173.3 against 170.5 at 8K) and NVFP4 (1737.7 against
    1615.3), and within noise for K FP8 + V NVFP4 (1184.3 against 1199.6 at ids_ahead 1,
    1521.0 against 1523.0 in a second run): off there."""
    if interpreted():  # the interpreter: fewest tiles without numpy temporaries growing
        return LaunchDefaults(256, 4, 1, 1, False, 8)
    lazy = not (fp8_per_tensor or nvfp4)
    if kv_dtype.itemsize == 1:
        return LaunchDefaults(32, 1, 2, 1 if fp8_per_tensor else 0, lazy, 8)
    return LaunchDefaults(64, 4, 2, 0, lazy, 4)


def _kv_format(name: str, cache: torch.Tensor, block_scale, q_dtype: torch.dtype) -> int:
    """The kernel's format constant of one side (name "k" or "v"), from the cache's dtype and
    its block scales' (none: 16-bit or FP8; uint8 E8M0: MXFP8; float8_e4m3fn: NVFP4)."""
    kv_dtype = cache.dtype
    if block_scale is not None:
        what = f"{name}_block_scale"
        check_tensor(block_scale, what)
        if block_scale.dtype == torch.uint8:
            if kv_dtype != torch.float8_e4m3fn:
                raise TypeError(f"{what}: uint8 (E8M0) block scales are MXFP8's, whose "
                                f"{name}_cache must be float8_e4m3fn, got {kv_dtype}")
            return _KV_MXFP8
        if block_scale.dtype == torch.float8_e4m3fn:
            if kv_dtype != torch.uint8:
                raise TypeError(f"{what}: float8_e4m3fn block scales are NVFP4's, whose "
                                f"{name}_cache must be uint8 (two E2M1 codes a byte), got "
                                f"{kv_dtype}")
            return _KV_NVFP4
        raise TypeError(f"{what} must be uint8 (MXFP8 E8M0, one per {MX_BLOCK}) or "
                        f"float8_e4m3fn (NVFP4, one per {NVFP4_BLOCK}), got "
                        f"{block_scale.dtype}")
    if kv_dtype == torch.float8_e4m3fn:
        return _KV_E4M3FN
    if _E4M3FNUZ is not None and kv_dtype == _E4M3FNUZ:
        return _KV_E4M3FNUZ
    if kv_dtype in (torch.bfloat16, torch.float16):
        if kv_dtype != q_dtype:
            raise TypeError(
                f"{name}_cache: 16-bit KV cache must have the query's dtype: query {q_dtype}, "
                f"KV {kv_dtype}"
            )
        return _KV_16BIT
    supported = ["torch.bfloat16", "torch.float16", "torch.float8_e4m3fn"]
    if _E4M3FNUZ is not None:
        supported.append("torch.float8_e4m3fnuz")
    raise NotImplementedError(
        f"paged_decode_attention: {name}_cache: KV cache dtype {kv_dtype} is not supported "
        f"(supported: {', '.join(supported)}; with {name}_block_scale: uint8 packed NVFP4, "
        f"float8_e4m3fn MXFP8)"
    )


def _block_scale_args(name: str, block, fmt: int, cache: torch.Tensor, head_dim: int):
    """(bytes tensor for the pointer, page/slot/head strides) of one side's block scales."""
    if fmt not in (_KV_MXFP8, _KV_NVFP4):
        return cache.view(torch.uint8) if cache.element_size() == 1 else cache, (0, 0, 0)
    what = f"{name}_block_scale"
    group = MX_BLOCK if fmt == _KV_MXFP8 else NVFP4_BLOCK
    want = (*cache.shape[:3], head_dim // group)
    if tuple(block.shape) != want:
        raise ValueError(f"{what} must be [num_pages, page_size, Hkv, D/{group}] = {want} "
                         f"(one scale per {group} of head_dim), got {tuple(block.shape)}")
    if block.stride(-1) != 1:
        raise ValueError(f"{what} must be contiguous in its last dim, got strides "
                         f"{block.stride()}")
    check_same_device(block, what, cache, f"{name}_cache")
    return block.view(torch.uint8), tuple(block.stride()[:3])


def scale_args(name: str, scale, cache: torch.Tensor, fmt: int = _KV_E4M3FN):
    """(mode, tensor for the pointer, scalar value, strides) for one K or V scale. With a
    block format (MXFP8, NVFP4) the scale is per-tensor only: NVFP4's global scale, an
    extra factor for MXFP8."""
    dummy_strides = (0, 0, 0)
    # A scalar scale's pointer is never read: FP8 caches pass it as bytes, as the caches
    # themselves go (Triton has no float8_e4m3fnuz pointer on NVIDIA GPUs: with the cache as
    # the dummy, fnuz KV with a float or no scale did not compile on the H200).
    dummy = cache.view(torch.uint8) if cache.element_size() == 1 else cache
    if scale is None:
        return _SCALE_SCALAR, dummy, 1.0, dummy_strides
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be None, a float or a float32 tensor, got {type(scale)}")
    if not torch.is_tensor(scale):
        return _SCALE_SCALAR, dummy, check_scale_value(scale, name), dummy_strides
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    check_same_device(scale, name, cache, "the cache")
    if scale.numel() == 1:
        return _SCALE_TENSOR1, scale, 1.0, dummy_strides
    per_token = tuple(cache.shape[:3])
    if fmt in (_KV_MXFP8, _KV_NVFP4):
        what = "its global scale" if fmt == _KV_NVFP4 else "an extra per-tensor factor"
        raise ValueError(f"{name} with {KV_FORMAT_NAMES[fmt].upper()} KV is {what} (one "
                         f"element), got shape {tuple(scale.shape)}; the block scales go in "
                         f"{name[0]}_block_scale")
    if scale.dim() == 4 and scale.shape[-1] == 1:
        scale = scale.squeeze(-1)  # quantize_per_token's [..., 1]
    if tuple(scale.shape) != per_token:
        raise ValueError(
            f"{name} must have one element (per-tensor) or shape {per_token} "
            f"[num_pages, page_size, Hkv] (per-token), got {tuple(scale.shape)}"
        )
    return _SCALE_PER_TOKEN, scale, 1.0, tuple(scale.stride())


def _bad_scales(scale: torch.Tensor) -> torch.Tensor:
    """Elements that are not a finite positive scale (NaN, +-Inf, 0, negative)."""
    return ~((scale > 0) & (scale < math.inf))


def _bad_block_scales(codes: torch.Tensor, fmt: int) -> torch.Tensor:
    """Block scale bytes that are not a scale: E8M0 0xFF (NaN); E4M3 NaN or negative."""
    if fmt == _KV_MXFP8:
        return codes == 0xFF
    return ((codes & 0x7F) == 0x7F) | (codes > 0x80)


def check_shared_args(q, k_cache, v_cache, block_tables, seq_lens, sinks, window_left,
                      sm_scale):
    """What every paged-decode launcher checks alike (this one and the persistent one):
    devices, sinks [Hq], window_left, sm_scale. Returns sinks as contiguous float32 (or
    None), window_left clamped to int32, and sm_scale (1/sqrt(D) when None)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    check_device(q, "q")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache),
                    ("block_tables", block_tables), ("seq_lens", seq_lens)):
        check_same_device(t, name, q, "q")
    if sinks is not None:
        if not torch.is_tensor(sinks) or not sinks.dtype.is_floating_point:
            got = getattr(sinks, "dtype", type(sinks))
            raise TypeError(f"sinks must be a float tensor [Hq], got {got}")
        if sinks.shape != (num_q_heads,):
            raise ValueError(f"sinks must be [Hq={num_q_heads}], got {tuple(sinks.shape)}")
        check_same_device(sinks, "sinks", q, "q")
        sinks = sinks.to(torch.float32).contiguous()
    check_int(window_left, "window_left (-1: off)", -1)
    # A window of the cache's int32 lengths or more is the whole sequence: clamped, the
    # kernel argument stays int32 whatever the caller passes.
    window_left = min(window_left, 2**31 - 2)
    sm_scale = check_scale_value(1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale,
                                 "sm_scale")
    return sinks, window_left, sm_scale


def checked_out(out, q: torch.Tensor) -> torch.Tensor:
    """The output tensor: a new one like q, or the caller's, which must match q's shape,
    dtype and device and be contiguous in head_dim."""
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    check_tensor(out, "out")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in head_dim")
    return out


def check_max_seq_len(max_seq_len, block_tables: torch.Tensor, page_size: int) -> int:
    """The block-table row's capacity in tokens (int32-bounded), after checking that
    max_seq_len, when given, fits it. The kernels clamp lengths to this capacity and page
    ids into the cache."""
    capacity = min(block_tables.shape[1] * page_size, 2**31 - 1)
    if max_seq_len is not None:
        check_int(max_seq_len, "max_seq_len", 1)
        if max_seq_len > capacity:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds block_tables capacity "
                             f"{block_tables.shape[1]} pages x {page_size}")
    return capacity


def check_table_values(block_tables, seq_lens, page_size: int, num_pages: int,
                  max_seq_len: int | None, sinks, scales, blocks=()) -> int:
    """The checked mode: every data check on the device, one sync for all; max(seq_lens).
    scales: (name, mode, tensor) of k_scale and v_scale; blocks: (name, format, bytes) of
    the block scales given."""
    counts = [table_stats(block_tables, seq_lens, page_size, num_pages)]
    zero = torch.zeros((), dtype=torch.int64, device=seq_lens.device)
    counts.append(zero if sinks is None else (torch.isnan(sinks) | (sinks == math.inf)).sum())

    def owned_bad(values, bad):  # the slots the sequences own (the rest may be NaN)
        tok = torch.arange(block_tables.shape[1] * page_size, device=seq_lens.device)
        owned = tok[None, :] < seq_lens.long()[:, None]  # [B, capacity]
        pages = block_tables.long().clamp(0, num_pages - 1)[:, tok // page_size]
        picked = bad(values[pages, tok % page_size])  # [B, capacity, Hkv, ...]
        return (owned.reshape(*owned.shape, *[1] * (picked.dim() - 2)) & picked).sum()

    for _, mode, scale in scales:
        if mode == _SCALE_TENSOR1:
            counts.append(_bad_scales(scale).sum())
        elif mode == _SCALE_PER_TOKEN:
            counts.append(owned_bad(scale, _bad_scales))
        else:
            counts.append(zero)
    for _, fmt, codes in blocks:
        counts.append(owned_bad(codes, functools.partial(_bad_block_scales, fmt=fmt)))
    values = torch.cat([c.reshape(-1) for c in counts]).tolist()
    stats, (bad_sinks, bad_k, bad_v), bad_blocks = values[:3], values[3:6], values[6:]
    check_table_stats(stats, 1, block_tables.shape[1], page_size, num_pages)
    lens_max = stats[1]
    if max_seq_len is not None and lens_max > max_seq_len:
        raise ValueError(f"seq_lens: seq_len {lens_max} exceeds max_seq_len {max_seq_len}")
    if bad_sinks:
        raise ValueError(f"sinks: {bad_sinks} NaN or +inf of {sinks.numel()} (a sink is a "
                         "logit; -inf means none)")
    for (name, _, _), bad in zip(scales, (bad_k, bad_v), strict=True):
        if bad:
            raise ValueError(f"{name}: {bad} scales the sequences read are not finite and "
                             "positive")
    for (name, fmt, _), bad in zip(blocks, bad_blocks, strict=True):
        if bad:
            rule = "0xFF (NaN)" if fmt == _KV_MXFP8 else "NaN or negative"
            raise ValueError(f"{name}: {bad} block scales the sequences read are {rule}")
    return lens_max


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    k_scale=None,
    v_scale=None,
    k_block_scale: torch.Tensor | None = None,
    v_block_scale: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    checked: bool | None = None,
    out: torch.Tensor | None = None,
    launch: DecodeLaunch = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over a paged KV cache, with sinks.

    q: [B, Hq, D] bfloat16/float16 (D 64 or 128; last dim contiguous).
    k_cache, v_cache: [num_pages, page_size, Hkv, D] (NHD), bf16/fp16 (= q's dtype),
        float8_e4m3fn or float8_e4m3fnuz; Hq a multiple of Hkv (GQA); last dim contiguous.
        Block formats, each side its own (``paged_formats.PagedStore``'s layout), decoded
        in registers: MXFP8 = float8_e4m3fn codes + ``*_block_scale`` uint8 E8M0
        [num_pages, page_size, Hkv, D/32]; NVFP4 = uint8 [num_pages, page_size, Hkv, D/2]
        (E2M1 pairs, element 2k in the low nibble) + ``*_block_scale`` float8_e4m3fn
        [..., D/16] + the global decode scale as ``k_scale``/``v_scale`` (per-tensor).
        K and V may differ in format when neither is 16-bit (K FP8 + V NVFP4).
    block_tables: int32 [B, max_pages]; seq_lens: int32 [B], every length >= 1.
    k_scale, v_scale: dequantisation scales (value = stored * scale): None (1.0), a float or
        float32 one-element tensor (per-tensor), or float32 [num_pages, page_size, Hkv]
        (per-token: one per token vector, as ``fp8_quant.quantize_per_token`` gives it; a
        trailing 1 is accepted).
    sinks: [Hq] natural-log logits (FlashInfer's definition, see the module docstring) or None.
    sm_scale: default 1/sqrt(D). window_left: -1 (off) or w >= 0 (last w+1 tokens).
    num_splits: split-KV count; None picks one from B*Hkv, the length and the SM count.
    max_seq_len: the longest length, for the split heuristic; at most the block table's
        capacity (max_pages * page_size, checked on the host). When None it is read from
        seq_lens (one device sync).
    checked: the data checks, one device sync: every seq_len in [1, capacity] (and <=
        max_seq_len when given), the page ids the sequences own in [0, num_pages), sinks
        neither NaN nor +inf (-inf is no sink), tensor scales finite and > 0 (per-token: at
        the slots the sequences own). None (default): checked when max_seq_len is None.
        False: none of them, no sync (CUDA-graph capturable; the split heuristic takes the
        capacity when max_seq_len is None). The kernel itself clamps every length to the
        capacity and every page id into the cache, so lying inputs give garbage in their
        own outputs (unchecked mode only), never a read outside the table or the cache.
    launch: tile and launch tuning (``DecodeLaunch``; the default holds the tuned choices).
    Returns [B, Hq, D] in q's dtype (written into ``out`` when given); B == 0 returns the
    empty output without a launch.

    Raises NotImplementedError for an FP8 query ("require BF16/FP16 query") or an unsupported
    KV dtype, TypeError for other types and dtype mismatches, ValueError for shapes and
    values; every message names the argument.
    """
    # --- dtypes: the lab's error contract -------------------------------------------------
    check_tensor(q, "q")
    if q.dtype in _FP8_QUERY_DTYPES:
        raise NotImplementedError(
            f"paged_decode_attention: got an FP8 query q ({q.dtype}); decode attention with "
            f"sinks and FP8 KV require BF16/FP16 query"
        )
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"paged_decode_attention: query q dtype {q.dtype}; require BF16/FP16 "
                        "query")
    check_tensor(k_cache, "k_cache")
    check_tensor(v_cache, "v_cache")
    k_format = _kv_format("k", k_cache, k_block_scale, q.dtype)
    if k_block_scale is None and v_block_scale is None and k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
    v_format = _kv_format("v", v_cache, v_block_scale, q.dtype)
    blocked = {k_format, v_format} & {_KV_MXFP8, _KV_NVFP4}
    # one tile type for both sides: 16-bit with 16-bit only; formats may differ only with
    # a block format (FP8 fn / fnuz mixed is not a cache anybody writes)
    if k_cache.dtype != v_cache.dtype and (_KV_16BIT in (k_format, v_format) or not blocked):
        raise TypeError(f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        check_tensor(t, name)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")

    # --- shapes, layouts, devices ---------------------------------------------------------
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_pages, page_size, Hkv, D] (NHD), got {tuple(k_cache.shape)}"
        )
    if v_cache.dim() != 4 or (k_cache.shape[:3] != v_cache.shape[:3]
                               or (k_format == v_format and k_cache.shape != v_cache.shape)):
        raise ValueError(f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}")
    batch, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"q: head_dim {head_dim} is not supported (supported: {HEAD_DIMS})")
    for name, cache, fmt in (("k_cache", k_cache, k_format), ("v_cache", v_cache, v_format)):
        if fmt == _KV_NVFP4 and cache.shape[3] * 2 != head_dim:
            raise ValueError(f"{name}: NVFP4 packs two elements a byte: last dim must be "
                             f"head_dim / 2 = {head_dim // 2}, got {cache.shape[3]}")
        if fmt != _KV_NVFP4 and cache.shape[3] != head_dim:
            raise ValueError(f"{name}: KV head_dim {cache.shape[3]} != query head_dim "
                             f"{head_dim}")
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"k_cache needs >= 1 page of >= 1 slot, got {tuple(k_cache.shape)}")
    if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"q: Hq ({num_q_heads}) must be a positive multiple of Hkv ({num_kv_heads}) of "
            "k_cache for GQA"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), "
                             f"got strides {t.stride()}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_pages], got "
                         f"{tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1 and block_tables.shape[1] > 1:
        raise ValueError("block_tables must be contiguous along its page dimension")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be [B={batch}], got {tuple(seq_lens.shape)}")
    if not seq_lens.is_contiguous():
        raise ValueError("seq_lens must be contiguous")
    device = q.device
    sinks, window_left, sm_scale = check_shared_args(
        q, k_cache, v_cache, block_tables, seq_lens, sinks, window_left, sm_scale)

    # --- Python scalars and options -------------------------------------------------------
    k_mode, k_scale_t, k_scale_v, k_scale_strides = scale_args("k_scale", k_scale, k_cache,
                                                                k_format)
    v_mode, v_scale_t, v_scale_v, v_scale_strides = scale_args("v_scale", v_scale, v_cache,
                                                                v_format)
    k_blk_t, k_blk_strides = _block_scale_args("k", k_block_scale, k_format, k_cache, head_dim)
    v_blk_t, v_blk_strides = _block_scale_args("v", v_block_scale, v_format, v_cache, head_dim)
    out = checked_out(out, q)
    if num_splits is not None:
        check_int(num_splits, "num_splits", 1)
        if num_splits > MAX_SPLITS:
            raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits}")
    if not isinstance(launch, DecodeLaunch):
        raise TypeError(f"launch must be a DecodeLaunch, got {type(launch).__name__}")
    check_flag(checked, "checked")
    capacity = check_max_seq_len(max_seq_len, block_tables, page_size)
    if batch == 0:
        return out

    # --- values (one device sync) ---------------------------------------------------------
    if checked or (checked is None and max_seq_len is None):
        lens_max = check_table_values(block_tables, seq_lens, page_size, num_pages, max_seq_len,
                                 sinks, (("k_scale", k_mode, k_scale_t), ("v_scale", v_mode,
                                                                          v_scale_t)),
                                 tuple((f"{n}_block_scale", fmt, t) for n, fmt, t in
                                       (("k", k_format, k_blk_t), ("v", v_format, v_blk_t))
                                       if fmt in (_KV_MXFP8, _KV_NVFP4)))
        max_seq_len = max_seq_len or lens_max
    elif max_seq_len is None:
        max_seq_len = capacity  # unchecked, no sync: the split heuristic's bound
    attended = max_seq_len if window_left < 0 else min(max_seq_len, window_left + 1)

    group = num_q_heads // num_kv_heads
    hp = heads_per_program(group, num_kv_heads, head_dim, launch.max_tile_cols)
    fp8 = (_KV_E4M3FN, _KV_E4M3FNUZ)
    defaults = _launch_defaults(k_cache.dtype, fp8_per_tensor=k_format in fp8 and v_format in fp8
                                and _SCALE_PER_TOKEN not in (k_mode, v_mode),
                                nvfp4=_KV_NVFP4 in (k_format, v_format))
    if num_splits is None:
        sms = sm_count(device)
        # The grid has Hkv / HP programs per sequence and split.
        num_splits = choose_num_splits(batch, num_kv_heads // hp, attended, sms,
                                       programs_per_sm=defaults.programs_per_sm)
    block_n = launch.block_n or defaults.block_n
    num_warps = launch.num_warps or defaults.num_warps
    num_stages = launch.num_stages or defaults.num_stages
    ids_ahead = defaults.ids_ahead if launch.ids_ahead is None else launch.ids_ahead
    lazy = defaults.lazy_rescale if launch.lazy_rescale is None else launch.lazy_rescale

    is_split = num_splits > 1
    if is_split:
        part_acc = torch.empty(batch, num_q_heads, num_splits, head_dim, device=device,
                               dtype=torch.float32)
        part_m = torch.empty(batch, num_q_heads, num_splits, device=device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    # 16-bit KV meets the query in its own type; FP8 KV decodes to float16 (exact), and a
    # bf16 query is rescaled per head into float16 range in the kernel (Q_RESCALE).
    q_type = tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16
    tile = q_type if k_format == _KV_16BIT else tl.float16
    # Triton's CPU interpreter computes 16-bit tl.dot wrongly (Triton 3.9): feed it fp32
    # operands holding the same (exactly widened) 16-bit values.
    dot = tl.float32 if interpreted() else tile
    # FP8 KV reaches the kernel as bytes (decoded there); 16-bit KV as itself.
    k_arg = k_cache.view(torch.uint8) if k_format != _KV_16BIT else k_cache
    v_arg = v_cache.view(torch.uint8) if v_format != _KV_16BIT else v_cache
    decode_asm = 0 if k_format == _KV_16BIT or interpreted() else launch.decode_asm
    grid = (num_kv_heads // hp, batch, num_splits)
    constexprs = dict(
        GROUP=group, HP=hp, ROWS=max(16, triton.next_power_of_2(group * hp)), HEAD_DIM=head_dim,
        PAGE_SIZE=page_size, BLOCK_N=block_n,
        K_FORMAT=k_format, V_FORMAT=v_format, K_SCALE_MODE=k_mode, V_SCALE_MODE=v_mode,
        HAS_SINKS=sinks is not None, IS_SPLIT=is_split, TILE=tile, DOT=dot,
        Q_RESCALE=q_type != tile, DECODE_ASM=decode_asm, NAN_PATCH=interpreted(),
        IDS_AHEAD=ids_ahead, LAZY_RESCALE=lazy,
        PRECISE_PV=bool(launch.precise_pv if launch.precise_pv is not None
                        else not (tile == tl.float16 and q.dtype == torch.bfloat16)),
    )
    for record in _launch_records:  # record_launches(): the variant that is launched now
        record.append(dict(constexprs, k_format=KV_FORMAT_NAMES[k_format],
                           v_format=KV_FORMAT_NAMES[v_format], grid=grid))
    _paged_decode_kernel[grid](
        q, k_arg, v_arg, k_scale_t, v_scale_t, k_scale_v, v_scale_v, k_blk_t, v_blk_t,
        block_tables, seq_lens, sinks if sinks is not None else q, capacity,
        min(num_pages, 2**31 - 1),
        out, part_acc, part_m, part_l,
        sm_scale * LOG2E, window_left,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *k_scale_strides, *v_scale_strides, *k_blk_strides, *v_blk_strides,
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_q_heads,
        **constexprs, num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": launch.maxnreg} if launch.maxnreg and not interpreted() else {}),
    )
    if is_split:
        _merge_splits_kernel[(batch, num_q_heads)](
            part_acc, part_m, part_l, sinks if sinks is not None else part_m, out,
            out.stride(0), out.stride(1), num_q_heads, num_splits,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=head_dim,
            HAS_SINKS=sinks is not None, num_warps=4,
        )
    return out


# An offline compile at gpt-oss decode shapes (Hq 64, Hkv 8, D 64, page 16, sinks, split):
# per KV format, (K_FORMAT = V_FORMAT, cache pointer type, block-scale pointer type).
_OFFLINE_FORMATS = {"16bit": (_KV_16BIT, "*bf16", "*u8"), "fp8_e4m3fn": (_KV_E4M3FN, "*u8", "*u8"),
                    "mxfp8": (_KV_MXFP8, "*u8", "*u8"), "nvfp4": (_KV_NVFP4, "*u8", "*u8")}
_OFFLINE_ALIGNED = ("stride_qb", "stride_qh", "stride_kp", "stride_ks", "stride_kh",
                    "stride_vp", "stride_vs", "stride_vh", "stride_ob", "stride_oh")


def sm_compile_report(capability: int = 90, num_stages: int = 3,
                      ids_ahead: int = 1) -> dict[str, dict]:
    """The decode kernel compiled offline for cuda:``capability`` (``offline_compile``; under
    the interpreter in a child) per KV format, at the tuned tiles, ``num_stages`` and
    ``ids_ahead`` (DecodeLaunch's): its E4M3 converts and cp.async copies in the PTX, and the
    copy groups its token loop keeps in flight while it waits (``prefetch_depth``; 0: the
    loop waits for the copies it has just issued, so stages beyond 2 prefetch no deeper)."""
    if interpreted():
        return in_child("kvperf_kernels.attention.decode", "sm_compile_report", capability,
                        num_stages, ids_ahead)
    report = {}
    for name, (fmt, cache, blk) in _OFFLINE_FORMATS.items():
        kv_dtype = torch.bfloat16 if fmt == _KV_16BIT else torch.uint8
        defaults = _launch_defaults(kv_dtype)
        tile = tl.bfloat16 if fmt == _KV_16BIT else tl.float16
        types = dict(q_ptr="*bf16", k_ptr=cache, v_ptr=cache, k_scale_ptr="*fp32",
                     v_scale_ptr="*fp32", k_scale_value="fp32", v_scale_value="fp32",
                     k_blk_ptr=blk, v_blk_ptr=blk, block_tables_ptr="*i32",
                     seq_lens_ptr="*i32", sinks_ptr="*fp32", out_ptr="*bf16",
                     part_acc_ptr="*fp32", part_m_ptr="*fp32", part_l_ptr="*fp32",
                     sm_scale_log2="fp32")
        scale_mode = _SCALE_SCALAR if fmt in (_KV_16BIT, _KV_NVFP4, _KV_MXFP8) else _SCALE_TENSOR1
        const = dict(GROUP=8, HP=2, ROWS=16, HEAD_DIM=64, PAGE_SIZE=16, BLOCK_N=defaults.block_n,
                     K_FORMAT=fmt, V_FORMAT=fmt, K_SCALE_MODE=scale_mode,
                     V_SCALE_MODE=scale_mode, HAS_SINKS=True, IS_SPLIT=True, TILE=tile,
                     DOT=tile, Q_RESCALE=fmt != _KV_16BIT,
                     DECODE_ASM=0 if fmt == _KV_16BIT else DEFAULT_LAUNCH.decode_asm,
                     NAN_PATCH=False, PRECISE_PV=fmt == _KV_16BIT, IDS_AHEAD=ids_ahead,
                     LAZY_RESCALE=False)
        asm = compile_offline(_paged_decode_kernel, types, const, capability=capability,
                              num_warps=defaults.num_warps, num_stages=num_stages,
                              aligned=_OFFLINE_ALIGNED)
        report[name] = {"e4m3_converts": asm["ptx"].count("cvt.rn.f16x2.e4m3x2"),
                        "async_copies": asm["ptx"].count("cp.async."),
                        "prefetch_depth": prefetch_depth(asm["ttgir"])}
    return report
