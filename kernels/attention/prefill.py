"""Causal prefill attention (Triton) loading Q/K/V through tensor descriptors (TMA on sm90+), and
its twin with plain pipelined loads (cp.async on sm80+), with GQA, sinks and sliding window.

The lab (tma_prefill_decode) first simulated TMA with sleeps, then issued 1-D bulk copies; here
the same FlashAttention-style kernel runs both ways (``use_tma``), so the difference is the
load path only. ``tma_ready()`` says whether the TMA path can run here (compute capability
>= 9, Triton with ``tl.make_tensor_descriptor``, a probe kernel that compiles to
``cp.async.bulk.tensor`` and copies a tile right) and why not; ``compiled_asm`` gives a
launch's PTX so tests check the copies are really bulk tensor copies, not a name.

Layout: q [B, T, Hq, D], k, v [B, T, Hkv, D] (equal-length sequences; viewed as rows of
[B * T, H * D] for the descriptors), D 64 or 128, bf16/fp16. Semantics as the decode kernel
(FlashInfer's): query i sees keys j <= i (and j >= i - window_left when window_left >= 0);
the sink is a natural-log logit per query head joining each row's softmax denominator once.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kvperf_kernels.attention.offline_compile import compile_offline, in_child
from kvperf_kernels.device import interpreted
from kvperf_kernels.formats.checks import check_int, check_same_device, check_tensor

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)


@triton.jit(do_not_specialize=["seq_len", "window_left"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, sinks_ptr, out_ptr, seq_len, sm_scale_log2, window_left,
    HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, HAS_SINKS: tl.constexpr,
    NUM_STAGES: tl.constexpr, DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // (HQ // HKV)
    m0 = pid_m * BLOCK_M
    row0 = b * seq_len  # the sequence's first row in the [B * T, H * D] views
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (row0 + offs_m).to(tl.int64)
    if USE_TMA:
        total = seq_len * tl.num_programs(2)
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[total, HQ * HEAD_DIM],
                                           strides=[HQ * HEAD_DIM, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[total, HKV * HEAD_DIM],
                                           strides=[HKV * HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_ptr, shape=[total, HKV * HEAD_DIM],
                                           strides=[HKV * HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        q = q_desc.load([row0 + m0, h * HEAD_DIM])
    else:
        q = tl.load(q_ptr + q_rows[:, None] * (HQ * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :],
                    mask=(offs_m < seq_len)[:, None], other=0.0)
    q = q.to(DOT)

    lo = tl.where(window_left >= 0, tl.maximum(m0 - window_left, 0) // BLOCK_N * BLOCK_N, 0)
    hi = tl.minimum(m0 + BLOCK_M, seq_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if USE_TMA:
            k = k_desc.load([row0 + n0, kvh * HEAD_DIM])
            v = v_desc.load([row0 + n0, kvh * HEAD_DIM])
        else:
            kv_rows = (row0 + offs_n).to(tl.int64)[:, None] * (HKV * HEAD_DIM) \
                + kvh * HEAD_DIM + offs_d[None, :]
            n_ok = (offs_n < seq_len)[:, None]
            k = tl.load(k_ptr + kv_rows, mask=n_ok, other=0.0)
            v = tl.load(v_ptr + kv_rows, mask=n_ok, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT))) * sm_scale_log2
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < seq_len)
        if window_left >= 0:
            visible = visible & (offs_n[None, :] >= offs_m[:, None] - window_left)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(k.dtype).to(DOT), v.to(DOT), acc * alpha[:, None])
        m_i = m_new
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h) * 1.4426950408889634
        m_fin = tl.maximum(m_i, sink)
        keep = tl.exp2(m_i - m_fin)
        o = acc * (keep / (l_i * keep + tl.exp2(sink - m_fin)))[:, None]
    else:
        o = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * (HQ * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=(offs_m < seq_len)[:, None])


_LAST: dict = {}


def _ensure_allocator() -> None:
    """Device-side descriptors need Triton's scratch allocator (a torch allocation)."""
    if not _LAST.get("allocator"):
        triton.set_allocator(lambda size, align, stream: torch.empty(
            size, dtype=torch.int8, device="cpu" if interpreted() else "cuda"))
        _LAST["allocator"] = True


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      sinks: torch.Tensor | None = None, sm_scale: float | None = None,
                      window_left: int = -1, use_tma: bool = True, block_m: int | None = None,
                      block_n: int | None = None, num_stages: int = 3, num_warps: int = 8,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal prefill attention: q [B, T, Hq, D], k, v [B, T, Hkv, D] contiguous, same 16-bit
    dtype; sinks [Hq] or None; window_left -1 or >= 0. use_tma: tensor-descriptor loads
    (check ``tma_ready()`` first on a GPU), else plain loads. Returns [B, T, Hq, D]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"q dtype {q.dtype}; require BF16/FP16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k/v dtype {k.dtype}/{v.dtype} != q dtype {q.dtype}")
    batch, seq_len, hq, dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, seq_len) or k.shape[3] != dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={batch}, "
                         f"T={seq_len}, Hkv, D={dim}]")
    hkv = k.shape[2]
    if dim not in HEAD_DIMS:
        raise ValueError(f"q: head_dim {dim} not supported ({HEAD_DIMS})")
    if hq % hkv:
        raise ValueError(f"q: Hq ({hq}) must be a multiple of Hkv ({hkv})")
    for name, t in (("k", k), ("v", v)):
        check_same_device(t, name, q, "q")
    if sinks is not None:
        check_tensor(sinks, "sinks")
        if sinks.shape != (hq,):
            raise ValueError(f"sinks must be [Hq={hq}], got {tuple(sinks.shape)}")
        check_same_device(sinks, "sinks", q, "q")
        sinks = sinks.float().contiguous()
    check_int(window_left, "window_left (-1: off)", -1)
    window_left = min(window_left, 2**31 - 2)
    sm_scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    if out is None:
        out = torch.empty_like(q)
    if q.numel() == 0:
        return out
    if interpreted():
        block_m, block_n = block_m or 32, block_n or 32
    block_m = block_m or 128
    block_n = block_n or (64 if dim == 128 else 128)
    if use_tma:
        _ensure_allocator()
    grid = (triton.cdiv(seq_len, block_m), hq, batch)
    compiled = _prefill_kernel[grid](
        q, k, v, sinks if sinks is not None else q, out, seq_len, sm_scale * LOG2E, window_left,
        HQ=hq, HKV=hkv, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=use_tma,
        HAS_SINKS=sinks is not None, NUM_STAGES=num_stages,
        # the interpreter computes 16-bit tl.dot wrongly (Triton 3.9): fp32 operands there
        DOT=tl.float32 if interpreted() else (tl.bfloat16 if q.dtype == torch.bfloat16
                                              else tl.float16),
        num_warps=num_warps,
    )
    _LAST["compiled", use_tma] = compiled
    return out


