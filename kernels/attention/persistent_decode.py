"""Persistent paged decode attention (Triton): a fixed grid pulls (sequence, KV chunk, KV head)
work items from a global atomic counter, so ragged batches balance across the SMs.

The lab (persistent_decode) launches ``num_programs`` CTAs that pin sequences; its Triton
variant computes sequence ``pid`` only, so every sequence beyond the program count is never
computed. Here the grid is a few programs per SM (or ``num_programs``) and the work is the
whole batch, whatever its size:

- each sequence's (windowed) range is cut into chunks of ``chunk_tokens`` (whole tiles), and
  each (chunk, block of HP KV heads) is one work item (HP: ``max_tile_cols``, one head by
  default, two at D 64 as decode.py's programs take them with 128); a program
  takes the next item from a global counter (``tl.atomic_add``) until none is left, so a
  32K-token sequence among short ones is spread over many programs instead of holding one
  (the lab's load-balance goal);
- the chunk of item i is found without a host-built table: every program computes the
  prefix sum of chunks per sequence from ``seq_lens`` in registers once, then a sequence is
  a comparison and a sum (no device sync, CUDA-graph capturable);
- an item's K/V tiles load inside its token loop, which Triton's pipeliner turns into
  cp.async prefetches ``num_stages`` deep (into shared memory), so the next tiles' latency
  hides behind this one's math; the first version double-buffered them in registers by
  hand, which kept the loop out of the pipeliner (offline for sm90: no cp.async, 162
  registers at BF16, so 3 programs per SM fit; now 109, 4 fit). A tile's page ids load
  one tile ahead: loaded in the tile they sat in its K/V address chain, the pipeliner
  spent a stage on them and every wait drained the copies in flight (3 stages prefetched
  one tile, as 2 do); a tile ahead, the H200 ran 5-8 % faster (uniform 64 x 4K: 167.4
  against 181.2 us; 64 x 1K 59.3 against 62.8; skewed 63.8 against 66.9);
- each item writes an unnormalised partial (acc, running max, running sum) at (sequence,
  its chunk), which a merge kernel combines by log-sum-exp per (sequence, query head),
  adding the sink there once; it needs its sequence's length only (no prefix sum), so its
  partials load at once (H200, 64 x 1K: 9.5 us, the batched merge 3.7; the rest of the gap
  is in tests/evidence/persistent_breakdown.py); the item of a sequence's only chunk
  normalises and writes its output itself, which the merge skips, and a batch whose
  sequences all fit one chunk launches no merge.

Semantics as ``paged_decode_attention`` (FlashInfer's sinks, sliding window, GQA); KV is
q's dtype, float32, packed INT4 or FP8 E4M3 (per-tensor or per-token scales; decode.py's
tile decode and scale contract, imported). Under the lab's schedule, which skips items, a
sequence no program computed cannot pass as a number: its partials' maxima start at -inf
and the merge writes NaN where every chunk is still -inf (the other schedules write every
chunk the merge reads, so their buffers are left unfilled).

Schedules (constexpr SCHEDULE): "atomic" (the kernel), "static" (item = pid + k * programs:
deterministic, the same coverage without atomics) and "lab_bug" (program p computes
sequence p only: the lab's defect, kept as the suites' negative control). In Triton's CPU
interpreter ``tl.atomic_add`` works but programs run one after another, so program 0 takes
every item: the atomic path is exercised, its balance is not (the static schedule spreads
items over the programs there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.attention.decode import (
    HEAD_DIMS,
    LOG2E,
    check_max_seq_len,
    check_shared_args,
    check_table_values,
    checked_out,
    head_block_layout,
    heads_per_program,
    load_kv_tile,
    online_softmax_tile,
    per_tensor_multipliers,
    per_token_v_step,
    pow2_from_biased_exponent,
    scale_args,
    tile_page_ids,
    token_scales_by_row,
)
from kvperf_kernels.attention.offline_compile import compile_offline, in_child, prefetch_depth
from kvperf_kernels.device import interpreted, sm_count
from kvperf_kernels.formats.checks import (
    check_flag,
    check_int,
    check_same_device,
    check_tensor,
)

SCHEDULES = {"atomic": 0, "static": 1, "lab_bug": 2}
MAX_BATCH = 4096  # the prefix sum lives in registers: [next_pow2(B)] int32 per program
# tokens per work item: on the H200 (gpt-oss heads, BF16) 1024 ran faster than 256 and 128 on
# every speed workload, the skewed one included (one 32K among 63 x 512: 67.3 against 84.7
# and 109.6 us; uniform 64 x 4K: 180.9 against 209.2 and 251.8): fewer partials to write and
# merge, and 32 items still spread the long sequence
DEFAULT_CHUNK_TOKENS = 1024
# the default grid per SM: on the H200 (64/8 heads, d 64) 4 programs per SM ran 1.7-2.2x
# faster than one (uniform 64 x 4K: 266.5 against 581.7 us; skewed: 102.8 against 178.8),
# 2 between them: a program walks its items one after another, so one per SM left the SM
# mostly waiting on its loads
PROGRAMS_PER_SM = 4
# chunks merged per step, at most: a sequence's chunks (the next power of two) up to this, so
# a merge over one or two chunks loads no padding (offline for sm90: 304 SASS instructions at
# 2 against 512 at 16)
MERGE_BLOCK = 16
DEFAULT_STAGES = 3
# An item's KV heads side by side, at most this many columns (decode.py's heads_per_program;
# 64: one head per item at D 64 and 128). Two heads at D 64 (128) cost fewer instructions per
# byte in the token loop (offline for sm90, BF16: 18.3 SASS per KB of K/V against 23.4) but
# 161-197 registers against 109, so fewer programs fit per SM: on the H200 (gpt-oss heads,
# uniform batches) one head ran 0.73-0.78x batched, two heads 0.63-0.78x (2 stages) and
# 0.67-0.81x (3 stages); the sweep keeps timing two
MAX_TILE_COLS = 64


@triton.jit
def _chunk_span(lens, max_tokens, window_left, max_cps, CHUNK: tl.constexpr):
    """(first attended token, length, chunk count) of sequences of length ``lens``: lengths
    clamped to the block-table capacity (as decode.py), counts to max_cps, the partial
    buffers' chunks per sequence (sized from max_seq_len: memory safe whatever the lengths)."""
    lens = tl.minimum(tl.maximum(lens, 0), max_tokens)
    first = tl.where(window_left >= 0, tl.maximum(lens - 1 - window_left, 0), 0)
    return first, lens, tl.minimum(tl.cdiv(lens - first, CHUNK), max_cps)


