"""The decode speed workload at gpt-oss shapes (Hq 64, Hkv 8, D 64, page 16): the same random
K/V packed as BF16, FP8 per-tensor and FP8 per-token caches, and the bytes a decode step reads.
Shared by the speed suite and the tuning script.
"""

from __future__ import annotations

import torch

from kvperf_kernels.cache.paged_kv import PagedKV, pack_paged_kv

HQ, HKV, D, PAGE = 64, 8, 64, 16
VARIANTS = {"bf16": (torch.bfloat16, None), "fp8_tensor": (torch.float8_e4m3fn, "per_tensor"),
            "fp8_token": (torch.float8_e4m3fn, "per_token")}
SMALL_WORKING_SET = 256 << 20  # below this (H100 and H200 L2: 50 MB) flush L2 between calls


def build_decode_workload(batch: int, kv_len: int, device: str = "cuda",
                          variants=tuple(VARIANTS)) -> dict:
    """q, sinks and the same random K/V packed as each of ``variants`` (device-side randoms)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(batch * 100003 + kv_len)
    tokens = batch * kv_len
    q = torch.randn(batch, HQ, D, device=dev, generator=gen).to(torch.bfloat16)
    sinks = (1.0 + 2.0 * torch.randn(HQ, device=dev, generator=gen)).float()
    k = torch.randn(tokens, HKV, D, device=dev, generator=gen)
    v = torch.randn(tokens, HKV, D, device=dev, generator=gen)
    caches = {}
    for name in variants:
        dtype, granularity = VARIANTS[name]
        caches[name] = pack_paged_kv(
            k, v, [kv_len] * batch, PAGE, kv_dtype=dtype, scale_granularity=granularity,
            generator=torch.Generator().manual_seed(7),
        )
    del k, v
    return {"q": q, "sinks": sinks, "caches": caches}


def decode_bytes_moved(kv: PagedKV, q: torch.Tensor) -> int:
    return kv.kv_bytes_read() + 2 * q.numel() * q.element_size()  # q read + out written