def compiled_asm(use_tma: bool) -> dict:
    """The last launch's compiled kernel assembly ({'ptx': ..., ...}) per load path, or {}
    (the interpreter compiles nothing)."""
    compiled = _LAST.get(("compiled", use_tma))
    return dict(getattr(compiled, "asm", {}) or {})


def prefill_attention_ref(q, k, v, *, sinks=None, sm_scale=None, window_left: int = -1,
                          rows=None, dtype=torch.float64) -> torch.Tensor:
    """Float64 reference: [B, len(rows), Hq, D] for query positions ``rows`` (default all)."""
    batch, seq_len, hq, dim = q.shape
    hkv = k.shape[2]
    sm_scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    rows = torch.arange(seq_len, device=q.device) if rows is None else torch.as_tensor(
        rows, device=q.device)
    qh = q[:, rows].to(dtype).permute(0, 2, 1, 3)  # [B, Hq, R, D]
    kh = k.to(dtype).repeat_interleave(hq // hkv, dim=2).permute(0, 2, 1, 3)
    vh = v.to(dtype).repeat_interleave(hq // hkv, dim=2).permute(0, 2, 1, 3)
    s = qh @ kh.transpose(-1, -2) * sm_scale  # [B, Hq, R, T]
    j = torch.arange(seq_len, device=q.device)
    visible = j[None, :] <= rows[:, None]
    if window_left >= 0:
        visible &= j[None, :] >= rows[:, None] - window_left
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.to(dtype)[None, :, None, None].expand(batch, hq, len(rows), 1)
        s = torch.cat([s, sink], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :seq_len]
    return (p @ vh).permute(0, 2, 1, 3)


def compile_for_sm(capability: int, *, use_tma: bool, head_dim: int = 128, hq: int = 32,
                   hkv: int = 8, dtype=torch.bfloat16, num_warps: int = 8) -> dict:
    """The kernel compiled offline for cuda:``capability`` with the launcher's default tiles
    (``offline_compile``): its assembly ({'ptx': ...}), on any machine."""
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    types = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, sinks_ptr="*fp32", out_ptr=ptr,
                 sm_scale_log2="fp32")
    const = dict(HQ=hq, HKV=hkv, HEAD_DIM=head_dim, BLOCK_M=128,
                 BLOCK_N=64 if head_dim == 128 else 128, USE_TMA=use_tma, HAS_SINKS=True,
                 NUM_STAGES=3, DOT=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16)
    return compile_offline(_prefill_kernel, types, const, capability=capability,
                           num_warps=num_warps)


def ptx_by_load_path(capability: int = 90, head_dim: int = 128) -> dict[str, str]:
    """{"tma": ptx, "plain": ptx} of ``compile_for_sm`` (under the interpreter: in a child)."""
    if interpreted():
        return in_child("kvperf_kernels.attention.prefill", "ptx_by_load_path", capability,
                        head_dim)
    return {name: compile_for_sm(capability, use_tma=tma, head_dim=head_dim)["ptx"]
            for name, tma in (("tma", True), ("plain", False))}


@functools.cache
def tma_ready() -> tuple[bool, str]:
    """(ready, reason): the TMA path can run here, or why not (names what is missing)."""
    if interpreted() or not torch.cuda.is_available():
        return False, "needs a CUDA GPU with TMA (compute capability >= 9.0); found no CUDA GPU"
    cap = torch.cuda.get_device_capability()
    if cap[0] < 9:
        return False, f"needs compute capability >= 9.0 for TMA; found {cap[0]}.{cap[1]}"
    if not hasattr(tl, "make_tensor_descriptor"):
        return False, (f"needs Triton with tl.make_tensor_descriptor; found triton "
                       f"{triton.__version__}")
    try:
        q = torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.bfloat16)
        out = prefill_attention(q, q, q, use_tma=True, block_m=64, block_n=64, num_warps=4)
        ref = prefill_attention_ref(q, q, q)
        ptx = compiled_asm(True).get("ptx", "")
    except Exception as exc:  # a compile or launch failure is the reason
        return False, f"the TMA probe kernel failed: {type(exc).__name__}: {exc}"[:300]
    if "cp.async.bulk.tensor" not in ptx:
        return False, "the TMA probe kernel compiled without cp.async.bulk.tensor copies"
    if not torch.allclose(out.double(), ref, atol=2e-2, rtol=2e-2):
        return False, "the TMA probe kernel ran but computed a wrong tile"
    return True, "ready"