@triton.jit
def _chunk_layout(seq_lens_ptr, batch, max_tokens, window_left, max_cps, CHUNK: tl.constexpr,
                  B_PAD: tl.constexpr):
    """Per sequence (vectors [B_PAD]): _chunk_span's first token, length and chunk count,
    and the inclusive prefix sum of the counts (the items' chunk index space)."""
    offs_b = tl.arange(0, B_PAD)
    lens = tl.load(seq_lens_ptr + offs_b, mask=offs_b < batch, other=0)
    first, lens, counts = _chunk_span(lens, max_tokens, window_left, max_cps, CHUNK)
    counts = tl.where(offs_b < batch, counts, 0)
    return offs_b, first, lens, counts, tl.cumsum(counts, axis=0)


@triton.jit
def _of_sequence(values, own_b):
    """One sequence's entry of a per-sequence vector ([B_PAD]; own_b: offs_b == b)."""
    return tl.sum(tl.where(own_b, values, 0), axis=0)


@triton.jit
def _normalise(acc, m, denom, sinks_ptr, heads, h_mask, HAS_SINKS: tl.constexpr):
    """acc / denom per row, the sink joined to the denominator (log2 units: m, the running
    maximum; denom, the sum of exp2(s - m)). Rows whose m is -inf (nothing computed) are
    NaN. The merge's last step, and a single-chunk item's."""
    computed = m > float("-inf")
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=h_mask, other=0.0) * 1.4426950408889634
        m_fin = tl.maximum(m, sink)
        scale = tl.exp2(m - m_fin)
        denom = denom * scale + tl.exp2(sink - m_fin)
        acc = acc * scale[:, None]
    return tl.where(computed[:, None], acc / denom[:, None], float("nan"))


@triton.jit
def _store_nan_rows(row_ptr, stride_h, num_heads, HEAD_DIM: tl.constexpr):
    """NaN into rows [0, num_heads) of one sequence's output (what the merge writes for a
    sequence nothing computed)."""
    offs_h = tl.arange(0, 16)
    offs_d = tl.arange(0, HEAD_DIM)
    nan = tl.full([16, HEAD_DIM], float("nan"), tl.float32).to(row_ptr.dtype.element_ty)
    for h0 in range(0, num_heads, 16):
        heads = h0 + offs_h
        tl.store(row_ptr + heads[:, None] * stride_h + offs_d[None, :], nan,
                 mask=(heads < num_heads)[:, None])


