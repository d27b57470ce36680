"""The float64 reference against an independent formulation (torch SDPA), and its sink and
window semantics. Everything else in this suite trusts the reference, so it is checked first.

SDPA formulation of a sink: one extra key whose score is forced to the sink logit through
an additive float mask (key and value zero), which is FlashInfer's definition
softmax([q.k * sm_scale, sink])[:-1] @ v written another way.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvperf_kernels.attention.decode_ref import attention_with_sinks_ref, paged_decode_attention_ref
from kvperf_kernels.cache.paged_kv import gather_paged


def _sdpa_decode(q, k, v, sinks, sm_scale, window_left):
    """q [Hq, D]; k, v [n, Hkv, D] float64 -> [Hq, D] via F.scaled_dot_product_attention."""
    hq, d = q.shape
    n, hkv, _ = k.shape
    group = hq // hkv
    keys = k.permute(1, 0, 2).repeat_interleave(group, dim=0)  # [Hq, n, D]
    values = v.permute(1, 0, 2).repeat_interleave(group, dim=0)
    mask = torch.zeros(hq, 1, n + 1, dtype=q.dtype)
    if window_left >= 0:
        mask[..., : max(0, n - 1 - window_left)] = float("-inf")
    if sinks is None:
        mask[..., n] = float("-inf")
    else:
        mask[..., n] = sinks[:, None]
    keys = torch.cat([keys, torch.zeros(hq, 1, d, dtype=q.dtype)], dim=1)
    values = torch.cat([values, torch.zeros(hq, 1, d, dtype=q.dtype)], dim=1)
    out = F.scaled_dot_product_attention(q[:, None, :], keys, values, attn_mask=mask,
                                         scale=sm_scale)
    return out[:, 0]


@pytest.mark.parametrize("window_left", [-1, 0, 9])
@pytest.mark.parametrize("with_sinks", [True, False], ids=["sinks", "nosinks"])
def test_reference_matches_sdpa(with_sinks, window_left, decode_case, kvperf):
    case = decode_case((1, 20, 45), hq=8, hkv=2, head_dim=64, page_size=16, seed=11)
    kv = case.pack(torch.bfloat16)
    sinks = case.sinks.cpu().double() if with_sinks else None
    sm_scale = 0.1  # not 1/sqrt(D): catches a reference that ignores the argument
    ref = paged_decode_attention_ref(
        case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, sinks=sinks,
        sm_scale=sm_scale, window_left=window_left,
    ).cpu()
    ks = gather_paged(kv.k_cache.cpu().double(), kv.block_tables.cpu(), kv.seq_lens.cpu(), 16)
    vs = gather_paged(kv.v_cache.cpu().double(), kv.block_tables.cpu(), kv.seq_lens.cpu(), 16)
    expected = torch.stack([
        _sdpa_decode(case.q[b].cpu().double(), ks[b], vs[b], sinks, sm_scale, window_left)
        for b in range(len(case.lens))
    ])
    m = kvperf.errors(ref, expected)
    torch.testing.assert_close(ref, expected, rtol=1e-10, atol=1e-12)
    assert m["rel_l2_err"] <= 1e-12


def test_reference_sink_limits_and_definition():
    """Sink +30 drives the output to ~0, -inf equals no sink, and a finite sink is exactly one
    extra exp(sink) in the softmax denominator (not scaled by sm_scale)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    k = torch.randn(30, 2, 64, generator=gen, dtype=torch.float64)
    v = torch.randn(30, 2, 64, generator=gen, dtype=torch.float64)
    plain = attention_with_sinks_ref(q, k, v)
    assert plain.abs().max() > 0.1
    big = attention_with_sinks_ref(q, k, v, sinks=torch.full((4,), 30.0, dtype=torch.float64))
    assert big.abs().max() < 1e-9
    neg = attention_with_sinks_ref(q, k, v, sinks=torch.full((4,), -math.inf, dtype=torch.float64))
    torch.testing.assert_close(neg, plain, rtol=0, atol=0)

    sinks = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    with_sink = attention_with_sinks_ref(q, k, v, sinks=sinks)
    scores = torch.einsum("hd,nhd->hn", q, k.repeat_interleave(2, dim=1)) / 8.0  # sqrt(64)
    weights = torch.exp(scores)
    denom = weights.sum(-1, keepdim=True) + torch.exp(sinks)[:, None]
    by_hand = torch.einsum("hn,nhd->hd", weights / denom, v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(with_sink, by_hand, rtol=1e-12, atol=1e-14)


def test_reference_window_counts_current_token():
    """window_left = w keeps exactly the last w+1 tokens (FlashInfer's convention):
    w >= len-1 equals no window, w = 0 returns the last value row (no sink)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 64, generator=gen, dtype=torch.float64)
    k = torch.randn(12, 1, 64, generator=gen, dtype=torch.float64)
    v = torch.randn(12, 1, 64, generator=gen, dtype=torch.float64)
    full = attention_with_sinks_ref(q, k, v)
    torch.testing.assert_close(attention_with_sinks_ref(q, k, v, window_left=11), full,
                               rtol=0, atol=0)
    last = attention_with_sinks_ref(q, k, v, window_left=0)
    torch.testing.assert_close(last, v[-1].expand(2, 64), rtol=1e-15, atol=1e-15)
    three = attention_with_sinks_ref(q, k, v, window_left=2)
    torch.testing.assert_close(three, attention_with_sinks_ref(q, k[-3:], v[-3:]),
                               rtol=0, atol=0)
