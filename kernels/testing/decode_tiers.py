"""Right-sized decode tiers of the persistent-decode lab, with real attention and real KV formats.

The lab's tiers are (batch, sequence) small (4, 16|32), medium (8, 32), large (12, 48|64) at
D 64 with one head; ours keep their batch and lengths (ragged up to the tier's longest) with
GQA heads (Hq 8, Hkv 2), plus a serving shape (gpt-oss: Hq 64, Hkv 8, 64 sequences) for the
GPU. KV formats: float32, float16, bfloat16 (q's dtype), FP8 E4M3 with per-token scales and
packed INT4 (``quant.int4``), each with the reference K/V it must be compared with (the
dequantised values). The persistent kernel reads them all (``tier_kernel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvperf_kernels.attention.decode_ref import dequantize_kv
from kvperf_kernels.attention.persistent_decode import persistent_decode_attention
from kvperf_kernels.cache.paged_kv import pack_paged_kv, slot_mapping
from kvperf_kernels.quant.int4 import dequantize_int4, pack_paged_int4
from kvperf_kernels.testing.inputs import DecodeCase, make_decode_case


@dataclass(frozen=True)
class Tier:
    batch: int
    max_len: int
    hq: int = 8
    hkv: int = 2

    def lens(self) -> list[int]:
        """Ragged lengths 1..max_len (the longest first), seeded by the tier's shape."""
        gen = torch.Generator().manual_seed(self.batch * 1000 + self.max_len)
        rest = torch.randint(1, self.max_len + 1, (self.batch - 1,), generator=gen).tolist()
        return [self.max_len, *rest]


TIERS = {
    "small": Tier(4, 32),
    "medium": Tier(8, 32),
    "large": Tier(12, 64),
    "serving": Tier(64, 4096, hq=64, hkv=8),  # GPU only
}
QUANTS = ("fp32", "fp16", "bf16", "fp8", "int4")
Q_DTYPE = {"fp16": torch.float16}  # the query's dtype per KV format (bf16 otherwise)


def tier_case(tier: str, page_size: int = 16, seed: int = 0) -> DecodeCase:
    t = TIERS[tier]
    return make_decode_case(t.lens(), hq=t.hq, hkv=t.hkv, head_dim=64, page_size=page_size,
                            seed=seed)


def pack_tier(case: DecodeCase, quant: str) -> tuple[dict, torch.Tensor, torch.Tensor, object]:
    """(kernel keyword arguments k_cache/v_cache/block_tables/seq_lens[/group scales], the K
    and V caches the float64 reference reads, the PagedKV) for KV format ``quant``."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    if quant == "int4":
        kv, ks, vs = pack_paged_int4(case.k_tokens, case.v_tokens, case.lens, case.page_size,
                                     generator=gen)
        args = dict(k_group_scale=ks, v_group_scale=vs)
        ref_k, ref_v = dequantize_int4(kv.k_cache, ks), dequantize_int4(kv.v_cache, vs)
    elif quant == "fp8":  # E4M3 with per-token scales
        kv = pack_paged_kv(case.k_tokens, case.v_tokens, case.lens, case.page_size,
                           kv_dtype=torch.float8_e4m3fn, scale_granularity="per_token",
                           generator=gen)
        args = dict(k_scale=kv.k_scale, v_scale=kv.v_scale)
        ref_k = dequantize_kv(kv.k_cache, kv.k_scale)
        ref_v = dequantize_kv(kv.v_cache, kv.v_scale)
    else:
        kv = pack_paged_kv(case.k_tokens, case.v_tokens, case.lens, case.page_size,
                           kv_dtype=torch.bfloat16 if quant == "fp32" else getattr(
                               torch, {"fp16": "float16", "bf16": "bfloat16"}[quant]),
                           generator=gen)
        if quant == "fp32":  # the same table, float32 values (poisoned unused slots)
            slots = slot_mapping(kv.block_tables, kv.seq_lens, case.page_size)
            caches = []
            for tokens in (case.k_tokens, case.v_tokens):
                c = torch.full(kv.k_cache.shape, float("nan"), device=tokens.device)
                c.view(-1, *c.shape[2:])[slots] = tokens.float()
                caches.append(c)
            kv.k_cache, kv.v_cache = caches
        args = {}
        ref_k, ref_v = kv.k_cache, kv.v_cache
    args.update(k_cache=kv.k_cache, v_cache=kv.v_cache, block_tables=kv.block_tables,
                seq_lens=kv.seq_lens)
    return args, ref_k, ref_v, kv


def tier_kernel(quant: str, **options):
    """The decode kernel of a tier's KV format (the persistent one for every format), with
    ``options`` (chunk_tokens, block_n, num_programs)."""
    del quant  # every format goes through the persistent kernel (FP8 too)
    return lambda q, **kw: persistent_decode_attention(q, **options, **kw)


def kv_bytes_per_token(args: dict) -> int:
    """Bytes one token's K and V take in the cache, scales included."""
    return sum(t[0, 0].numel() * t.element_size() for name, t in args.items()
               if name in ("k_cache", "v_cache", "k_scale", "v_scale", "k_group_scale",
                           "v_group_scale") and torch.is_tensor(t) and t.dim() >= 3)


def query_for(case: DecodeCase, quant: str) -> torch.Tensor:
    return case.q.to(Q_DTYPE.get(quant, torch.bfloat16))
