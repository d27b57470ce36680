"""DeepSeek V4's learned KV compressor (the pooling before CSA / HCA storage).

For a sequence's token projections ``kv`` and ``score`` ([T, coff * d], coff = 2 with
overlap, else 1; d = 512) and a learned ``ape`` [ratio, coff * d] (a bias per position in
the window), compressed entry ``i`` covers window ``[i * ratio, (i + 1) * ratio)``:
  * plain (HCA, ratio 128): the window's ``ratio`` rows, all d features;
  * overlapping (CSA, ratio 4): 2 * ratio rows: the previous window's rows with the first
    d features (none for entry 0) and the window's own rows with the last d features;
  * per feature, a softmax over those rows of ``score + ape[row in window]`` weights the
    sum of ``kv``.
Then the entry is a latent token like any other: kv_norm, RoPE at position ``i * ratio``,
FP8 quantise and store (``write.latent_write`` with the compressed cache's slots). Only
complete windows are compressed (prefill of whole sequences; the decode-time partial
state is not modelled here).

The kernel computes in float32 (exp, sums), the reference in float64; they agree to float32
rounding, not bit for bit (exp differs), so the stored bytes are compared on the kernel's
pooled output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.formats.checks import check_device, check_int, check_tensor

__all__ = ["pool_compress", "pool_compress_ref", "window_starts", "CSA_RATIO", "HCA_RATIO"]

CSA_RATIO, HCA_RATIO = 4, 128
SLIDING_WINDOW = 128


def overlap_for(ratio: int) -> bool:
    """V4 overlaps the windows at ratio 4 only."""
    return ratio == CSA_RATIO


def window_starts(seq_lens: list[int], ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 token row of each compressed entry's window start in the packed batch,
    int64 entry index within its sequence), sequences packed one after another."""
    starts, index = [], []
    row = 0
    for n in seq_lens:
        g = n // ratio
        starts.append(row + ratio * torch.arange(g, dtype=torch.int64))
        index.append(torch.arange(g, dtype=torch.int64))
        row += n
    empty = torch.zeros(0, dtype=torch.int64)
    return (torch.cat(starts) if starts else empty), (torch.cat(index) if index else empty)


def pool_compress_ref(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor,
                      seq_lens: list[int], ratio: int) -> torch.Tensor:
    """float64 [sum(len // ratio), d]: the V4 pooling of each sequence (module doc),
    written as the model writes it (windows, overlap transform, softmax over rows)."""
    overlap = overlap_for(ratio)
    coff = 2 if overlap else 1
    d = kv.shape[-1] // coff
    out, row = [], 0
    for n in seq_lens:
        g = n // ratio
        k = kv[row:row + g * ratio].double().reshape(g, ratio, coff * d)
        s = score[row:row + g * ratio].double().reshape(g, ratio, coff * d) + ape.double()
        row += n
        if overlap:  # [g, 2r, d]: previous window's first half, own window's second half
            k2 = torch.zeros(g, 2 * ratio, d, dtype=torch.float64, device=kv.device)
            s2 = torch.full((g, 2 * ratio, d), float("-inf"), dtype=torch.float64,
                            device=kv.device)
            k2[:, ratio:], s2[:, ratio:] = k[..., d:], s[..., d:]
            k2[1:, :ratio], s2[1:, :ratio] = k[:-1, :, :d], s[:-1, :, :d]
            k, s = k2, s2
        out.append((k * s.softmax(dim=1)).sum(dim=1))
    return torch.cat(out) if out else torch.zeros(0, d, dtype=torch.float64, device=kv.device)


