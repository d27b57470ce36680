"""Split-KV paged decode attention with attention sinks (Triton), for GQA models like gpt-oss.

One query token per sequence attends to its paged KV cache (see ``kvperf_kernels.paged_kv``
for the layout). Sink semantics are FlashInfer's (AttentionSink variant / ``sinks=``):
the sink is one natural-log logit per query head that joins the softmax denominator
exactly once, with a zero value row and no sm_scale or k_scale applied:

    out_h = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink_h)),   s_j = sm_scale * q_h . k_j

Sliding window as FlashInfer: ``window_left = w >= 0`` attends to the last w+1 tokens
(the current one included); -1 attends to all.

Design:
- one program per (sequence, KV head, split) handles all Hq/Hkv query heads of that KV
  head, so each KV byte is read from memory once (the kernel is bandwidth bound);
- FP8 KV (float8_e4m3fn; float8_e4m3fnuz decoded from its bits, max 240) is dequantised
  in registers to the query's 16-bit type (exact for E4M3) and fed to the tensor cores;
  per-tensor scales fold into the score / output multipliers, per-token scales scale
  score columns (K) and probability columns (V); P enters the P.V product as a 16-bit
  value plus its 16-bit rounding residue (see ``precise_pv``);
- split-KV: a sequence's (windowed) range is cut into ``num_splits`` chunks; each writes
  an unnormalised partial (acc, running max, running sum) and a merge kernel combines
  them by log-sum-exp, adding the sink there, once. With one split the decode kernel
  normalises and adds the sink itself.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from kvperf_kernels._device import interpreted

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
MAX_SPLITS = 128
_FP8_QUERY_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
_E4M3FNUZ = getattr(torch, "float8_e4m3fnuz", None)
# KV formats the kernel decodes (constexpr KV_FORMAT).
_KV_16BIT, _KV_E4M3FN, _KV_E4M3FNUZ = 0, 1, 2
# How a scale reaches the kernel (constexpr *_SCALE_MODE).
_SCALE_SCALAR, _SCALE_TENSOR1, _SCALE_PER_TOKEN = 0, 1, 2


@triton.jit
def _load_kv_tile(ptr, offs, mask, KV_FORMAT: tl.constexpr, COMPUTE: tl.constexpr):
    """Load a [BLOCK_N, D] KV tile and return it as COMPUTE (the query's 16-bit type)."""
    if KV_FORMAT == 2:
        # e4m3fnuz (bias 8, max 240, NaN only at 0x80) has no Triton type on NVIDIA: decode
        # the bytes as e4m3fn (bias 7), halve, and patch the codes where the formats differ.
        raw = tl.load(ptr + offs, mask=mask, other=0)
        x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * 0.5
        x = tl.where((raw & 0x7F) == 0x7F, tl.where(raw >= 128, -240.0, 240.0), x)
        x = tl.where(raw == 0x80, float("nan"), x)
        return x.to(COMPUTE)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(COMPUTE)


# window_left is -1 or a length: keep Triton from turning the value 1 into a constant.
@triton.jit(do_not_specialize=["window_left"])
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, k_scale_value, v_scale_value,
    block_tables_ptr, seq_lens_ptr, sinks_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    sm_scale_log2, window_left,
    stride_qb, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ksp, stride_kss, stride_ksh,
    stride_vsp, stride_vss, stride_vsh,
    stride_bt,
    stride_ob, stride_oh,
    num_q_heads,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_FORMAT: tl.constexpr, K_SCALE_MODE: tl.constexpr, V_SCALE_MODE: tl.constexpr,
    HAS_SINKS: tl.constexpr, IS_SPLIT: tl.constexpr,
    COMPUTE: tl.constexpr, DOT: tl.constexpr, PRECISE_PV: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seq_len = tl.load(seq_lens_ptr + b)
    # Sliding window: the decode query sits at seq_len - 1 and sees window_left + 1 tokens.
    first = tl.where(window_left >= 0, tl.maximum(seq_len - 1 - window_left, 0), 0)
    # Chunks are whole BLOCK_N tiles so only a sequence's last tile is ragged.
    chunk = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None], other=0.0,
    )
    q = q.to(DOT)

    # Per-tensor scales: K's folds into the score multiplier, V's into the output.
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

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        k_rows = page * stride_kp + slot * stride_ks + kv_head * stride_kh
        k = _load_kv_tile(k_ptr, k_rows[:, None] + offs_d[None, :], n_mask[:, None],
                          KV_FORMAT, COMPUTE)
        s = tl.dot(q, tl.trans(k.to(DOT)))  # [GROUP_PAD, BLOCK_N], fp32
        if K_SCALE_MODE == 2:
            ks = tl.load(k_scale_ptr + page * stride_ksp + slot * stride_kss
                         + kv_head * stride_ksh, mask=n_mask, other=0.0)
            s = s * (ks * score_mult)[None, :]
        else:
            s = s * score_mult
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every tile holds >= 1 valid token, so m_new is finite and alpha/p are well defined.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = page * stride_vp + slot * stride_vs + kv_head * stride_vh
        v = _load_kv_tile(v_ptr, v_rows[:, None] + offs_d[None, :], n_mask[:, None],
                          KV_FORMAT, COMPUTE)
        if V_SCALE_MODE == 2:
            vs = tl.load(v_scale_ptr + page * stride_vsp + slot * stride_vss
                         + kv_head * stride_vsh, mask=n_mask, other=0.0)
            pv = p * vs[None, :]
        else:
            pv = p
        # The tensor cores take p in 16 bits. Rounded once (as FlashAttention does) it costs
        # up to 2^-9 * sum(p|v|), far above the output's ulp when terms cancel; a second
        # product with the rounding residue makes it ~2^-17 for a few extra MMAs.
        v = v.to(DOT)
        p_hi = pv.to(COMPUTE)
        acc = tl.dot(p_hi.to(DOT), v, acc * alpha[:, None])
        if PRECISE_PV:
            p_lo = (pv - p_hi.to(tl.float32)).to(COMPUTE)
            acc = tl.dot(p_lo.to(DOT), v, acc)
        m_i = m_new
    acc = acc * out_mult

    if IS_SPLIT:
        # Unnormalised partial; an empty split leaves m=-inf, l=0, acc=0 for the merge.
        row = (b.to(tl.int64) * num_q_heads + heads) * num_splits + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_mask[:, None])
        tl.store(part_m_ptr + row, m_i, mask=g_mask)
        tl.store(part_l_ptr + row, l_i, mask=g_mask)
    else:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0) * 1.4426950408889634
            m_all = tl.maximum(m_i, sink)
            keep = tl.exp2(m_i - m_all)
            denom = l_i * keep + tl.exp2(sink - m_all)
            o = acc * (keep / denom)[:, None]
        else:
            o = acc / l_i[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh
                 + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


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


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch_size: int, num_kv_heads: int, kv_len: int, num_sms: int,
                      *, min_tokens_per_split: int = 256, waves: int = 2) -> int:
    """Split count so that batch * Hkv * splits programs fill ``waves`` waves of SMs, keeping
    at least ``min_tokens_per_split`` tokens per split (the merge must stay cheap)."""
    programs = batch_size * num_kv_heads
    wanted = -(-waves * num_sms // programs)
    by_length = max(1, kv_len // min_tokens_per_split)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def _default_block_n(kv_dtype: torch.dtype, head_dim: int) -> int:
    if interpreted():
        return 256  # the interpreter: fewest tiles without numpy temporaries outgrowing cache
    # [tuning] FP8 tiles are half the bytes: read more tokens per step.
    return 128 if kv_dtype.itemsize == 1 and head_dim <= 64 else 64


def _kv_format(kv_dtype: torch.dtype, q_dtype: torch.dtype) -> int:
    if kv_dtype == torch.float8_e4m3fn:
        return _KV_E4M3FN
    if _E4M3FNUZ is not None and kv_dtype == _E4M3FNUZ:
        return _KV_E4M3FNUZ
    if kv_dtype in (torch.bfloat16, torch.float16):
        if kv_dtype != q_dtype:
            raise TypeError(
                f"16-bit KV cache must have the query's dtype: query {q_dtype}, KV {kv_dtype}"
            )
        return _KV_16BIT
    supported = ["torch.bfloat16", "torch.float16", "torch.float8_e4m3fn"]
    if _E4M3FNUZ is not None:
        supported.append("torch.float8_e4m3fnuz")
    raise NotImplementedError(
        f"paged_decode_attention: KV cache dtype {kv_dtype} is not supported "
        f"(supported: {', '.join(supported)})"
    )


def _scale_args(name: str, scale, cache: torch.Tensor):
    """(mode, tensor for the pointer, scalar value, strides) for one K or V scale."""
    dummy_strides = (0, 0, 0)
    if scale is None:
        return _SCALE_SCALAR, cache, 1.0, dummy_strides
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be None, a float or a float32 tensor, got {type(scale)}")
    if not torch.is_tensor(scale):
        value = float(scale)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite positive number, got {value}")
        return _SCALE_SCALAR, cache, value, dummy_strides
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    if scale.device != cache.device:
        raise ValueError(f"{name} is on {scale.device}, the cache on {cache.device}")
    if scale.numel() == 1:
        return _SCALE_TENSOR1, scale, 1.0, dummy_strides
    per_token = tuple(cache.shape[:3])
    if scale.dim() == 4 and scale.shape[-1] == 1:
        scale = scale.squeeze(-1)  # quantize_per_token's [..., 1]
    if tuple(scale.shape) != per_token:
        raise ValueError(
            f"{name} must have one element (per-tensor) or shape {per_token} "
            f"[num_pages, page_size, Hkv] (per-token), got {tuple(scale.shape)}"
        )
    return _SCALE_PER_TOKEN, scale, 1.0, tuple(scale.stride())


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    k_scale=None,
    v_scale=None,
    sinks: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    precise_pv: bool = True,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over a paged KV cache, with sinks.

    q: [B, Hq, D] bfloat16/float16 (D 64 or 128; last dim contiguous).
    k_cache, v_cache: [num_pages, page_size, Hkv, D] (NHD), bf16/fp16 (= q's dtype),
        float8_e4m3fn or float8_e4m3fnuz; Hq a multiple of Hkv (GQA); last dim contiguous.
    block_tables: int32 [B, max_pages]; seq_lens: int32 [B], every length >= 1.
    k_scale, v_scale: dequantisation scales (value = stored * scale): None (1.0), a float or
        float32 one-element tensor (per-tensor), or float32 [num_pages, page_size, Hkv]
        (per-token: one per token vector, as ``fp8_quant.quantize_per_token`` gives it; a
        trailing 1 is accepted).
    sinks: [Hq] natural-log logits (FlashInfer's definition, see the module docstring) or None.
    sm_scale: default 1/sqrt(D). window_left: -1 (off) or w >= 0 (last w+1 tokens).
    num_splits: split-KV count; None picks one from B*Hkv, the length and the SM count.
    max_seq_len: the longest length, used only for the split heuristic. When None it is read
        from seq_lens (one device sync) and the lengths and block-table entries are checked;
        pass it to skip that (no sync, CUDA-graph capturable).
    block_n, num_warps, num_stages: tile and launch tuning (None: the launcher's choice).
    precise_pv: multiply V by p's 16-bit rounding residue too (p effectively ~16 bits
        instead of 8 for BF16); False is FlashAttention's single rounding.
    Returns [B, Hq, D] in q's dtype (written into ``out`` when given).

    Raises NotImplementedError for an FP8 query ("require BF16/FP16 query") or an unsupported
    KV dtype, TypeError for other dtype mismatches, ValueError for shapes and values.
    """
    # --- dtypes: the lab's error contract -------------------------------------------------
    if not torch.is_tensor(q):
        raise TypeError(f"q must be a torch.Tensor, got {type(q)}")
    if q.dtype in _FP8_QUERY_DTYPES:
        raise NotImplementedError(
            f"paged_decode_attention: got an FP8 query ({q.dtype}); decode attention with sinks "
            f"and FP8 KV require BF16/FP16 query"
        )
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"paged_decode_attention: query dtype {q.dtype}; require BF16/FP16 query")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
    kv_format = _kv_format(k_cache.dtype, q.dtype)

    # --- shapes ---------------------------------------------------------------------------
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_pages, page_size, Hkv, D] (NHD), got {tuple(k_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}")
    batch, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, kv_dim = k_cache.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported (supported: {HEAD_DIMS})")
    if kv_dim != head_dim:
        raise ValueError(f"KV head_dim {kv_dim} != query head_dim {head_dim}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"Hq ({num_q_heads}) must be a multiple of Hkv ({num_kv_heads}) for GQA"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), "
                             f"got strides {t.stride()}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_pages], got "
                         f"{tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along its page dimension")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be [B={batch}], got {tuple(seq_lens.shape)}")
    if not seq_lens.is_contiguous():
        raise ValueError("seq_lens must be contiguous")
    device = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache),
                    ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, q on {device}")
    if sinks is not None:
        if not torch.is_tensor(sinks) or not sinks.dtype.is_floating_point:
            got = getattr(sinks, "dtype", type(sinks))
            raise TypeError(f"sinks must be a float tensor [Hq], got {got}")
        if sinks.shape != (num_q_heads,):
            raise ValueError(f"sinks must be [Hq={num_q_heads}], got {tuple(sinks.shape)}")
        if sinks.device != device:
            raise ValueError(f"sinks is on {sinks.device}, q on {device}")
        sinks = sinks.to(torch.float32).contiguous()
    if isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < -1:
        raise ValueError(f"window_left must be -1 (off) or an int >= 0, got {window_left!r}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    if not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a finite positive float, got {sm_scale!r}")
    k_mode, k_scale_t, k_scale_v, k_scale_strides = _scale_args("k_scale", k_scale, k_cache)
    v_mode, v_scale_t, v_scale_v, v_scale_strides = _scale_args("v_scale", v_scale, v_cache)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != device:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError("out must be contiguous in head_dim")

    # --- values (one device sync; skipped when max_seq_len is given) ------------------------
    if max_seq_len is None:
        lens_min, lens_max = (int(x) for x in torch.aminmax(seq_lens))
        if lens_min < 1:
            raise ValueError(f"every seq_len must be >= 1, got min {lens_min}")
        capacity = block_tables.shape[1] * page_size
        if lens_max > capacity:
            raise ValueError(f"seq_len {lens_max} exceeds block_tables capacity "
                             f"{block_tables.shape[1]} pages x {page_size}")
        cols = torch.arange(block_tables.shape[1], device=device)
        owned = cols[None, :] < (seq_lens[:, None] + page_size - 1) // page_size
        entries = block_tables[owned]
        if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= num_pages):
            raise ValueError(f"block_tables holds page ids outside [0, {num_pages})")
        max_seq_len = lens_max
    attended = max_seq_len if window_left < 0 else min(max_seq_len, window_left + 1)

    if num_splits is None:
        sms = _sm_count(device.index or 0) if device.type == "cuda" else 1
        num_splits = choose_num_splits(batch, num_kv_heads, attended, sms)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not (
            1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    block_n = block_n or _default_block_n(k_cache.dtype, head_dim)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")

    group = num_q_heads // num_kv_heads
    is_split = num_splits > 1
    if is_split:
        part_acc = torch.empty(batch, num_q_heads, num_splits, head_dim, device=device,
                               dtype=torch.float32)
        part_m = torch.empty(batch, num_q_heads, num_splits, device=device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    compute = tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16
    # Triton's CPU interpreter computes 16-bit tl.dot wrongly (Triton 3.9): feed it fp32
    # operands holding the same (exactly widened) 16-bit values.
    dot = tl.float32 if interpreted() else compute
    k_arg = k_cache.view(torch.uint8) if kv_format == _KV_E4M3FNUZ else k_cache
    v_arg = v_cache.view(torch.uint8) if kv_format == _KV_E4M3FNUZ else v_cache
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_arg, v_arg, k_scale_t, v_scale_t, k_scale_v, v_scale_v,
        block_tables, seq_lens, sinks if sinks is not None else q,
        out, part_acc, part_m, part_l,
        sm_scale * LOG2E, window_left,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *k_scale_strides, *v_scale_strides,
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_q_heads,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        PAGE_SIZE=page_size, BLOCK_N=block_n,
        KV_FORMAT=kv_format, K_SCALE_MODE=k_mode, V_SCALE_MODE=v_mode,
        HAS_SINKS=sinks is not None, IS_SPLIT=is_split, COMPUTE=compute, DOT=dot,
        PRECISE_PV=bool(precise_pv),
        num_warps=num_warps, num_stages=num_stages,
    )
    if is_split:
        _merge_splits_kernel[(batch, num_q_heads)](
            part_acc, part_m, part_l, sinks if sinks is not None else part_m, out,
            out.stride(0), out.stride(1), num_q_heads, num_splits,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=head_dim,
            HAS_SINKS=sinks is not None, num_warps=4,
        )
    return out
