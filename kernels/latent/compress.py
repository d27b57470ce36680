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
complete windows are compressed: ``pool_compress`` pools the complete windows of whole
sequences (prefill); ``PoolingState`` holds each sequence's partial window during decode
(tokens appended one at a time) and emits an entry only when its window completes,
through the same kernel, so it is bit-identical to the prefill entry.

The kernel computes in float32 (exp, sums), the reference in float64; they agree to float32
rounding, not bit for bit (exp differs), so the stored bytes are compared on the kernel's
pooled output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.formats.checks import check_device, check_int, check_tensor

__all__ = ["pool_compress", "pool_compress_ref", "window_starts", "PoolingState", "CSA_RATIO",
           "HCA_RATIO"]

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
    return _launch_pool(kv, score, ape, starts, index, d, ratio)


def _block_d(d: int, ratio: int) -> int:
    block_d = min(triton.next_power_of_2(d), max(16, 8192 // ratio))
    if d % block_d:
        raise ValueError(f"kv: d = {d} must be a multiple of {block_d}")
    return block_d


def _launch_pool(kv, score, ape, starts, index, d, ratio) -> torch.Tensor:
    """Pooled entries of the windows starting at rows ``starts`` (entry ``index`` of their
    sequence: 0 has no previous window); the one launch prefill and decode share."""
    out = torch.empty(len(starts), d, dtype=torch.float32, device=kv.device)
    if len(starts) == 0:
        return out
    block_d = _block_d(d, ratio)
    _pool_kernel[(len(starts), d // block_d)](
        kv, score, ape, starts.to(kv.device), index.to(kv.device), out, kv.stride(0),
        D=d, RATIO=ratio, OVERLAP=overlap_for(ratio), BLOCK_D=block_d, num_warps=4,
    )
    return out


class PoolingState:
    """Decode-time compressor state of a batch of sequences (the model's kv_state /
    score_state): per sequence, rows for its current window and, at ratio 4, the previous
    complete window (the overlap reads its first d features). ``step`` appends one token
    to every sequence; a sequence whose window that token completes gets its pooled entry,
    computed by the prefill kernel on these rows, so it equals ``pool_compress``'s entry
    bit for bit. A partial window yields nothing: no entry is visible before it is whole.
    """

    def __init__(self, batch: int, ape: torch.Tensor, ratio: int):
        check_int(batch, "batch", 0)
        check_int(ratio, "ratio", 1)
        if ratio & (ratio - 1):
            raise ValueError(f"ratio must be a power of two, got {ratio}")
        check_tensor(ape, "ape", (torch.float32,), dim=2)
        check_device(ape, "ape")
        self.overlap = overlap_for(ratio)
        coff = 2 if self.overlap else 1
        if ape.shape[0] != ratio or ape.shape[1] % coff or not ape.is_contiguous():
            raise ValueError(f"ape must be a contiguous [{ratio}, {coff} x d] tensor, got "
                             f"{tuple(ape.shape)}")
        self.ratio, self.ape, self.width = ratio, ape, ape.shape[1]
        self.d = self.width // coff
        _block_d(self.d, ratio)
        self.own = ratio if self.overlap else 0  # first row of the current window
        rows = self.own + ratio
        self.kv = torch.zeros(batch, rows, self.width, dtype=torch.float32, device=ape.device)
        self.score = torch.zeros_like(self.kv)
        self.seen = torch.zeros(batch, dtype=torch.int64)  # tokens per sequence, on the host

    def prefill(self, kv: torch.Tensor, score: torch.Tensor, seq_lens: list[int]) -> None:
        """Keep the tail of each packed prefill sequence (its partial window and, at ratio
        4, its last complete one); their complete windows are ``pool_compress``'s."""
        lens = [check_int(n, "seq_lens", 0) for n in seq_lens]
        if len(lens) != len(self.seen):
            raise ValueError(f"seq_lens: one length per sequence ({len(self.seen)}), got "
                             f"{len(lens)}")
        self._check_rows(kv, score, sum(lens), "kv")
        row, r = 0, self.ratio
        for b, n in enumerate(lens):
            whole = n // r * r
            spans = [(whole, n, self.own)] + ([(whole - r, whole, 0)] if self.overlap else [])
            for first, last, dst in spans:
                if first < 0:  # no complete window yet: nothing previous to keep
                    continue
                self.kv[b, dst:dst + last - first] = kv[row + first:row + last]
                self.score[b, dst:dst + last - first] = score[row + first:row + last]
            row += n
        self.seen = torch.tensor(lens, dtype=torch.int64)

    def step(self, kv: torch.Tensor, score: torch.Tensor):
        """Append token rows kv, score [batch, coff * d] (one per sequence). Returns
        (float32 [m, d] entries, int64 [m] sequences, int64 [m] entry indices) of the m
        windows completed by this token."""
        self._check_rows(kv, score, len(self.seen), "kv")
        pos = self.seen % self.ratio
        b = torch.arange(len(self.seen))
        dev = self.kv.device
        self.kv[b.to(dev), (self.own + pos).to(dev)] = kv
        self.score[b.to(dev), (self.own + pos).to(dev)] = score
        self.seen = self.seen + 1
        done = (self.seen % self.ratio == 0).nonzero().flatten()
        index = self.seen[done] // self.ratio - 1
        rows = self.kv.shape[1]
        flat_kv = self.kv[done.to(dev)].reshape(-1, self.width)
        flat_score = self.score[done.to(dev)].reshape(-1, self.width)
        starts = torch.arange(len(done), dtype=torch.int64) * rows + self.own
        out = _launch_pool(flat_kv, flat_score, self.ape, starts, index, self.d, self.ratio)
        if self.overlap and len(done):  # the completed window becomes the previous one
            d2 = done.to(dev)
            self.kv[d2, :self.ratio] = self.kv[d2, self.ratio:]
            self.score[d2, :self.ratio] = self.score[d2, self.ratio:]
        return out, done, index

    def _check_rows(self, kv, score, n, what):
        for t, name in ((kv, "kv"), (score, "score")):
            check_tensor(t, name, (torch.float32,), dim=2)
            if t.shape != (n, self.width):
                raise ValueError(f"{name} must be [{n}, {self.width}], got {tuple(t.shape)}")
            check_device(t, name)


def compressed_cache_bytes(layout, seq_len: int, ratio: int, block_size: int) -> int:
    """Bytes of one sequence's compressed cache: seq_len // ratio entries in whole blocks."""
    entries = seq_len // ratio
    return -(-entries // block_size) * layout.block_bytes(block_size)


def window_cache_bytes(layout, block_size: int, window: int = SLIDING_WINDOW) -> int:
    """Bytes of one sequence's sliding-window ring (window entries in whole blocks)."""
    return -(-window // block_size) * layout.block_bytes(block_size)