@triton.jit
def _pool_kernel(kv_ptr, score_ptr, ape_ptr, start_ptr, index_ptr, out_ptr, row_stride,
                 D: tl.constexpr, RATIO: tl.constexpr, OVERLAP: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """One (entry, BLOCK_D features) per program: softmax over the window's rows."""
    e = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.load(start_ptr + e).to(tl.int64)
    r = tl.arange(0, RATIO)
    rows = (start + r)[:, None] * row_stride
    own = D if OVERLAP else 0  # the window's own rows use the last d features
    ape_w = 2 * D if OVERLAP else D
    s = tl.load(score_ptr + rows + own + cols[None, :]) \
        + tl.load(ape_ptr + r[:, None] * ape_w + own + cols[None, :])
    k = tl.load(kv_ptr + rows + own + cols[None, :])
    m = tl.max(s, axis=0)
    if OVERLAP:
        n_prev = tl.where(tl.load(index_ptr + e) > 0, RATIO, 0)  # entry 0 has no previous
        prev = (start - RATIO + r)[:, None] * row_stride
        pmask = (r[:, None] < n_prev) & (cols[None, :] >= 0)
        sp = tl.load(score_ptr + prev + cols[None, :], mask=pmask, other=float("-inf")) \
            + tl.load(ape_ptr + r[:, None] * ape_w + cols[None, :])
        kp = tl.load(kv_ptr + prev + cols[None, :], mask=pmask, other=0.0)
        m = tl.maximum(m, tl.max(sp, axis=0))
        pp = tl.exp(sp - m[None, :])
        num_p = tl.sum(pp * kp, axis=0)
        den_p = tl.sum(pp, axis=0)
    else:
        num_p = tl.zeros([BLOCK_D], tl.float32)
        den_p = tl.zeros([BLOCK_D], tl.float32)
    p = tl.exp(s - m[None, :])
    num = tl.sum(p * k, axis=0) + num_p
    den = tl.sum(p, axis=0) + den_p
    tl.store(out_ptr + e * D + cols, num / den)


def pool_compress(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor,
                  seq_lens: list[int], ratio: int) -> torch.Tensor:
    """float32 [sum(len // ratio), d] pooled entries of the packed sequences (module doc).

    kv, score: float32 [sum(seq_lens), coff * d], same row stride, last dim contiguous;
    ape: float32 [ratio, coff * d] contiguous; ratio a power of two (4, 128)."""
    check_int(ratio, "ratio", 1)
    if ratio & (ratio - 1):
        raise ValueError(f"ratio must be a power of two, got {ratio}")
    coff = 2 if overlap_for(ratio) else 1
    for t, what in ((kv, "kv"), (score, "score")):
        check_tensor(t, what, (torch.float32,), dim=2)
        check_device(t, what)
    if kv.shape != score.shape or kv.stride() != score.stride() or kv.stride(1) != 1:
        raise ValueError(f"kv and score must have the same shape and strides with a "
                         f"contiguous last dim, got {tuple(kv.shape)} {kv.stride()} and "
                         f"{tuple(score.shape)} {score.stride()}")
    if kv.shape[1] % coff or kv.shape[1] // coff < 16:
        raise ValueError(f"kv: last dim {kv.shape[1]} must be {coff} x d (d >= 16)")
    d = kv.shape[1] // coff
    check_tensor(ape, "ape", (torch.float32,), dim=2)
    if ape.shape != (ratio, coff * d) or not ape.is_contiguous():
        raise ValueError(f"ape must be a contiguous [{ratio}, {coff * d}] tensor, got "
                         f"{tuple(ape.shape)}")
    lens = [check_int(n, "seq_lens", 0) for n in seq_lens]
    if sum(lens) != kv.shape[0]:
        raise ValueError(f"seq_lens sum to {sum(lens)}, kv has {kv.shape[0]} rows")
    starts, index = window_starts(lens, ratio)
    out = torch.empty(len(starts), d, dtype=torch.float32, device=kv.device)
    if len(starts) == 0:
        return out
    block_d = min(triton.next_power_of_2(d), max(16, 8192 // ratio))
    if d % block_d:
        raise ValueError(f"kv: d = {d} must be a multiple of {block_d}")
    _pool_kernel[(len(starts), d // block_d)](
        kv, score, ape, starts.to(kv.device), index.to(kv.device), out, kv.stride(0),
        D=d, RATIO=ratio, OVERLAP=coff == 2, BLOCK_D=block_d, num_warps=4,
    )
    return out


def compressed_cache_bytes(layout, seq_len: int, ratio: int, block_size: int) -> int:
    """Bytes of one sequence's compressed cache: seq_len // ratio entries in whole blocks."""
    entries = seq_len // ratio
    return -(-entries // block_size) * layout.block_bytes(block_size)


def window_cache_bytes(layout, block_size: int, window: int = SLIDING_WINDOW) -> int:
    """Bytes of one sequence's sliding-window ring (window entries in whole blocks)."""
    return -(-window // block_size) * layout.block_bytes(block_size)

