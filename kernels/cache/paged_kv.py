"""Paged KV-cache layout for decode attention (NHD pages, the layout FlashInfer and vLLM use).

K and V each live in a cache tensor ``[num_pages, page_size, num_kv_heads, head_dim]``.
Sequence ``b`` owns the pages ``block_tables[b, :cdiv(seq_lens[b], page_size)]``; its token
``t`` sits at page ``block_tables[b, t // page_size]``, slot ``t % page_size``.

Cache dtypes: bfloat16 / float16, or FP8 with a float32 dequantisation scale:
- per-tensor: one scale for the whole K (or V) cache, a tensor of shape ``(1,)`` here (the
  attention launcher also takes a Python float);
- per-token: one scale per (page, slot, kv head), float32 ``[num_pages, page_size, Hkv]``,
  i.e. one scale per token vector over head_dim, exactly what
  ``kvperf_kernels.quant.fp8.quantize_per_token`` returns (its trailing 1 squeezed).
``float8_e4m3fn`` goes through ``kvperf_kernels.quant.fp8`` (its torch references in the
CPU interpreter, bit-exact with the kernels by that module's contract); ``float8_e4m3fnuz`` (bias 8,
max 240, one NaN code 0x80) is quantised here with the same rule and its own max.

Pages are handed out in a shuffled order so that sequences are not contiguous in memory,
and every block-table entry a sequence does not own points at a spare page: filled with
NaN (``poison=True``), any read of it (or of a slot past ``seq_len``) shows in the output.

Contract of the helpers below: arguments are checked (TypeError / ValueError naming the
argument), lengths and page ids too (these torch helpers synchronise anyway: a length
past the table, a page id outside the cache or a slot outside it is a ValueError, never a
torch IndexError or a CUDA device assert), and an empty batch gives empty results.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvperf_kernels.device import interpreted, run_where_kernels_run
from kvperf_kernels.formats.checks import (
    QUANT_INPUT_DTYPES,
    check_int,
    check_same_device,
    check_tensor,
)
from kvperf_kernels.quant.fp8 import (
    quantize_per_tensor,
    quantize_per_tensor_ref,
    quantize_per_token,
    quantize_per_token_ref,
)
from kvperf_kernels.quant.groups import tensor_amax_ref

E4M3FNUZ_MAX = 240.0  # largest finite float8_e4m3fnuz (exponent bias 8, no infinities)
FP8_KV_DTYPES = tuple(
    dt for dt in (torch.float8_e4m3fn, getattr(torch, "float8_e4m3fnuz", None)) if dt is not None
)
KV_DTYPES = (torch.bfloat16, torch.float16, *FP8_KV_DTYPES)
SCALE_GRANULARITIES = ("per_tensor", "per_token")
INDEX_DTYPES = (torch.int32, torch.int64)  # block tables, lengths and slots


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_table(block_tables, seq_lens, page_size) -> None:
    """Shapes, dtypes and devices of a page table (no sync): block_tables int [B, max_pages],
    seq_lens int [B] on its device, page_size a positive int."""
    check_tensor(block_tables, "block_tables", INDEX_DTYPES, dim=2)
    check_tensor(seq_lens, "seq_lens", INDEX_DTYPES, dim=1)
    if seq_lens.shape[0] != block_tables.shape[0]:
        raise ValueError(f"seq_lens must be [B={block_tables.shape[0]}] (block_tables' rows), "
                         f"got {tuple(seq_lens.shape)}")
    check_same_device(seq_lens, "seq_lens", block_tables, "block_tables")
    check_int(page_size, "page_size", 1)


def table_stats(block_tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                num_pages: int | None = None) -> torch.Tensor:
    """int64 [3] on the table's device, without a sync: min(seq_lens), max(seq_lens) and the
    number of owned block-table entries (each row's first cdiv(len, page_size), at most the
    row) outside [0, num_pages) (below 0 only, when num_pages is None). B >= 1."""
    lens = seq_lens.long()
    capacity = block_tables.shape[1] * page_size
    pages = (lens.clamp(0, capacity) + page_size - 1) // page_size
    cols = torch.arange(block_tables.shape[1], device=block_tables.device)
    owned = cols[None, :] < pages[:, None]
    ids = block_tables.long()
    outside = ids < 0 if num_pages is None else (ids < 0) | (ids >= num_pages)
    return torch.stack([lens.amin(), lens.amax(), (owned & outside).sum()])


def checked_lengths(block_tables, seq_lens, page_size: int, *, min_len: int,
                    num_pages: int | None = None) -> list[int]:
    """The lengths as Python ints (one sync), after check_table: every one in
    [min_len, block_tables' capacity], the pages they own in [0, num_pages)."""
    check_table(block_tables, seq_lens, page_size)
    if seq_lens.shape[0] == 0:
        return []
    stats = table_stats(block_tables, seq_lens, page_size, num_pages).tolist()
    check_table_stats(stats, min_len, block_tables.shape[1], page_size, num_pages)
    return seq_lens.tolist()


def check_table_stats(stats: list[int], min_len: int, max_pages: int, page_size: int,
                      num_pages: int | None) -> None:
    """ValueError naming seq_lens or block_tables for table_stats' [min, max, outside]."""
    lens_min, lens_max, outside = stats
    if lens_min < min_len:
        raise ValueError(f"seq_lens: every seq_len must be >= {min_len}, got min {lens_min}")
    if lens_max > max_pages * page_size:
        raise ValueError(f"seq_lens: seq_len {lens_max} exceeds block_tables capacity "
                         f"{max_pages} pages x {page_size}")
    if outside:
        upper = "" if num_pages is None else f", {num_pages}"
        raise ValueError(f"block_tables holds {outside} page ids outside [0{upper}) in the "
                         "pages the sequences own")


def _python_lengths(seq_lens) -> list[int]:
    """seq_lens as a list of Python ints: a sequence of ints or an integer 1-D tensor."""
    if torch.is_tensor(seq_lens):
        check_tensor(seq_lens, "seq_lens", INDEX_DTYPES, dim=1)
        return seq_lens.tolist()
    if isinstance(seq_lens, (str, bytes)) or not isinstance(seq_lens, Sequence):
        raise TypeError(f"seq_lens: expected a sequence of ints or an int tensor, got "
                        f"{type(seq_lens).__name__}")
    try:
        if any(isinstance(n, bool) for n in seq_lens):
            raise TypeError
        return [operator.index(n) for n in seq_lens]
    except TypeError:
        raise TypeError(f"seq_lens: expected ints, got {list(seq_lens)!r}") from None


@dataclass
class PagedKV:
    """One paged K/V cache with its page table; scales are None for 16-bit caches."""

    k_cache: torch.Tensor  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, max_pages_per_seq]
    seq_lens: torch.Tensor  # int32 [B]
    page_size: int
    k_scale: torch.Tensor | None = None  # float32 (1,) per-tensor or [num_pages, page_size, Hkv]
    v_scale: torch.Tensor | None = None
    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_cache.shape[3]

    def kv_bytes_read(self) -> int:
        """Bytes of K+V (and their per-token scales) that one decode step must read."""
        tokens = int(self.seq_lens.sum())
        per_token = 2 * self.num_kv_heads * self.head_dim * self.k_cache.element_size()
        if self.k_scale is not None and self.k_scale.dim() == 3:
            per_token += 2 * self.num_kv_heads * 4
        return tokens * per_token