@triton.jit
def _load_tile(base, rows, head_off, c_d, scale_base, scale_rows, scale_head_off, mask,
               KV_FORMAT: tl.constexpr, INT4_GROUP: tl.constexpr, TILE: tl.constexpr,
               NAN_PATCH: tl.constexpr, OPAQUE: tl.constexpr):
    """One [BLOCK_N, HP * D] K or V tile (HP KV heads side by side) as TILE. rows: each
    token's offset of its first head's vector (in elements of the cache: bytes for INT4 and
    FP8); column j is head head_off[j] (its offset), dim c_d[j]; masked tokens read as 0."""
    if KV_FORMAT == 3:  # FP8 E4M3 bytes -> float16, exact: decode.py's tile decode
        return load_kv_tile(base, rows[:, None] + (head_off + c_d)[None, :], mask[:, None], 1,
                            TILE, OPAQUE, NAN_PATCH)
    elif KV_FORMAT == 2:  # INT4: nibble pairs (element 2k low) times the group's fp16 scale
        # Each element reads its own byte and group scale (a byte serves two lanes, a scale
        # its group: cached reloads), so the tile is [BLOCK_N, HP * D] from the start. The
        # first version joined the nibble halves and reshaped by group: inside the pipelined
        # loop it came out wrong on the H200 at block_n 16 (4081 of 4096 outputs, at 1-3
        # stages) where the interpreter matched the reference: a Triton 3.6 codegen fault,
        # inferred, not isolated.
        raw = tl.load(base + rows[:, None] + (head_off + c_d // 2)[None, :], mask=mask[:, None],
                      other=0).to(tl.int32)
        code = (raw >> ((c_d % 2) * 4)[None, :]) & 15
        sc = tl.load(scale_base + scale_rows[:, None]
                     + (scale_head_off + c_d // INT4_GROUP)[None, :], mask=mask[:, None],
                     other=0.0).to(tl.float32)
        return ((code - 8).to(tl.float32) * sc).to(TILE)
    else:
        return tl.load(base + rows[:, None] + (head_off + c_d)[None, :], mask=mask[:, None],
                       other=0.0).to(TILE)


@triton.jit(do_not_specialize=["window_left", "max_tokens", "num_pages", "batch", "max_items",
                               "max_cps"])
def _persistent_decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, block_tables_ptr, seq_lens_ptr, counter_ptr, owner_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr, sinks_ptr, out_ptr,
    batch, max_tokens, num_pages, max_items, max_cps, sm_scale_log2, window_left,
    k_scale_value, v_scale_value,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_ksp, stride_kss, stride_ksh, stride_vsp, stride_vss, stride_vsh,
    stride_bt, num_q_heads, num_kv_blocks,
    GROUP: tl.constexpr, HP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, B_PAD: tl.constexpr, SCHEDULE: tl.constexpr,
    RECORD_OWNER: tl.constexpr, KV_FORMAT: tl.constexpr, INT4_GROUP: tl.constexpr,
    Q_RESCALE: tl.constexpr, PRECISE_PV: tl.constexpr, TILE: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, K_SCALE_MODE: tl.constexpr, V_SCALE_MODE: tl.constexpr,
    NAN_PATCH: tl.constexpr, V_OPAQUE: tl.constexpr, LAZY_RESCALE: tl.constexpr,
    HAS_SINKS: tl.constexpr, DIRECT: tl.constexpr, MERGED: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_b, firsts, lens, counts, incl = _chunk_layout(seq_lens_ptr, batch, max_tokens,
                                                       window_left, max_cps, CHUNK, B_PAD)
    total = tl.minimum(tl.max(incl, axis=0) * num_kv_blocks, max_items)
    if not MERGED:  # no merge follows: a sequence with no chunk (length 0) is NaN here
        for bz in range(pid, batch, programs):
            if _of_sequence(counts, offs_b == bz) == 0:
                _store_nan_rows(out_ptr + tl.cast(bz, tl.int64) * stride_ob, stride_oh,
                                num_q_heads, HEAD_DIM)
    # An item's HP consecutive KV heads and their HP * GROUP query heads (rows) as decode.py's
    # program: KV tiles [BLOCK_N, HP * D] (256-byte token rows at BF16, D 64), q block-
    # diagonal [ROWS, HP * D], so one dot scores every row against its own KV head; P.V's
    # off-diagonal blocks are discarded at the store. With GROUP * HP <= 16 the extra heads
    # fill MMA rows that were padding, and the softmax and per-tile work is shared (HP 1 by
    # default: MAX_TILE_COLS).
    offs_r, r_head, r_mask, c_head, c_d, own = head_block_layout(GROUP, HP, ROWS, HEAD_DIM)
    k_head_off = c_head * stride_kh
    v_head_off = c_head * stride_vh
    ks_head_off = c_head * stride_ksh  # INT4 group scales
    vs_head_off = c_head * stride_vsh
    # FP8 per-tensor scales (decode.py's modes): K's folds into the score multiplier, V's
    # into the partial's acc; per-token ones scale score (K) / probability (V) columns.
    score_mult, out_mult = per_tensor_multipliers(
        sm_scale_log2, k_scale_value, ks_ptr, K_SCALE_MODE, v_scale_value, vs_ptr, V_SCALE_MODE)

    if SCHEDULE == 0:
        item = tl.atomic_add(counter_ptr, 1)
    elif SCHEDULE == 1:
        item = pid
    else:
        item = pid * 0  # the lab's: every program walks every item, computes its own sequence
    while item < total:
        kvh = (item % num_kv_blocks) * HP  # the item's first KV head
        c = item // num_kv_blocks
        b = tl.sum((incl <= c).to(tl.int32), axis=0)  # the sequence whose chunks hold c
        own_b = offs_b == b
        chunk0 = _of_sequence(incl - counts, own_b)  # b's first chunk
        seq_len = _of_sequence(lens, own_b)
        lo = _of_sequence(firsts, own_b) + (c - chunk0) * CHUNK
        hi = tl.minimum(lo + CHUNK, seq_len)
        if SCHEDULE == 2:  # the lab's defect: program p owns sequence p, nothing else
            lo = tl.where(b == pid, lo, hi)
        if RECORD_OWNER:
            if lo < hi:
                tl.store(owner_ptr + item, pid)

        heads = kvh * GROUP + offs_r
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
                    + c_d[None, :], mask=own, other=0.0).to(tl.float32)
        row_mult = tl.full([ROWS], 1.0, tl.float32) * score_mult
        if Q_RESCALE:
            # a bf16 query meets a float16 tile (INT4, FP8): each head's row scaled by a power of
            # two that puts its largest |q| in [2^14, 2^15), exact in float16 (decode.py's)
            e_q = (tl.max(tl.abs(q), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF
            e_q = tl.minimum(tl.maximum(e_q, 16), 254)
            q = q * ((268 - e_q) << 23).to(tl.float32, bitcast=True)[:, None]
            row_mult = row_mult * ((e_q - 14) << 23).to(tl.float32, bitcast=True)
        q = q.to(TILE).to(DOT)
        bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        ks_base = ks_ptr + kvh * stride_ksh
        vs_base = vs_ptr + kvh * stride_vsh

        # per-token V: p * scale enters float16 relative to a running power of two
        # 2^(e_v - 127) (decode.py's), so acc is rescaled when a larger scale arrives
        e_v = tl.full([], 1, tl.int32)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HP * HEAD_DIM], tl.float32)
        # The tiles load inside the loop, so Triton's pipeliner prefetches the next ones
        # (cp.async into shared memory, num_stages deep) while this one is computed.
        offs_tile = tl.arange(0, BLOCK_N)
        next_page = tile_page_ids(bt_row, lo, offs_tile, hi, PAGE_SIZE, True)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + offs_tile
            n_mask = offs_n < hi
            page = tl.minimum(tl.maximum(next_page, 0), num_pages - 1).to(tl.int64)
            next_page = tile_page_ids(bt_row, start + BLOCK_N, offs_tile, hi, PAGE_SIZE, True)
            slot = offs_n % PAGE_SIZE
            k = _load_tile(k_base, page * stride_kp + slot * stride_ks, k_head_off, c_d,
                           ks_base, page * stride_ksp + slot * stride_kss, ks_head_off, n_mask,
                           KV_FORMAT, INT4_GROUP, TILE, NAN_PATCH, False)
            s = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION) * row_mult[:, None]
            if K_SCALE_MODE == 2:  # per-token scales by row: each row its head's
                s = s * token_scales_by_row(ks_base + page * stride_ksp + slot * stride_kss,
                                            stride_ksh, n_mask, r_head, HP)
            s = tl.where(n_mask[None, :], s, float("-inf"))
            # every tile holds >= 1 token (decode.py's online softmax, eager or lazy)
            p, m_i, l_i, acc, alpha = online_softmax_tile(s, m_i, l_i, acc, LAZY_RESCALE)
            v = _load_tile(v_base, page * stride_vp + slot * stride_vs, v_head_off, c_d,
                           vs_base, page * stride_vsp + slot * stride_vss, vs_head_off, n_mask,
                           KV_FORMAT, INT4_GROUP, TILE, NAN_PATCH, V_OPAQUE)
            if V_SCALE_MODE == 2:
                vsc = token_scales_by_row(vs_base + page * stride_vsp + slot * stride_vss,
                                          stride_vsh, n_mask, r_head, HP)
                p, e_v, acc, alpha = per_token_v_step(p, vsc, e_v, acc, alpha, LAZY_RESCALE)
            # p in the tile type, plus its 16-bit rounding residue (decode.py's precise_pv)
            p_hi = p.to(TILE)
            v_t = v.to(DOT)
            acc = tl.dot(p_hi.to(DOT), v_t, acc if LAZY_RESCALE else acc * alpha[:, None],
                         input_precision=PRECISION)
            if PRECISE_PV:
                acc = tl.dot((p - p_hi.to(tl.float32)).to(TILE).to(DOT), v_t, acc)
        if V_SCALE_MODE == 2:
            acc = acc * (out_mult * pow2_from_biased_exponent(e_v))
        else:
            acc = acc * out_mult

        single = _of_sequence(counts, own_b) == 1
        if lo < hi:
            if DIRECT and single:  # b's only chunk: normalised here, the merge skips b
                o = _normalise(acc, m_i, l_i, sinks_ptr, heads, r_mask, HAS_SINKS)
                tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
                         + c_d[None, :], o.to(out_ptr.dtype.element_ty), mask=own)
            else:
                # partials by (sequence, its chunk): the merge needs b's length only
                row = (b.to(tl.int64) * max_cps + (c - chunk0)) * num_q_heads + heads
                tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + c_d[None, :], acc, mask=own)
                tl.store(part_m_ptr + row, m_i, mask=r_mask)
                tl.store(part_l_ptr + row, l_i, mask=r_mask)
        if SCHEDULE == 0:
            item = tl.atomic_add(counter_ptr, 1)
        elif SCHEDULE == 1:
            item += programs
        else:
            item += 1


