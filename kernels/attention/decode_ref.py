"""Torch reference for paged decode attention with sinks (float64 by default, or float32).

Deliberately the plain formulation, independent of the kernel's online softmax and
split-KV merge: gather each sequence's tokens, dequantise, build the full score row,
append the sink and take one softmax.

Semantics (FlashInfer's AttentionSink variant, ``BatchAttentionWithAttentionSinkWrapper``
and ``sinks=`` of the decode wrappers): for query head h with KV head ``h // (Hq // Hkv)``,

    s_j = (q_h . k_j) * sm_scale                 (k_j dequantised: k_fp8 * k_scale)
    out_h = sum_j softmax([s_0..s_{n-1}, sink_h])_j * v_j

i.e. the sink is a natural-log logit (not multiplied by sm_scale or k_scale) that joins the
softmax denominator once, with a zero value row. Sliding window (``window_left >= 0``): the
decode query sits at position len-1 and sees tokens ``len-1-window_left .. len-1``.
"""

from __future__ import annotations

import math

import torch

from kvperf_kernels.cache.paged_kv import gather_paged


def dequantize_kv(tokens: torch.Tensor, scale, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """K or V values [..., Hkv, D] as ``dtype``: tokens * scale, with scale None (1), a float,
    a one-element tensor, or one scale per token vector (shape tokens.shape[:-1], a trailing
    1 allowed)."""
    x = tokens.to(dtype)
    if scale is None:
        return x
    if not torch.is_tensor(scale):
        return x * float(scale)
    s = scale.to(device=tokens.device, dtype=dtype)
    if s.numel() == 1:
        return x * s.reshape(())
    return x * s.reshape(*tokens.shape[:-1], 1)


def attention_with_sinks_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sinks: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window_left: int = -1,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """One sequence's decode step. q [Hq, D]; k, v [len, Hkv, D] (already dequantised or
    16-bit); sinks [Hq] or None. Returns [Hq, D] in ``dtype``."""
    hq, dim = q.shape
    n, hkv, _ = k.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(dim)
    if window_left >= 0:
        first = max(0, n - 1 - window_left)
        k, v = k[first:], v[first:]
    group = hq // hkv
    qh = q.to(dtype).reshape(hkv, group, dim)
    kh = k.to(dtype).permute(1, 0, 2)  # [Hkv, n, D]
    vh = v.to(dtype).permute(1, 0, 2)
    scores = torch.einsum("hgd,hnd->hgn", qh, kh).reshape(hq, -1) * sm_scale
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(device=scores.device, dtype=dtype)[:, None]], dim=1)
    probs = torch.softmax(scores, dim=-1)[:, : kh.shape[1]]  # the sink's column is dropped
    return torch.einsum("hgn,hnd->hgd", probs.reshape(hkv, group, -1), vh).reshape(hq, dim)


def paged_decode_attention_ref(
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
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference for ``paged_decode_attention``: [B, Hq, D] in ``dtype`` (float64 default).

    Arguments as the kernel's. The tokens of all sequences are gathered from the pages
    once, in the cache's dtype (per-token scales with the same slots); each sequence is
    then dequantised in ``dtype`` and attended on its own, so the kernel and the reference
    see the same KV values, only the attention arithmetic differs, and long caches fit in
    float64.
    """
    page_size = k_cache.shape[1]
    if q.shape[0] == 0:  # an empty batch, as the kernel: nothing to attend
        return torch.empty(q.shape, dtype=dtype, device=q.device)

    def gathered(cache, scale):
        tokens = gather_paged(cache, block_tables, seq_lens, page_size)
        if torch.is_tensor(scale) and scale.numel() > 1:  # per-token: gather its scales too
            return tokens, gather_paged(scale.reshape(cache.shape[:3]), block_tables, seq_lens,
                                        page_size)
        return tokens, [scale] * len(tokens)

    k_tokens, k_scales = gathered(k_cache, k_scale)
    v_tokens, v_scales = gathered(v_cache, v_scale)
    outs = [
        attention_with_sinks_ref(
            q[b], dequantize_kv(k_tokens[b], k_scales[b], dtype),
            dequantize_kv(v_tokens[b], v_scales[b], dtype),
            sinks=sinks, sm_scale=sm_scale, window_left=window_left, dtype=dtype,
        )
        for b in range(q.shape[0])
    ]
    return torch.stack(outs)