def build_page_table(
    seq_lens: Sequence[int] | torch.Tensor,
    page_size: int,
    *,
    spare_pages: int = 1,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Page table for ragged lengths: (block_tables int32 [B, max_pages], seq_lens int32 [B],
    num_pages, poison_page).

    Sequence b gets cdiv(len_b, page_size) pages; ``shuffle`` hands pages out in a random order
    (from ``generator``) so that no sequence is contiguous. The last of ``spare_pages`` (>= 1)
    extra pages is the poison page that every unused block-table entry points at. No
    sequences: an empty [0, 0] table and ``spare_pages`` pages.
    """
    lens = _python_lengths(seq_lens)
    if lens and min(lens) < 1:
        raise ValueError(f"seq_lens: every sequence needs >= 1 token (decode reads the current "
                         f"one): {lens}")
    check_int(page_size, "page_size", 1)
    check_int(spare_pages, "spare_pages", 1)  # one is the poison page
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    pages_per_seq = [cdiv(n, page_size) for n in lens]
    used = sum(pages_per_seq)
    num_pages = used + spare_pages
    order = (
        torch.randperm(used, generator=generator) if shuffle else torch.arange(used)
    ).tolist()
    poison_page = num_pages - 1
    table = torch.full((len(lens), max(pages_per_seq, default=0)), poison_page,
                       dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = torch.tensor(order[start : start + n], dtype=torch.int32)
        start += n
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return table.to(device), lens_t.to(device), num_pages, poison_page


def slot_mapping(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int, *,
    num_pages: int | None = None,
) -> torch.Tensor:
    """Flat slot (page * page_size + slot) of every valid token, sequences concatenated: int64.

    Lengths in [0, capacity]; the pages they own >= 0 (and < ``num_pages`` when given)."""
    lens = checked_lengths(block_tables, seq_lens, page_size, min_len=0, num_pages=num_pages)
    max_len = max(lens, default=0)
    pos = torch.arange(max_len, device=block_tables.device)
    pages = block_tables[:, pos // page_size].long()  # [B, max_len]
    flat = pages * page_size + pos % page_size
    valid = pos[None, :] < seq_lens[:, None].to(pos.device)
    return flat[valid]


def _flat_slots(cache, what: str = "cache") -> torch.Tensor:
    """cache [num_pages, page_size, ...] viewed as [num_pages * page_size, ...] (no copy)."""
    check_tensor(cache, what)
    if cache.dim() < 2:
        raise ValueError(f"{what} must be [num_pages, page_size, ...], got {tuple(cache.shape)}")
    try:
        return cache.view(-1, *cache.shape[2:])
    except RuntimeError:
        raise ValueError(f"{what}: its pages and slots (dims 0, 1) must be one strided dim, got "
                         f"strides {cache.stride()}") from None


def write_paged(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[page, slot] = values for the flat ``slots`` (from slot_mapping), any dtype.

    values: [len(slots), *cache.shape[2:]]; every slot in [0, num_pages * page_size)
    (checked: one sync). FP8 tensors lack index_put on some builds: copy their bytes instead.
    """
    flat = _flat_slots(cache)
    check_tensor(slots, "slots", INDEX_DTYPES, dim=1)
    check_tensor(values, "values")
    if values.dtype != cache.dtype:
        raise TypeError(f"values dtype {values.dtype} != cache dtype {cache.dtype}")
    expected = (slots.shape[0], *cache.shape[2:])
    if tuple(values.shape) != expected:
        raise ValueError(f"values must be {expected} (one row per slot), got "
                         f"{tuple(values.shape)}")
    check_same_device(slots, "slots", cache, "cache")
    check_same_device(values, "values", cache, "cache")
    if slots.numel() == 0:
        return
    lo, hi = torch.aminmax(slots)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= flat.shape[0]:
        raise ValueError(f"slots outside [0, {flat.shape[0]}) (num_pages x page_size): "
                         f"min {lo}, max {hi}")
    if cache.element_size() == 1:
        flat.view(torch.uint8)[slots] = values.reshape(-1, *cache.shape[2:]).view(torch.uint8)
    else:
        flat[slots] = values.reshape(-1, *cache.shape[2:])


def gather_paged(
    cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int
) -> list[torch.Tensor]:
    """Each sequence's tokens back out of the pages: a list of [len_b, *cache.shape[2:]].

    page_size is the cache's (dim 1); lengths in [0, capacity], owned pages in the cache."""
    check_tensor(cache, "cache")
    check_table(block_tables, seq_lens, page_size)
    if cache.dim() < 2 or cache.shape[1] != page_size:
        raise ValueError(f"cache must be [num_pages, page_size={page_size}, ...], got "
                         f"{tuple(cache.shape)}")
    check_same_device(block_tables, "block_tables", cache, "cache")
    flat = cache.reshape(-1, *cache.shape[2:])
    slots = slot_mapping(block_tables, seq_lens, page_size, num_pages=cache.shape[0])
    if cache.element_size() == 1 and cache.dtype.is_floating_point:
        tokens = flat.view(torch.uint8)[slots].view(cache.dtype)
    else:
        tokens = flat[slots]
    return list(tokens.split(seq_lens.tolist())) if seq_lens.numel() else []


def quantize_fp8_tokens(
    x: torch.Tensor, granularity: str, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8-quantise token vectors x [..., D]: (q, scale), scale (1,) or x.shape[:-1].

    e4m3fn uses the project quantisers; e4m3fnuz applies the same rule
    (scale = amax / max, amax 0 -> 1, saturate, RNE cast) with max 240.
    """
    if granularity not in SCALE_GRANULARITIES:
        raise ValueError(f"granularity must be one of {SCALE_GRANULARITIES}, got {granularity!r}")
    check_tensor(x, "x", QUANT_INPUT_DTYPES)
    if fp8_dtype == torch.float8_e4m3fn:
        # The Triton quantisers and their torch references are bit-exact by fp8_quant's
        # contract; in the CPU interpreter the kernels take ~10 s per 32K tokens.
        per_tensor, per_token = (
            (quantize_per_tensor_ref, quantize_per_token_ref) if interpreted()
            else (quantize_per_tensor, quantize_per_token)
        )
        if granularity == "per_tensor":
            return run_where_kernels_run(per_tensor, x)
        q, scale = run_where_kernels_run(per_token, x)
        return q, scale.squeeze(-1)
    if fp8_dtype not in FP8_KV_DTYPES:
        raise NotImplementedError(f"fp8_dtype: FP8 KV dtype {fp8_dtype} is not supported; use "
                                  f"{FP8_KV_DTYPES}")
    xf = x.float()
    per_tensor = granularity == "per_tensor"
    amax = tensor_amax_ref(xf) if per_tensor else xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / E4M3FNUZ_MAX, torch.ones_like(amax))
    q = (xf / (scale if per_tensor else scale[..., None])).clamp(-E4M3FNUZ_MAX, E4M3FNUZ_MAX)
    return q.to(fp8_dtype), scale


_NAN_BYTE = {torch.float8_e4m3fn: 0x7F}  # e4m3fn has NaN at S.1111.111; fnuz only at 0x80
if hasattr(torch, "float8_e4m3fnuz"):
    _NAN_BYTE[torch.float8_e4m3fnuz] = 0x80


def nan_fill(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor of NaN in ``dtype``, without a float32 temporary of the cache's size."""
    if dtype in _NAN_BYTE:
        return torch.full(shape, _NAN_BYTE[dtype], dtype=torch.uint8, device=device).view(dtype)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def pack_paged_kv(
    k_tokens: torch.Tensor,
    v_tokens: torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    page_size: int,
    *,
    kv_dtype: torch.dtype = torch.bfloat16,
    scale_granularity: str | None = None,
    spare_pages: int = 1,
    shuffle: bool = True,
    poison: bool = True,
    generator: torch.Generator | None = None,
) -> PagedKV:
    """Pack ragged K/V tokens into a fresh paged cache.

    k_tokens, v_tokens: [sum(seq_lens), Hkv, D] (sequences concatenated), any float dtype.
    kv_dtype: bf16/fp16 (cast) or an FP8 type, quantised over the valid tokens only with
    ``scale_granularity`` "per_tensor" or "per_token". With ``poison`` every slot no sequence
    owns (tail of last pages, spare pages) and its per-token scale hold NaN.
    """
    for name, t in (("k_tokens", k_tokens), ("v_tokens", v_tokens)):
        check_tensor(t, name)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float tensor, got {t.dtype}")
    if k_tokens.shape != v_tokens.shape or k_tokens.dim() != 3:
        raise ValueError(
            f"k_tokens/v_tokens must both be [tokens, Hkv, D]: {tuple(k_tokens.shape)} vs "
            f"{tuple(v_tokens.shape)}"
        )
    check_same_device(v_tokens, "v_tokens", k_tokens, "k_tokens")
    if kv_dtype not in KV_DTYPES:
        raise NotImplementedError(f"kv_dtype: KV dtype {kv_dtype} is not supported; use one of "
                                  f"{KV_DTYPES}")
    is_fp8 = kv_dtype in FP8_KV_DTYPES
    if is_fp8 and scale_granularity not in SCALE_GRANULARITIES:
        raise ValueError(
            f"FP8 KV needs scale_granularity in {SCALE_GRANULARITIES}, got {scale_granularity!r}"
        )
    if not is_fp8 and scale_granularity is not None:
        raise ValueError(
            f"{kv_dtype} KV takes no scales; got scale_granularity={scale_granularity!r}"
        )
    device = k_tokens.device
    block_tables, lens, num_pages, _ = build_page_table(
        seq_lens, page_size, spare_pages=spare_pages, shuffle=shuffle, generator=generator,
        device=device,
    )
    total = int(lens.sum())
    if k_tokens.shape[0] != total:
        raise ValueError(f"k_tokens has {k_tokens.shape[0]} tokens, seq_lens sum to {total}")
    _, hkv, dim = k_tokens.shape
    shape = (num_pages, page_size, hkv, dim)
    slots = slot_mapping(block_tables, lens, page_size)
    caches, scales = [], []
    for tokens in (k_tokens, v_tokens):
        cache = nan_fill(shape, kv_dtype, device) if poison else torch.zeros(
            shape, dtype=kv_dtype, device=device)
        token_scales = None
        if scale_granularity == "per_token":
            fill = float("nan") if poison else 1.0
            token_scales = torch.full(shape[:3], fill, dtype=torch.float32, device=device)
        caches.append(cache)
        scales.append(write_tokens(cache, slots, tokens, scale_granularity, token_scales))
    return PagedKV(
        k_cache=caches[0], v_cache=caches[1], block_tables=block_tables, seq_lens=lens,
        page_size=page_size, k_scale=scales[0], v_scale=scales[1],
    )


def write_tokens(cache: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor,
                 granularity: str | None = None, token_scales: torch.Tensor | None = None):
    """Store token vectors [n, Hkv, D] at ``slots`` of a paged cache: cast for a 16-bit
    cache; FP8-quantised with ``granularity`` for an FP8 one, per-token scales written to
    ``token_scales`` ([num_pages, page_size, Hkv]) at the same slots.

    Returns the cache's scale: None (16-bit), the per-tensor float32 (1,) or token_scales.
    """
    check_tensor(cache, "cache")
    check_tensor(tokens, "tokens")
    if not tokens.dtype.is_floating_point:
        raise TypeError(f"tokens: expected a float tensor, got {tokens.dtype}")
    if cache.dtype not in FP8_KV_DTYPES:
        if granularity is not None:
            raise ValueError(f"granularity: a {cache.dtype} cache takes no scales, got "
                             f"{granularity!r}")
        write_paged(cache, slots, tokens.to(cache.dtype))
        return None
    if granularity == "per_token":
        check_tensor(token_scales, "token_scales", (torch.float32,))
        if token_scales.shape != cache.shape[:3]:
            raise ValueError(f"token_scales must be {tuple(cache.shape[:3])} [num_pages, "
                             f"page_size, Hkv], got {tuple(token_scales.shape)}")
    q, scale = quantize_fp8_tokens(tokens, granularity, cache.dtype)
    write_paged(cache, slots, q)
    if granularity == "per_token":
        write_paged(token_scales, slots, scale.float())
        return token_scales
    return scale.float().reshape(1)


def owned_page_ids(block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   page_size: int) -> torch.Tensor:
    """The block-table entries the sequences own (their first cdiv(len, page_size) pages),
    sequence by sequence, as one flat tensor (lengths unchecked: see to_flashinfer_indices)."""
    pages = (seq_lens.long() + page_size - 1) // page_size
    cols = torch.arange(block_tables.shape[1], device=block_tables.device)
    return block_tables[cols[None, :] < pages[:, None]]


def to_flashinfer_indices(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int, *,
    num_pages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same page table as FlashInfer's CSR form: (kv_indptr, kv_indices, kv_last_page_len),
    all int32 on block_tables' device. Lengths in [1, capacity], owned page ids >= 0 (and
    < ``num_pages`` when given)."""
    checked_lengths(block_tables, seq_lens, page_size, min_len=1, num_pages=num_pages)
    pages = (seq_lens.long() + page_size - 1) // page_size
    indptr = torch.zeros(len(pages) + 1, dtype=torch.int32, device=block_tables.device)
    indptr[1:] = torch.cumsum(pages, 0).to(torch.int32)
    indices = owned_page_ids(block_tables, seq_lens, page_size).to(torch.int32)
    last = (seq_lens.long() - 1) % page_size + 1
    return indptr, indices.contiguous(), last.to(torch.int32)