@triton.jit(do_not_specialize=["window_left", "max_tokens", "max_cps"])
def _merge_chunks_kernel(
    seq_lens_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, sinks_ptr, out_ptr,
    max_tokens, window_left, max_cps, stride_ob, stride_oh, num_q_heads,
    CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_SINKS: tl.constexpr, MERGE: tl.constexpr, HB: tl.constexpr, DIRECT: tl.constexpr,
):
    """Log-sum-exp merge of one sequence's chunk partials for HB query heads (2 on a GPU: many
    small programs; all heads in the interpreter, whose cost is per program); the sink joins
    here. A head whose chunks are all still at m = -inf (never computed) is NaN. The loads
    wait on b's length only (its chunk count): m, l and acc load together. DIRECT: a
    sequence of one chunk was written by its item; its programs do nothing."""
    b = tl.program_id(0)
    offs_h = tl.program_id(1) * HB + tl.arange(0, HB)
    _, _, count = _chunk_span(tl.load(seq_lens_ptr + b), max_tokens, window_left, max_cps,
                              CHUNK)
    # (a head bound, not h_mask & (count != 1): the interpreter rejects a mask and-ed with
    # a scalar condition)
    heads = num_q_heads
    if DIRECT:  # one chunk: its item wrote the output, none of its heads is merged here
        heads = tl.where(count == 1, 0, num_q_heads)
        count = tl.where(count == 1, 0, count)
    h_mask = offs_h < heads
    begin = b.to(tl.int64) * max_cps
    end = begin + count
    offs_c = tl.arange(0, MERGE)
    offs_d = tl.arange(0, HEAD_DIM)
    m_all = tl.full([HB], float("-inf"), tl.float32)
    denom = tl.zeros([HB], tl.float32)
    acc = tl.zeros([HB, HEAD_DIM], tl.float32)
    for c0 in range(begin, end, MERGE):
        c = c0 + offs_c
        mask = (c < end)[:, None] & h_mask[None, :]  # [MERGE, HB]
        row = c[:, None] * num_q_heads + offs_h[None, :]
        m = tl.load(part_m_ptr + row, mask=mask, other=float("-inf"))
        m_new = tl.maximum(m_all, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(m - m_safe[None, :])
        keep = tl.exp2(m_all - m_safe)
        denom = denom * keep + tl.sum(tl.load(part_l_ptr + row, mask=mask, other=0.0) * w,
                                      axis=0)
        part = tl.load(part_acc_ptr + row[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                       mask=mask[:, :, None], other=0.0)
        part = tl.where((m > float("-inf"))[:, :, None], part * w[:, :, None], 0.0)  # unwritten
        acc = acc * keep[:, None] + tl.sum(part, axis=0)
        m_all = m_new
    o = _normalise(acc, m_all, denom, sinks_ptr, offs_h, h_mask, HAS_SINKS)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + offs_h[:, None] * stride_oh
             + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])


