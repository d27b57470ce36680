"""Top-k of the lightning indexer's logits as a Triton kernel (radix select).

One program per row. Each float32 logit is mapped to an order-preserving 32-bit key
(sign-magnitude to two's complement, offset to [0, 2^32)); 32 bisection passes over the
row find the k-th largest key t (the largest t with at least k keys >= t); a last pass
writes every entry with key > t, then entries with key == t in column order until k are
chosen (ties broken by position). Entries whose logit is -inf (causally invisible) come
out as -1, FlashMLA's padding, as in the reference ``indexer.indexer_topk`` (torch.topk).
The order within a row is not sorted: the sparse decode takes a set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.formats.checks import check_device, check_int, check_tensor

__all__ = ["radix_topk"]


@triton.jit
def _order_key(x):
    """float32 -> int64 in [0, 2^32), monotone in x (-0.0 just below +0.0; NaN excluded)."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key.to(tl.int64) + 2147483648


@triton.jit
def _topk_kernel(x_ptr, x_stride, out_ptr, n, k, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = x_ptr + r * x_stride
    t = r * 0
    step = t + 2147483648
    for _ in range(32):  # bisection on the key, most significant bit first
        cand = t + step
        cnt = 0
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n
            key = _order_key(tl.load(row + cols, mask=valid, other=0.0))
            cnt += tl.sum(((key >= cand) & valid).to(tl.int32))
        t = tl.where(cnt >= k, cand, t)
        step = step // 2
    n_gt = 0
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n
        key = _order_key(tl.load(row + cols, mask=valid, other=0.0))
        n_gt += tl.sum(((key > t) & valid).to(tl.int32))
    need = k - n_gt
    gt_off = 0
    eq_off = 0
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n
        x = tl.load(row + cols, mask=valid, other=0.0)
        key = _order_key(x)
        gt = (key > t) & valid
        eq = (key == t) & valid
        gpos = gt_off + tl.cumsum(gt.to(tl.int32), 0) - 1
        epos = eq_off + tl.cumsum(eq.to(tl.int32), 0) - 1
        idx = tl.where(x == float("-inf"), -1, cols)
        tl.store(out_ptr + r * k + gpos, idx, mask=gt)
        tl.store(out_ptr + r * k + n_gt + epos, idx, mask=eq & (epos < need))
        gt_off += tl.sum(gt.to(tl.int32))
        eq_off += tl.sum(eq.to(tl.int32))


def radix_topk(logits: torch.Tensor, k: int, *, check_nan: bool = True) -> torch.Tensor:
    """int32 [R, k]: the entries of the k largest logits per row (unsorted; ties by
    position), -1 where fewer than k are finite. logits: float32 [R, N], last dim
    contiguous, no NaN (a ValueError; check_nan=False skips that scan and its host sync,
    for timing the kernel alone). k larger than N is a ValueError (as ``indexer_topk``)."""
    check_int(k, "k", 1)
    check_tensor(logits, "logits", (torch.float32,), dim=2)
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have a contiguous last dim, got strides "
                         f"{logits.stride()}")
    if k > logits.shape[1]:
        raise ValueError(f"k = {k} exceeds the cache's {logits.shape[1]} entries "
                         "(block_tables' capacity)")
    check_device(logits, "logits")
    r, n = logits.shape
    out = torch.empty(r, k, dtype=torch.int32, device=logits.device)
    if r == 0:
        return out
    if check_nan and torch.isnan(logits).any():  # NaN has no place in the order: say so
        raise ValueError("logits: contains NaN")
    _topk_kernel[(r,)](logits, logits.stride(0), out, n, k,
                       BLOCK=min(4096, max(16, triton.next_power_of_2(n))), num_warps=8)
    return out
