"""DeepSeek's lightning indexer: FP8 keys, multi-head ReLU logits, causal top-k.

Key cache (DeepGEMM's paged layout): a uint8 tensor [num_blocks, block_size * 132]; a block
holds its block_size keys of 128 E4M3 values first, then their block_size float32 scales
(amax / 448 per key, the project's per-token rule): 132 bytes per key.

For a query row with heads q [H, 128] and per-head weights w [H] (the model folds its
softmax scale into w), the logit of compressed entry n is
    logit[n] = sum_h w[h] * ReLU(q[h] . k[n]),   k[n] = e4m3(codes[n]) * scale[n]
for n < length (the entries the query may see: causal), -inf beyond. The kernel takes
the dot products of q with the codes (bf16 x bf16, float32 accumulation: e4m3 values are
exact in bf16) and scales afterwards; the reference is float64. Top-k is torch.topk of
the logits, -inf entries reported as -1 (FlashMLA's padding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.device import interpreted
from kvperf_kernels.formats.checks import check_device, check_int, check_tensor, use_hw_cast
from kvperf_kernels.formats.codecs import decode_e4m3
from kvperf_kernels.latent.layouts import INDEX_DTYPES
from kvperf_kernels.latent.sparse_mla import mma
from kvperf_kernels.quant.fp8 import quantize_per_token, quantize_per_token_ref

INDEX_DIM = 128
INDEX_BYTES_PER_TOKEN = INDEX_DIM + 4

__all__ = ["indexer_block_bytes", "indexer_write", "indexer_logits", "indexer_logits_ref",
           "indexer_topk"]


def indexer_block_bytes(block_size: int) -> int:
    return block_size * INDEX_BYTES_PER_TOKEN


def _views(cache: torch.Tensor, block_size: int):
    """(codes uint8 [nb, bs, 128], scales float32 [nb, bs]) views of an indexer cache."""
    nb = cache.shape[0]
    codes = cache[:, :block_size * INDEX_DIM].view(nb, block_size, INDEX_DIM)
    scales = cache[:, block_size * INDEX_DIM:].view(torch.float32).view(nb, block_size)
    return codes, scales


def _check_cache(cache, block_size) -> int:
    check_int(block_size, "block_size", 1)
    check_tensor(cache, "cache", (torch.uint8,), dim=2)
    if cache.shape[1] != indexer_block_bytes(block_size) or not cache.is_contiguous():
        raise ValueError(f"cache: an indexer cache with block_size {block_size} is a "
                         f"contiguous [num_blocks, {indexer_block_bytes(block_size)}] tensor, "
                         f"got {tuple(cache.shape)}")
    return cache.shape[0]


def indexer_write(keys: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor,
                  block_size: int, *, reference: bool = False) -> torch.Tensor:
    """Quantise keys [T, 128] per token (the FP8 per-token kernel, or its reference) and
    store them at slots [T] (-1: skip). Returns the cache."""
    nb = _check_cache(cache, block_size)
    check_tensor(keys, "keys", dim=2)
    if keys.shape[1] != INDEX_DIM:
        raise ValueError(f"keys must be [T, {INDEX_DIM}], got {tuple(keys.shape)}")
    check_tensor(slots, "slots", INDEX_DTYPES, dim=1)
    if slots.shape[0] != keys.shape[0]:
        raise ValueError(f"slots must have {keys.shape[0]} entries, got {tuple(slots.shape)}")
    if len(slots) and (int(slots.min()) < -1 or int(slots.max()) >= nb * block_size):
        raise ValueError(f"slots must be in [-1, {nb * block_size})")
    q, s = (quantize_per_token_ref if reference else quantize_per_token)(keys)
    ok = slots >= 0
    sl = slots[ok].long()
    codes, scales = _views(cache, block_size)
    codes[sl // block_size, sl % block_size] = q[ok].view(torch.uint8)
    scales[sl // block_size, sl % block_size] = s[ok, 0]
    return cache


def _check_logit_inputs(q, weights, cache, block_tables, lengths, block_size, kernel=True):
    nb = _check_cache(cache, block_size)
    check_tensor(q, "q", (torch.bfloat16,), dim=3)
    if q.shape[2] != INDEX_DIM or q.stride(2) != 1:
        raise ValueError(f"q must be bf16 [R, H, {INDEX_DIM}] with a contiguous last dim, "
                         f"got {tuple(q.shape)}")
    r, h = q.shape[0], q.shape[1]
    check_tensor(weights, "weights", (torch.float32,), dim=2)
    if weights.shape != (r, h) or not weights.is_contiguous():
        raise ValueError(f"weights must be a contiguous float32 [{r}, {h}], got "
                         f"{tuple(weights.shape)}")
    check_tensor(block_tables, "block_tables", INDEX_DTYPES, dim=2)
    check_tensor(lengths, "lengths", INDEX_DTYPES, dim=1)
    if block_tables.shape[0] != r or lengths.shape[0] != r:
        raise ValueError(f"block_tables and lengths need one row per query row ({r}), got "
                         f"{tuple(block_tables.shape)} and {tuple(lengths.shape)}")
    if kernel:
        check_device(q, "q")
    capacity = block_tables.shape[1] * block_size
    if r:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > capacity:
            raise ValueError(f"lengths must be in [0, {capacity}] (block_tables' capacity), "
                             f"got min {lo} max {hi}")
        cols = torch.arange(block_tables.shape[1], device=block_tables.device)
        owned = cols[None, :] < ((lengths.long() + block_size - 1) // block_size)[:, None]
        bad = owned & ((block_tables < 0) | (block_tables >= nb))
        if bad.any():
            raise ValueError(f"block_tables: {int(bad.sum())} owned page ids outside "
                             f"[0, {nb})")
    return capacity


def indexer_logits_ref(q, weights, cache, block_tables, lengths, *, block_size: int):
    """float64 [R, capacity] logits (module doc), -inf at and beyond each row's length."""
    capacity = _check_logit_inputs(q, weights, cache, block_tables, lengths, block_size,
                                   kernel=False)
    codes, scales = _views(cache, block_size)
    n = torch.arange(capacity, device=cache.device)
    pages = block_tables.long()[:, n // block_size].clamp(0, cache.shape[0] - 1)
    k = codes[pages, n % block_size].view(torch.float8_e4m3fn).double()  # [R, N, 128]
    k = k * scales[pages, n % block_size].double()[..., None]
    s = torch.einsum("rhd,rnd->rhn", q.double(), k).clamp_min(0.0)
    logits = torch.einsum("rh,rhn->rn", weights.double(), s)
    return torch.where(n[None, :] < lengths[:, None], logits,
                       torch.full_like(logits, float("-inf")))


@triton.jit
def _logits_kernel(q_ptr, q_sr, q_sh, w_ptr, cache_ptr, bt_ptr, bt_stride, len_ptr, out_ptr,
                   capacity, block_size, H: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_N: tl.constexpr, HW_CAST: tl.constexpr, F32: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    length = tl.load(len_ptr + r)
    valid = n < length
    page = tl.load(bt_ptr + r * bt_stride + n // block_size, mask=valid, other=0).to(tl.int64)
    off = n % block_size
    blk = cache_ptr + page * (block_size * 132)
    d = tl.arange(0, 128)
    code = tl.load((blk + off * 128)[:, None] + d[None, :], mask=valid[:, None], other=0)
    k = decode_e4m3(code.to(tl.int32), HW_CAST).to(tl.bfloat16)  # exact
    sptr = (blk + block_size * 128).to(tl.pointer_type(tl.float32)) + off
    scale = tl.load(sptr, mask=valid, other=0.0)
    h = tl.arange(0, BLOCK_H)
    q = tl.load(q_ptr + r * q_sr + h[:, None] * q_sh + d[None, :], mask=(h < H)[:, None],
                other=0.0)
    w = tl.load(w_ptr + r * H + h, mask=h < H, other=0.0)
    s = mma(q, tl.trans(k), F32) * scale[None, :]  # [BLOCK_H, BLOCK_N]
    logit = tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)
    logit = tl.where(valid, logit, float("-inf"))
    tl.store(out_ptr + r * capacity + n, logit, mask=n < capacity)


def indexer_logits(q, weights, cache, block_tables, lengths, *, block_size: int,
                   hw_cast: bool | None = None) -> torch.Tensor:
    """float32 [R, block_tables.shape[1] * block_size] logits; q bf16 [R, H, 128], weights
    float32 [R, H], lengths [R] entries visible to each row (module doc)."""
    capacity = _check_logit_inputs(q, weights, cache, block_tables, lengths, block_size)
    r, h = q.shape[0], q.shape[1]
    out = torch.empty(r, capacity, dtype=torch.float32, device=q.device)
    if r == 0 or capacity == 0:
        return out
    block_n = 64
    _logits_kernel[(r, triton.cdiv(capacity, block_n))](
        q, q.stride(0), q.stride(1), weights, cache, block_tables, block_tables.stride(0),
        lengths, out, capacity, block_size, H=h, BLOCK_H=max(16, triton.next_power_of_2(h)),
        BLOCK_N=block_n, HW_CAST=use_hw_cast(q.device, hw_cast), F32=interpreted(), num_warps=4,
    )
    return out


def indexer_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [R, k]: the entries of the k largest logits per row (any order among ties),
    -1 where fewer than k entries are visible. k larger than the cache is a ValueError."""
    check_int(k, "k", 1)
    if k > logits.shape[1]:
        raise ValueError(f"k = {k} exceeds the cache's {logits.shape[1]} entries "
                         "(block_tables' capacity)")
    vals, idx = logits.topk(k, dim=-1)
    return torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx).to(torch.int32)