_SAME, _FP32, _INT4, _FP8 = 0, 1, 2, 3  # KV formats (constexpr KV_FORMAT)
# [tuning] register caps per KV format (persistent_decode_attention's maxnreg)
DEFAULT_MAXNREG = {_SAME: 128}
KV_FORMAT_NAMES = {_SAME: "16bit", _FP32: "fp32", _INT4: "int4", _FP8: "fp8"}


def _kv_format(q, k_cache, v_cache, k_group_scale, v_group_scale) -> int:
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
    given = (k_group_scale is not None, v_group_scale is not None)
    if k_cache.dtype == torch.uint8:
        if given != (True, True):
            raise TypeError("uint8 k_cache/v_cache are INT4 codes: k_group_scale and "
                            "v_group_scale (float16) are required")
        return _INT4
    if any(given):
        raise TypeError(f"k_group_scale/v_group_scale belong to INT4 (uint8) caches, got "
                        f"k_cache dtype {k_cache.dtype}")
    if k_cache.dtype == q.dtype:
        return _SAME
    if k_cache.dtype == torch.float32:
        return _FP32
    if k_cache.dtype == torch.float8_e4m3fn:
        return _FP8
    raise TypeError(f"k_cache dtype {k_cache.dtype}: require q's dtype ({q.dtype}), float32, "
                    "float8_e4m3fn, or uint8 INT4 codes (other FP8 caches: "
                    "paged_decode_attention)")


def _check_group_scales(k_cache, k_group_scale, v_group_scale, head_dim: int) -> int:
    """The INT4 scale tensors: float16 [pages, page_size, Hkv, D/group]; returns group."""
    for name, t in (("k_group_scale", k_group_scale), ("v_group_scale", v_group_scale)):
        check_tensor(t, name)
        check_same_device(t, name, k_cache, "k_cache")
        if t.dtype != torch.float16:
            raise TypeError(f"{name} must be float16, got {t.dtype}")
        if t.dim() != 4 or t.shape[:3] != k_cache.shape[:3] or head_dim % t.shape[3] \
                or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [{', '.join(map(str, k_cache.shape[:3]))}, "
                             f"D/group] contiguous in its last dim, got {tuple(t.shape)}")
    if k_group_scale.shape != v_group_scale.shape:
        raise ValueError(f"k_group_scale {tuple(k_group_scale.shape)} != v_group_scale "
                         f"{tuple(v_group_scale.shape)}")
    group = head_dim // k_group_scale.shape[3]
    if group < 16 or group & (group - 1):
        raise ValueError(f"k_group_scale: group {group} must be a power of two >= 16")
    return group


def _block_n(head_dim: int) -> int:
    if interpreted():
        return 64  # few tiles: the interpreter's cost is per tile
    return 64 if head_dim == 64 else 32


