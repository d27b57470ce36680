"""One DeepSeek-V4 CSA decode step end to end (issue 12, items 2-4 together): a sequence's
latents in a 16-token sliding-window ring, its ratio-4 pooled entries in the compressed
cache (both in one model1 page pool), the lightning indexer's causal top-k over the
compressed entries, and the sparse MLA decode over those entries plus the window.

Checked against the float64 path from the same inputs (pooling, norm, RoPE, attention
with no quantisation): cosine >= 0.99; the kernel output against its reference on the
same cache within the decode budget.
"""

from __future__ import annotations

import torch

from kvperf_kernels.device import interpreted
from kvperf_kernels.latent.compress import CSA_RATIO, pool_compress, pool_compress_ref
from kvperf_kernels.latent.indexer import (
    indexer_block_bytes,
    indexer_logits,
    indexer_logits_ref,
    indexer_topk,
    indexer_write,
)
from kvperf_kernels.latent.layouts import MODEL1, alloc_cache
from kvperf_kernels.latent.norm_rope import kv_norm_rope_ref
from kvperf_kernels.latent.paging import window_entries
from kvperf_kernels.latent.sparse_mla import D_V, mla_decode_ref, sparse_mla_decode
from kvperf_kernels.latent.topk import radix_topk
from kvperf_kernels.latent.write import latent_write, latent_write_ref
from kvperf_kernels.testing.latent import make_latent_batch


def test_csa_decode_step(checks_device, kvperf):
    n, window, bs, topk, heads = 64, 16, 8, 6, 16
    write = latent_write_ref if interpreted() else latent_write
    batch = make_latent_batch(MODEL1, [0], [n], bs, device=checks_device, seed=1)
    # one pool: blocks 1-2 hold the window ring, blocks 3-4 the 16 compressed entries
    pool = alloc_cache(MODEL1, 5, bs, checks_device, 0xFF)
    ring = window_entries(batch.positions.cpu(), torch.full((n,), n), window)
    ring_slots = torch.where(ring >= 0, bs + ring, torch.full_like(ring, -1)).to(checks_device)
    write(batch.x, batch.weight, batch.positions, batch.cos_sin, ring_slots, pool,
          layout=MODEL1, block_size=bs)
    gen = torch.Generator().manual_seed(2)
    kv = torch.randn(n, 1024, generator=gen)
    score = torch.randn(n, 1024, generator=gen)
    ape = 0.5 * torch.randn(CSA_RATIO, 1024, generator=gen)
    kv, score, ape = kv.to(checks_device), score.to(checks_device), ape.to(checks_device)
    pooled = pool_compress(kv, score, ape, [n], CSA_RATIO)
    entries = n // CSA_RATIO
    entry_pos = torch.arange(entries, device=checks_device) * CSA_RATIO
    entry_slots = 3 * bs + torch.arange(entries, device=checks_device)
    write(pooled, batch.weight, entry_pos, batch.cos_sin, entry_slots, pool, layout=MODEL1,
          block_size=bs)

    # the indexer: keys per compressed entry, one query row at position n - 1
    icache = torch.zeros(2, indexer_block_bytes(bs), dtype=torch.uint8, device=checks_device)
    ikeys = torch.randn(entries, 128, generator=gen).to(checks_device)
    indexer_write(ikeys, torch.arange(entries, device=checks_device), icache, bs)
    iq = torch.randn(1, 4, 128, generator=gen).bfloat16().to(checks_device)
    iw = torch.rand(1, 4, generator=gen).to(checks_device)
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=checks_device)
    visible = torch.tensor([n // CSA_RATIO], device=checks_device)  # causal at position n-1
    logits = indexer_logits(iq, iw, icache, table, visible, block_size=bs)
    chosen = indexer_topk(logits, topk)[0].long()
    ref_chosen = indexer_topk(indexer_logits_ref(iq, iw, icache, table, visible,
                                                 block_size=bs), topk)[0].long()
    assert set(chosen.tolist()) == set(ref_chosen.tolist())  # distinct random keys: no ties
    assert set(radix_topk(logits, topk)[0].tolist()) == set(chosen.tolist())  # the kernel

    win_pos = torch.arange(n - window, n, device=checks_device)
    indices = torch.cat([entry_slots[chosen], bs + win_pos % window])[None]
    q = (0.5 * torch.randn(1, heads, 512, generator=gen)).bfloat16().to(checks_device)
    out, lse = sparse_mla_decode(q, pool, indices, layout=MODEL1, block_size=bs)
    ref_out, ref_lse, spread = mla_decode_ref(q, pool, indices, layout=MODEL1, block_size=bs)
    err = (out.double() - ref_out).abs()
    assert (err <= 1e-3 + 2.0**-8 * (ref_out.abs() + spread)).all()
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5

    # the float64 path from the same inputs, nothing quantised
    comp = kv_norm_rope_ref(pool_compress_ref(kv, score, ape, [n], CSA_RATIO).float(),
                            batch.weight, entry_pos, batch.cos_sin, MODEL1)[chosen]
    win = kv_norm_rope_ref(batch.x, batch.weight, batch.positions, batch.cos_sin,
                           MODEL1)[n - window:]
    lat = torch.cat([comp, win]).double()
    p = torch.softmax(torch.einsum("hd,nd->hn", q[0].double(), lat) * 512**-0.5, dim=-1)
    m = kvperf.errors(out[0], p @ lat[:, :D_V], prefix="pipeline_")
    assert m["cosine"] >= 0.99, m