def persistent_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sinks: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    num_programs: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    max_seq_len: int | None = None,
    checked: bool | None = None,
    schedule: str = "atomic",
    owner: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    k_group_scale: torch.Tensor | None = None,
    v_group_scale: torch.Tensor | None = None,
    k_scale=None,
    v_scale=None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    max_tile_cols: int = MAX_TILE_COLS,
    lazy_rescale: bool = False,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """Decode attention of one query per sequence over a paged KV cache, persistent.

    Arguments as ``paged_decode_attention`` (q [B, Hq, D] bf16/fp16, D 64 or 128; int32
    block_tables [B, max_pages] and seq_lens [B], lengths >= 1; sinks [Hq] or None;
    window_left -1 or >= 0), KV in one of three formats:
    - q's dtype or float32: k_cache, v_cache [num_pages, page_size, Hkv, D] (float32 is
      attended in float32 with IEEE dots);
    - INT4 (``kvperf_kernels.quant.int4``): uint8 [num_pages, page_size, Hkv, D/2] codes with
      ``k_group_scale``/``v_group_scale`` float16 [num_pages, page_size, Hkv, D/group],
      decoded in registers to float16 tiles (a bf16 query rescaled per head, exact);
    - FP8: float8_e4m3fn [num_pages, page_size, Hkv, D] with ``k_scale``/``v_scale`` as
      ``paged_decode_attention`` takes them (None, a float or a float32 one-element tensor:
      per-tensor; float32 [num_pages, page_size, Hkv], a trailing 1 allowed: per-token),
      decoded by decode.py's tile decode to float16 (exact; bf16 query rescaled per head);
    plus:
    block_n: tokens per tile (block-k; a power of two >= 16; default 64, 32 for D 128).
    num_programs: the grid (default: PROGRAMS_PER_SM x the SM count; 4 in the
        interpreter).
    num_warps, num_stages: Triton's (num_stages: the depth of the tile prefetch; 1 loads
        each tile when it is needed). None: DEFAULT_STAGES.
    max_tile_cols: an item's KV heads side by side are at most this many columns
        (decode.py's heads_per_program; the default 64 is one head per item, 128 two at
        D 64).
    lazy_rescale: [tuning] decode.py's ``DecodeLaunch.lazy_rescale`` (the accumulator
        rescaled only where a row's running max grows by more than 8); on the H200 ~1 %
        faster (uniform 64 x 4K: 167.8 against 168.9 us), within noise: off.
    maxnreg: [tuning] registers per thread ptxas may use (Triton's maxnreg; 0: ptxas's
        choice; None: DEFAULT_MAXNREG for the KV format at one KV head per item, i.e. 128
        for 16-bit KV, and no cap otherwise). Offline for sm90 the BF16 default (one head,
        64-token tiles, 3 stages) takes 140 registers, so 3 of the grid's 4 programs per SM
        fit (the batched kernel: 67 at one head, 103 at two, 4 fit); capped at 128, 4 fit
        and the 10 spilled values load per item, outside the token loop. H200 (2026-12-03,
        gpt-oss heads, BF16), us capped / uncapped: skewed 1 x 32K + 63 x 512 65.5 / 68.7,
        uniform 64 x 1K 55.9 / 72.0, 64 x 4K 167.0 / 186.9, 8 x 8K 52.7 / 52.1. The other
        formats stay uncapped: FP8 per-token takes 135 (4 spills at 128, not timed), INT4
        already spills at 255.
    chunk_tokens: tokens per work item (a multiple of the tile, 64 in the interpreter).
    max_seq_len: bound on the lengths, sizes the partial buffers (None: read from seq_lens,
        one sync, or the block table's capacity when ``checked=False``).
    checked: data checks (lengths, page ids, sinks; one sync), as decode.py: None checks
        when max_seq_len is None; False is CUDA-graph capturable.
    schedule: "atomic" (default), "static" or "lab_bug" (the negative control: sequences
        beyond the program count are never computed and come out NaN).
    owner: optional int32 [>= items] tensor; each item's program id is stored there (-1: an
        item of the lab's schedule that computed nothing): the coverage/balance check.
    Returns [B, Hq, D] in q's dtype; B == 0 returns the empty output without a launch.
    """
    check_tensor(q, "q")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"persistent_decode_attention: q dtype {q.dtype}; require BF16/FP16")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name)
    kv_format = _kv_format(q, k_cache, v_cache, k_group_scale, v_group_scale)
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        check_tensor(t, name)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                         "must both be [num_pages, page_size, Hkv, D] (D/2 bytes for INT4)")
    batch, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, kv_dim = k_cache.shape
    stored = head_dim // 2 if kv_format == _INT4 else head_dim
    if head_dim not in HEAD_DIMS or kv_dim != stored:
        raise ValueError(f"q: head_dim {head_dim}, k_cache last dim {kv_dim} (expected "
                         f"{stored}); supported head_dims: {HEAD_DIMS}")
    int4_group = 1
    if kv_format == _INT4:
        int4_group = _check_group_scales(k_cache, k_group_scale, v_group_scale, head_dim)
    if kv_format == _FP8:  # decode.py's scale contract (types, shapes, device)
        k_mode, k_scale_t, k_scale_v, k_scale_strides = scale_args("k_scale", k_scale, k_cache)
        v_mode, v_scale_t, v_scale_v, v_scale_strides = scale_args("v_scale", v_scale, v_cache)
    elif k_scale is not None or v_scale is not None:
        raise TypeError(f"k_scale/v_scale belong to FP8 (float8_e4m3fn) caches, got k_cache "
                        f"dtype {k_cache.dtype}")
    else:
        k_mode = v_mode = 0  # scalar 1.0: the 16-bit, fp32 and INT4 paths are unchanged
        k_scale_v = v_scale_v = 1.0
    if num_q_heads % num_kv_heads or num_q_heads // num_kv_heads > 64:
        raise ValueError(f"q: Hq ({num_q_heads}) must be a multiple of Hkv ({num_kv_heads}), "
                         "group <= 64")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {t.stride()}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_pages], got "
                         f"{tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1 and block_tables.shape[1] > 1:
        raise ValueError("block_tables must be contiguous along its page dimension")
    if seq_lens.shape != (batch,) or not seq_lens.is_contiguous():
        raise ValueError(f"seq_lens must be contiguous [B={batch}], got {tuple(seq_lens.shape)}")
    if batch > MAX_BATCH:
        raise ValueError(f"q: batch {batch} > {MAX_BATCH} (the persistent kernel's bound)")
    sinks, window_left, sm_scale = check_shared_args(
        q, k_cache, v_cache, block_tables, seq_lens, sinks, window_left, sm_scale)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    if block_n is None:
        block_n = _block_n(head_dim)
    else:
        check_int(block_n, "block_n", 16)
        if block_n & (block_n - 1) or block_n > 256:
            raise ValueError(f"block_n must be a power of two in [16, 256], got {block_n}")
    check_int(chunk_tokens, "chunk_tokens", 1)
    if interpreted():
        chunk_tokens = max(chunk_tokens, block_n)
    if chunk_tokens % block_n:
        raise ValueError(f"chunk_tokens {chunk_tokens} must be a multiple of the tile "
                         f"({block_n} tokens)")
    if num_programs is None:
        num_programs = (4 if interpreted() or q.device.type != "cuda"
                        else PROGRAMS_PER_SM * sm_count(q.device))
    check_int(num_programs, "num_programs", 1)
    check_int(num_warps, "num_warps", 1)
    if num_stages is None:
        num_stages = DEFAULT_STAGES
    check_int(num_stages, "num_stages", 1)
    check_flag(checked, "checked")
    if not isinstance(lazy_rescale, bool):
        raise TypeError(f"lazy_rescale must be True or False, got {lazy_rescale!r}")
    if maxnreg is not None and maxnreg != 0:
        check_int(maxnreg, "maxnreg", 24)
    capacity = check_max_seq_len(max_seq_len, block_tables, page_size)
    out = checked_out(out, q)
    if batch == 0:
        return out
    if checked or (checked is None and max_seq_len is None):
        lens_max = check_table_values(block_tables, seq_lens, page_size, num_pages, max_seq_len,
                                 sinks, (("k_scale", k_mode, k_scale_t if k_mode else None),
                                         ("v_scale", v_mode, v_scale_t if v_mode else None)))
        max_seq_len = max_seq_len or lens_max
    elif max_seq_len is None:
        max_seq_len = capacity
    attended = max_seq_len if window_left < 0 else min(max_seq_len, window_left + 1)
    max_cps = triton.cdiv(attended, chunk_tokens)  # chunks per sequence, at most
    max_chunks = batch * max_cps
    group = num_q_heads // num_kv_heads
    check_int(max_tile_cols, "max_tile_cols", 1)
    hp = heads_per_program(group, num_kv_heads, head_dim, max_tile_cols)
    max_items = max_chunks * (num_kv_heads // hp)
    if owner is not None:
        check_tensor(owner, "owner")
        if owner.dtype != torch.int32 or owner.numel() < max_items or owner.device != q.device:
            raise ValueError(f"owner must be int32 with >= {max_items} elements on {q.device}")

    device = q.device
    # A sequence of one chunk is normalised by its item (DIRECT; not under the lab's
    # schedule, whose skipped items must come out NaN through the merge), so where no
    # sequence can have two (max_cps 1) no merge runs and no partials are kept.
    direct = schedule != "lab_bug"
    merged = not direct or max_cps > 1
    kept = max_chunks if merged else 1  # partials kept (one unused row without a merge)
    part_acc = torch.empty(kept, num_q_heads, head_dim, device=device, dtype=torch.float32)
    # The partial maxima start at -inf only under the lab's schedule, which skips items: an
    # unwritten chunk must read as -inf (NaN out), not as whatever a previous call left; under
    # the others every chunk the merge reads is written (one fill fewer: ~1.5 us plus its
    # gap). The work counter is its own allocation: placed behind the maxima (one fill for
    # both) the atomic kernel ran 59.8 against 41.6 us at 64 x 1K on the H200, inferred from
    # the counter sharing an L2 line with the maxima the items store, not isolated.
    if schedule == "lab_bug":
        part_m = torch.full((kept, num_q_heads), float("-inf"), device=device,
                            dtype=torch.float32)
    else:
        part_m = torch.empty(kept, num_q_heads, device=device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    counter = torch.zeros(1, device=device, dtype=torch.int32)
    if maxnreg is None:  # the cap was timed at one head per item (two need ~200 registers)
        maxnreg = DEFAULT_MAXNREG.get(kv_format, 0) if hp == 1 else 0
    q_type = tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16
    tile = {_SAME: q_type, _FP32: tl.float32, _INT4: tl.float16, _FP8: tl.float16}[kv_format]
    b_pad = max(2, triton.next_power_of_2(batch))
    k_arg, v_arg = k_cache, v_cache
    if kv_format == _INT4:
        ks, vs = k_group_scale, v_group_scale
        scale_strides = (*ks.stride()[:3], *vs.stride()[:3])
    elif kv_format == _FP8:  # bytes in, decoded in the kernel (as decode.py passes them)
        k_arg, v_arg = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        ks, vs = k_scale_t, v_scale_t
        scale_strides = (*k_scale_strides, *v_scale_strides)
    else:
        ks, vs, scale_strides = k_cache, v_cache, (0,) * 6
    _persistent_decode_kernel[(num_programs,)](
        q, k_arg, v_arg, ks, vs, block_tables, seq_lens, counter,
        owner if owner is not None else counter, part_acc, part_m, part_l,
        sinks if sinks is not None else part_m, out,
        batch, capacity, min(num_pages, 2**31 - 1), max_items, max_cps, sm_scale * LOG2E,
        window_left,
        k_scale_v, v_scale_v,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *scale_strides,
        block_tables.stride(0), num_q_heads, num_kv_heads // hp,
        GROUP=group, HP=hp, ROWS=max(16, triton.next_power_of_2(group * hp)),
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size, BLOCK_N=block_n, CHUNK=chunk_tokens, B_PAD=b_pad,
        SCHEDULE=SCHEDULES[schedule], RECORD_OWNER=owner is not None, KV_FORMAT=kv_format,
        INT4_GROUP=int4_group, Q_RESCALE=tile == tl.float16 and q_type == tl.bfloat16,
        # decode.py's defaults: FP8 with a bf16 query rounds p once (float16 p, 2^-11, is
        # under bf16's ulp); FP8 V decoded in inline PTX on a GPU (decode_asm=2: not hoisted
        # into the dot operand, where V would be gathered byte by byte)
        PRECISE_PV=kv_format != _FP32 and not (kv_format == _FP8 and q_type == tl.bfloat16),
        V_OPAQUE=kv_format == _FP8 and not interpreted(), LAZY_RESCALE=lazy_rescale, TILE=tile,
        # the interpreter computes 16-bit tl.dot wrongly (Triton 3.9): fp32 operands there
        DOT=tl.float32 if interpreted() else tile,
        PRECISION="ieee" if kv_format == _FP32 else "tf32", K_SCALE_MODE=k_mode,
        V_SCALE_MODE=v_mode, NAN_PATCH=interpreted(), HAS_SINKS=sinks is not None,
        DIRECT=direct, MERGED=merged, num_warps=num_warps,
        num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg and not interpreted() else {}),
    )
    if not merged:
        return out
    hb = max(2, triton.next_power_of_2(num_q_heads)) if interpreted() else 2
    _merge_chunks_kernel[(batch, triton.cdiv(num_q_heads, hb))](
        seq_lens, part_acc, part_m, part_l, sinks if sinks is not None else part_m, out,
        capacity, window_left, max_cps, out.stride(0), out.stride(1), num_q_heads,
        CHUNK=chunk_tokens, HEAD_DIM=head_dim, HAS_SINKS=sinks is not None,
        MERGE=min(MERGE_BLOCK, max(2, triton.next_power_of_2(max_cps))), HB=hb,
        DIRECT=direct, num_warps=4,
    )
    return out


def host_loop_decode(q, k_cache, v_cache, block_tables, seq_lens, **kwargs) -> torch.Tensor:
    """The lab's baseline: one launch (of ``paged_decode_attention``, batch 1) per sequence.
    Keyword arguments are the batched kernel's; ``out`` is filled row by row."""
    from kvperf_kernels.attention.decode import paged_decode_attention

    out = kwargs.pop("out", None)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for b in range(q.shape[0]):
        paged_decode_attention(q[b:b + 1], k_cache, v_cache, block_tables[b:b + 1],
                               seq_lens[b:b + 1], out=out[b:b + 1], **kwargs)
    return out


_ALIGNED_STRIDES = ("stride_qb", "stride_ob", "stride_oh", "stride_kp", "stride_ks", "stride_kh",
                    "stride_vp", "stride_vs", "stride_vh")


def sm_compile_report(capability: int = 90) -> dict[str, dict]:
    """Compile every KV format x schedule variant and the merge offline for cuda:``capability``
    (``offline_compile``; under the interpreter in a child): per variant, its atomics, E4M3
    converts and cp.async copies (the pipelined tile loads) in the PTX, and at the default
    stages the copy groups its token loop keeps in flight while it waits (``prefetch_depth``).
    A kernel edit that no longer compiles for the GPU, or whose token loop leaves the
    pipeliner or waits for the copies it has just issued, fails on the CPU."""
    if interpreted():
        return in_child("kvperf_kernels.attention.persistent_decode", "sm_compile_report",
                        capability)
    report = {}
    tiles = {_SAME: ("*bf16", "*bf16", tl.bfloat16), _FP32: ("*fp32", "*fp32", tl.float32),
             _INT4: ("*u8", "*fp16", tl.float16), _FP8: ("*u8", "*fp32", tl.float16)}
    # every schedule in 16-bit, every format with the atomic one, FP8 with per-token and
    # per-tensor (tensor) scales (compiles take ~1.5 s each); (format, schedule, scale mode,
    # KV heads per item, a merge follows): the default's one head, and two for 16-bit and
    # FP8 per-token (max_tile_cols=128); 16-bit without a merge (single-chunk batches)
    variants = [(_SAME, name, 0, 1, True) for name in SCHEDULES] + [
        (_FP32, "atomic", 0, 1, True), (_INT4, "atomic", 0, 1, True),
        (_FP8, "atomic", 2, 1, True), (_FP8, "atomic", 1, 1, True),
        (_SAME, "atomic", 0, 2, True), (_FP8, "atomic", 2, 2, True),
        (_SAME, "atomic", 0, 1, False)]
    for fmt, name, mode, hp, merged in variants:
        cache, scale, tile = tiles[fmt]
        schedule = SCHEDULES[name]
        types = dict(q_ptr="*bf16", k_ptr=cache, v_ptr=cache, ks_ptr=scale, vs_ptr=scale,
                     block_tables_ptr="*i32", seq_lens_ptr="*i32", counter_ptr="*i32",
                     owner_ptr="*i32", part_acc_ptr="*fp32", part_m_ptr="*fp32",
                     part_l_ptr="*fp32", sinks_ptr="*fp32", out_ptr="*bf16",
                     sm_scale_log2="fp32", k_scale_value="fp32", v_scale_value="fp32")
        const = dict(GROUP=8, HP=hp, ROWS=16, HEAD_DIM=64, PAGE_SIZE=16, BLOCK_N=64,
                     CHUNK=DEFAULT_CHUNK_TOKENS, B_PAD=64, SCHEDULE=schedule,
                     RECORD_OWNER=True, KV_FORMAT=fmt, INT4_GROUP=32 if fmt == _INT4 else 1,
                     Q_RESCALE=fmt in (_INT4, _FP8), PRECISE_PV=fmt not in (_FP32, _FP8),
                     TILE=tile, DOT=tile, PRECISION="ieee" if fmt == _FP32 else "tf32",
                     K_SCALE_MODE=mode, V_SCALE_MODE=mode, NAN_PATCH=False,
                     V_OPAQUE=fmt == _FP8, LAZY_RESCALE=False, HAS_SINKS=True,
                     DIRECT=name != "lab_bug", MERGED=merged)
        # the cache strides are multiples of 16 elements at these shapes, as a launch
        # declares them (then tile rows vectorise and load through cp.async)
        asm = compile_offline(_persistent_decode_kernel, types, const, capability=capability,
                              num_stages=DEFAULT_STAGES, aligned=_ALIGNED_STRIDES)
        ptx = asm["ptx"]
        label = (KV_FORMAT_NAMES[fmt] + {0: "", 1: "_per_tensor", 2: "_per_token"}[mode]
                 + ("_2heads" if hp == 2 else "") + ("" if merged else "_unmerged"))
        report[f"{label}-{name}"] = {"atomics": ptx.count("atom."),
                                     "e4m3_converts": ptx.count("cvt.rn.f16x2.e4m3x2"),
                                     "async_copies": ptx.count("cp.async."),
                                     "prefetch_depth": prefetch_depth(asm["ttgir"])}
    types = dict(seq_lens_ptr="*i32", part_acc_ptr="*fp32", part_m_ptr="*fp32",
                 part_l_ptr="*fp32", sinks_ptr="*fp32", out_ptr="*bf16")
    ptx = compile_offline(_merge_chunks_kernel, types,
                          dict(CHUNK=DEFAULT_CHUNK_TOKENS, HEAD_DIM=64,
                               HAS_SINKS=True, MERGE=MERGE_BLOCK, HB=2, DIRECT=True),
                          capability=capability)["ptx"]
    report["merge"] = {"atomics": ptx.count("atom.")}
    return report
