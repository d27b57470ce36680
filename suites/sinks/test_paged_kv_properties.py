"""Property tests of the paged-cache helpers (``kvperf_kernels.cache.paged_kv``) over their
argument space (hypothesis): build_page_table, slot_mapping, gather_paged, write_paged,
write_tokens, pack_paged_kv, to_flashinfer_indices.

Every draw either raises a TypeError / ValueError / NotImplementedError whose message names
a broken argument, or agrees with a plain-Python model of the layout (token t of sequence b
at page ``block_tables[b][t // page_size]``, slot ``t % page_size``). Nothing else escapes:
an out-of-range length, page id or slot is a ValueError, never a torch IndexError (or, on
a GPU, a device-side assert). Empty batches give empty results.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvperf_kernels.cache import paged_kv
from kvperf_kernels.cache.paged_kv import FP8_KV_DTYPES, cdiv
from kvperf_kernels.device import default_device
from kvperf_kernels.testing.compare import same_bytes
from kvperf_kernels.testing.properties import Expect, property_settings, raises_naming

DEV = default_device()
E4M3 = torch.float8_e4m3fn
INDEX = (torch.int32, torch.int64)


def model_slots(table: list[list[int]], lens: list[int], page_size: int) -> list[int]:
    return [table[b][t // page_size] * page_size + t % page_size
            for b, n in enumerate(lens) for t in range(n)]


# --------------------------------------------------------------------------------------
# build_page_table
# --------------------------------------------------------------------------------------

@property_settings(cpu_examples=40)
@given(lens=st.lists(st.integers(1, 50), max_size=5), page_size=st.integers(1, 17),
       spare=st.integers(1, 3), shuffle=st.booleans(), seed=st.integers(0, 2**16),
       as_tensor=st.booleans())
def test_page_tables_hand_out_each_page_once(lens, page_size, spare, shuffle, seed,
                                             as_tensor):
    arg = torch.tensor(lens, dtype=torch.int32) if as_tensor else lens
    with raises_naming(None):
        table, lens_t, num_pages, poison = paged_kv.build_page_table(
            arg, page_size, spare_pages=spare, shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed), device=DEV)
    pages = [cdiv(n, page_size) for n in lens]
    assert table.dtype == torch.int32 and lens_t.dtype == torch.int32
    assert table.shape == (len(lens), max(pages, default=0)) and lens_t.tolist() == lens
    assert num_pages == sum(pages) + spare and poison == num_pages - 1
    rows = table.tolist()
    owned = [p for b, row in enumerate(rows) for p in row[: pages[b]]]
    assert sorted(owned) == list(range(sum(pages))), "each used page exactly once"
    assert all(p == poison for b, row in enumerate(rows) for p in row[pages[b]:])
    slots = paged_kv.slot_mapping(table, lens_t, page_size)
    assert slots.tolist() == model_slots(rows, lens, page_size)
    indptr, indices, last = paged_kv.to_flashinfer_indices(table, lens_t, page_size,
                                                           num_pages=num_pages)
    assert indptr.tolist() == [sum(pages[:b]) for b in range(len(lens) + 1)]
    assert indices.tolist() == owned
    assert last.tolist() == [(n - 1) % page_size + 1 for n in lens]


BAD_TABLE_ARGS = [
    (dict(seq_lens=[3, 0]), ValueError, "seq_lens"),
    (dict(seq_lens=[-1]), ValueError, "seq_lens"),
    (dict(seq_lens=[2.0, 3]), TypeError, "seq_lens"),
    (dict(seq_lens=[True]), TypeError, "seq_lens"),
    (dict(seq_lens="12"), TypeError, "seq_lens"),
    (dict(seq_lens=[[1, 2]]), TypeError, "seq_lens"),
    (dict(seq_lens=None), TypeError, "seq_lens"),
    (dict(seq_lens=torch.tensor([1.0, 2.0])), TypeError, "seq_lens"),
    (dict(seq_lens=torch.tensor([[1, 2]])), ValueError, "seq_lens"),
    (dict(page_size=0), ValueError, "page_size"),
    (dict(page_size=-4), ValueError, "page_size"),
    (dict(page_size=1.5), ValueError, "page_size"),
    (dict(page_size=True), ValueError, "page_size"),
    (dict(page_size="16"), ValueError, "page_size"),
    (dict(spare_pages=0), ValueError, "spare_pages"),
    (dict(spare_pages=None), ValueError, "spare_pages"),
    (dict(generator=7), TypeError, "generator"),
]


@pytest.mark.parametrize("override, exc, name", BAD_TABLE_ARGS,
                         ids=[f"{next(iter(o))}-{i}" for i, (o, _, _) in
                              enumerate(BAD_TABLE_ARGS)])
def test_page_tables_reject_broken_arguments(override, exc, name):
    args = {**dict(seq_lens=[3, 17], page_size=16, spare_pages=1, generator=None), **override}
    with raises_naming({exc: (name,)}):
        paged_kv.build_page_table(args.pop("seq_lens"), args.pop("page_size"), **args)


# --------------------------------------------------------------------------------------
# slot_mapping / gather_paged / to_flashinfer_indices on arbitrary (lying) tables
# --------------------------------------------------------------------------------------

@st.composite
def tables(draw):
    """Any table: page ids in [-3, num_pages + 3), lengths in [-2, capacity + 3]."""
    batch = draw(st.sampled_from([2, 3, 1, 0]))
    max_pages = draw(st.sampled_from([2, 3, 1, 0]))
    page_size = draw(st.sampled_from([4, 1, 16]))
    num_pages = draw(st.integers(1, 8))
    capacity = max_pages * page_size
    lie = draw(st.sampled_from(["none", "none", "ids", "lens", "negative_len"]))
    lo, hi = (-3, num_pages + 2) if lie == "ids" else (0, num_pages - 1)
    ids = draw(st.lists(st.lists(st.integers(lo, hi), min_size=max_pages, max_size=max_pages),
                        min_size=batch, max_size=batch))
    len_hi = capacity + 3 if lie == "lens" else capacity
    len_lo = -2 if lie == "negative_len" else 0
    lens = draw(st.lists(st.integers(len_lo, len_hi), min_size=batch, max_size=batch))
    dtypes = (draw(st.sampled_from(INDEX)), draw(st.sampled_from(INDEX)))
    table = torch.tensor(ids, dtype=dtypes[0]).reshape(batch, max_pages).to(DEV)
    return table, torch.tensor(lens, dtype=dtypes[1]).to(DEV), page_size, num_pages


def _table_expectations(table, lens, page_size, num_pages, *, min_len: int,
                        check_upper: bool) -> Expect:
    e = Expect()
    ls, rows = lens.tolist(), table.tolist()
    capacity = table.shape[1] * page_size
    if any(n < min_len or n > capacity for n in ls):
        e.add(ValueError, "seq_lens")
        return e
    owned = [p for b, row in enumerate(rows) for p in row[: cdiv(ls[b], page_size)]]
    if any(p < 0 or (check_upper and p >= num_pages) for p in owned):
        e.add(ValueError, "block_tables")
    return e


@property_settings(cpu_examples=60)
@given(t=tables(), dim=st.sampled_from([(2,), (3, 2), ()]), dtype=st.sampled_from(
    [torch.bfloat16, E4M3, torch.float32, torch.int32]))
def test_slots_and_gathers_follow_the_layout_or_name_the_lie(t, dim, dtype):
    table, lens, page_size, num_pages = t
    rows, ls = table.tolist(), lens.tolist()
    e = _table_expectations(table, lens, page_size, num_pages, min_len=0, check_upper=False)
    with raises_naming(e.errors):
        slots = paged_kv.slot_mapping(table, lens, page_size)
    if e.valid:
        assert slots.dtype == torch.int64
        assert slots.tolist() == model_slots(rows, ls, page_size)

    values = torch.arange(num_pages * page_size * math.prod(dim), dtype=torch.float32)
    cache = values.reshape(num_pages, page_size, *dim).to(dtype if dtype != E4M3 else
                                                           torch.float32)
    cache = (cache % 300).to(dtype).to(DEV)  # exact in every dtype drawn
    e = _table_expectations(table, lens, page_size, num_pages, min_len=0, check_upper=True)
    with raises_naming(e.errors):
        got = paged_kv.gather_paged(cache, table, lens, page_size)
    if e.valid:
        flat = cache.reshape(-1, *dim).cpu().view(torch.uint8) if dtype == E4M3 else \
            cache.reshape(-1, *dim).cpu()
        slots = model_slots(rows, ls, page_size)
        start = 0
        assert len(got) == len(ls)
        for n, tokens in zip(ls, got, strict=True):
            want = flat[slots[start:start + n]]
            start += n
            have = tokens.cpu().view(torch.uint8) if dtype == E4M3 else tokens.cpu()
            assert torch.equal(have, want)

    e = _table_expectations(table, lens, page_size, num_pages, min_len=1, check_upper=True)
    with raises_naming(e.errors):
        indptr, indices, last = paged_kv.to_flashinfer_indices(table, lens, page_size,
                                                               num_pages=num_pages)
    if e.valid:
        pages = [cdiv(n, page_size) for n in ls]
        assert indices.tolist() == [p for b, row in enumerate(rows) for p in row[:pages[b]]]
        assert last.tolist() == [(n - 1) % page_size + 1 for n in ls]


TABLE_MUTATIONS = {
    "table_float": (lambda t, n, p: (t.float(), n, p), TypeError, "block_tables"),
    "table_1d": (lambda t, n, p: (t.reshape(-1), n, p), ValueError, "block_tables"),
    "table_list": (lambda t, n, p: (t.tolist(), n, p), TypeError, "block_tables"),
    "lens_float": (lambda t, n, p: (t, n.float(), p), TypeError, "seq_lens"),
    "lens_rows": (lambda t, n, p: (t, torch.cat([n, n.new_ones(1)]), p), ValueError,
                  "seq_lens"),
    "lens_meta": (lambda t, n, p: (t, n.to("meta"), p), ValueError, "seq_lens"),
    "page_size": (lambda t, n, p: (t, n, 0), ValueError, "page_size"),
    "page_size_float": (lambda t, n, p: (t, n, float(p)), ValueError, "page_size"),
}


@pytest.mark.parametrize("fn", ["slot_mapping", "to_flashinfer_indices", "gather_paged"])
@pytest.mark.parametrize("mutation", list(TABLE_MUTATIONS))
@property_settings(cpu_examples=2)
@given(t=tables())
def test_table_helpers_reject_broken_arguments(fn, mutation, t):
    table, lens, page_size, num_pages = t
    cache = torch.zeros(num_pages, page_size, 2, device=DEV)
    mutate, exc, name = TABLE_MUTATIONS[mutation]
    table, lens, page_size = mutate(table, lens, page_size)
    with raises_naming({exc: (name,)}):
        if fn == "gather_paged":
            paged_kv.gather_paged(cache, table, lens, page_size)
        elif fn == "slot_mapping":
            paged_kv.slot_mapping(table, lens, page_size)
        else:
            paged_kv.to_flashinfer_indices(table, lens, page_size)


# --------------------------------------------------------------------------------------
# write_paged / write_tokens
# --------------------------------------------------------------------------------------

@st.composite
def writes(draw):
    num_pages, page_size, heads = draw(st.integers(1, 4)), draw(st.sampled_from([4, 1])), 2
    dtype = draw(st.sampled_from([torch.bfloat16, E4M3, torch.float32]))
    n_slots = num_pages * page_size
    lie = draw(st.sampled_from(["none", "none", "high", "negative"]))
    slots = draw(st.lists(st.integers(0, n_slots - 1), unique=True, max_size=n_slots))
    if lie == "high" and slots:
        slots[0] = n_slots + draw(st.integers(0, 5))
    elif lie == "negative" and slots:
        slots[-1] = -draw(st.integers(1, 5))
    lie = lie if slots else "none"
    return num_pages, page_size, heads, dtype, slots, lie, draw(st.sampled_from(INDEX))


@property_settings(cpu_examples=50)
@given(w=writes(), broken=st.sampled_from(
    ["none", "none", "none", "values_dtype", "values_shape", "slots_2d", "slots_float",
     "values_meta", "cache_strided", "cache_list"]))
def test_write_paged_writes_the_slots_or_names_the_lie(w, broken):
    num_pages, page_size, heads, dtype, slots, lie, slot_dtype = w
    cache = torch.zeros(num_pages, page_size, heads, 8).to(dtype).to(DEV)
    values = (torch.arange(len(slots) * heads * 8, dtype=torch.float32) % 200).reshape(
        len(slots), heads, 8).to(dtype).to(DEV)
    slots_t = torch.tensor(slots, dtype=slot_dtype).to(DEV)
    e = Expect()
    if broken == "values_dtype":
        values = values.float() if dtype != torch.float32 else values.half()
        e.add(TypeError, "values")
    elif broken == "values_shape":
        values = torch.cat([values, values[:1] if len(slots) else
                            torch.zeros(1, heads, 8, device=DEV).to(dtype)])
        e.add(ValueError, "values")
    elif broken == "slots_2d":
        slots_t = slots_t[None]
        e.add(ValueError, "slots")
    elif broken == "slots_float":
        slots_t = slots_t.float()
        e.add(TypeError, "slots")
    elif broken == "values_meta":
        values = values.to("meta")
        e.add(ValueError, "values")
    elif broken == "cache_strided":
        cache = torch.stack([cache, cache], 1)[:, 0]  # K of a fused K/V cache: pages and
        # slots are not one strided dim
        if page_size > 1 and num_pages > 1:
            e.add(ValueError, "cache")
    elif broken == "cache_list":
        cache = cache.tolist() if dtype != E4M3 else [0]
        e.add(TypeError, "cache")
    if e.valid and lie != "none":
        e.add(ValueError, "slots")
    before = cache.clone() if torch.is_tensor(cache) and e.valid else None
    with raises_naming(e.errors):
        paged_kv.write_paged(cache, slots_t, values)
    if e.valid:
        expect = before.reshape(-1, heads, 8).cpu().view(torch.uint8).clone()
        if len(slots):
            expect[torch.tensor(slots)] = values.cpu().view(torch.uint8)
        same_bytes(cache.reshape(-1, heads, 8).cpu(), expect.view(dtype), "write_paged")


@property_settings(cpu_examples=30)
@given(kv_dtype=st.sampled_from([torch.bfloat16, *FP8_KV_DTYPES, torch.float16]),
       granularity=st.sampled_from(["per_token", "per_tensor", None, "per_block"]),
       n=st.sampled_from([3, 0, 5]), scales=st.sampled_from(["given", "none", "shape",
                                                               "dtype"]),
       tokens_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int32]))
def test_write_tokens_stores_what_the_quantiser_gives(kv_dtype, granularity, n, scales,
                                                      tokens_dtype):
    num_pages, page_size, heads, d = 3, 4, 2, 64
    cache = torch.zeros(num_pages, page_size, heads, d).to(kv_dtype).to(DEV)
    slots = torch.randperm(num_pages * page_size, generator=torch.Generator().manual_seed(n))[
        :n].to(DEV)
    tokens = torch.randn(n, heads, d, generator=torch.Generator().manual_seed(1)).to(
        tokens_dtype if tokens_dtype != torch.int32 else torch.float32)
    if tokens_dtype == torch.int32:
        tokens = tokens.to(torch.int32)
    tokens = tokens.to(DEV)
    token_scales = {"given": torch.full((num_pages, page_size, heads), math.nan, device=DEV),
                    "none": None,
                    "shape": torch.ones(num_pages, page_size, device=DEV),
                    "dtype": torch.ones(num_pages, page_size, heads, device=DEV).double()}[scales]
    e = Expect()
    fp8 = kv_dtype in FP8_KV_DTYPES
    if tokens_dtype == torch.int32:
        e.add(TypeError, "tokens")
    elif not fp8 and granularity is not None:
        e.add(ValueError, "granularity")
    elif fp8 and granularity not in ("per_token", "per_tensor"):
        e.add(ValueError, "granularity")
    elif fp8 and granularity == "per_token" and scales != "given":
        e.add(TypeError if scales in ("none", "dtype") else ValueError, "token_scales")
    with raises_naming(e.errors):
        scale = paged_kv.write_tokens(cache, slots, tokens, granularity, token_scales)
    if not e.valid:
        return
    if not fp8:
        assert scale is None
        want = tokens.to(kv_dtype)
    else:
        want, want_scale = paged_kv.quantize_fp8_tokens(tokens, granularity, kv_dtype)
        if granularity == "per_token":
            assert scale is token_scales
            stored = scale.reshape(-1, heads)[slots.cpu()] if n else scale.new_empty(0, heads)
            assert torch.equal(stored.cpu(), want_scale.float().cpu())
        else:
            assert torch.equal(scale.cpu(), want_scale.float().reshape(1).cpu())
    got = cache.reshape(-1, heads, d)[slots]
    same_bytes(got.cpu(), want.cpu(), f"write_tokens {kv_dtype} {granularity}")


# --------------------------------------------------------------------------------------
# pack_paged_kv
# --------------------------------------------------------------------------------------

@property_settings(cpu_examples=30)
@given(lens=st.lists(st.integers(1, 30), max_size=3), page_size=st.sampled_from([16, 4, 1]),
       kv=st.sampled_from([(torch.bfloat16, None), (E4M3, "per_token"), (E4M3, "per_tensor"),
                           (torch.float16, None)]),
       broken=st.sampled_from(["none", "none", "none", "count", "kv_shape", "kv_dtype",
                               "granularity", "no_granularity", "tokens_int", "tokens_list",
                               "page_size", "lens"]),
       poison=st.booleans(), seed=st.integers(0, 2**16))
def test_pack_paged_kv_gathers_back_or_names_the_lie(lens, page_size, kv, broken, poison,
                                                     seed):
    kv_dtype, granularity = kv
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(sum(lens), 2, 64, generator=gen).to(DEV)
    v = torch.randn(sum(lens), 2, 64, generator=gen).to(DEV)
    e = Expect()
    args = dict(k_tokens=k, v_tokens=v, seq_lens=list(lens), page_size=page_size,
                kv_dtype=kv_dtype, scale_granularity=granularity, poison=poison)
    if broken == "count":
        args["seq_lens"] = lens + [1]
        e.add(ValueError, "k_tokens")
    elif broken == "kv_shape":
        args["v_tokens"] = v[:, :1]
        e.add(ValueError, "v_tokens")
    elif broken == "kv_dtype":
        args["kv_dtype"] = torch.float32
        e.add(NotImplementedError, "kv_dtype")
    elif broken == "granularity":
        args["scale_granularity"] = "per_block" if kv_dtype == E4M3 else "per_token"
        e.add(ValueError, "granularity")
    elif broken == "no_granularity" and kv_dtype == E4M3:
        args["scale_granularity"] = None
        e.add(ValueError, "granularity")
    elif broken == "tokens_int":
        args["k_tokens"] = k.to(torch.int32)
        e.add(TypeError, "k_tokens")
    elif broken == "tokens_list":
        args["v_tokens"] = v.tolist()
        e.add(TypeError, "v_tokens")
    elif broken == "page_size":
        args["page_size"] = 0
        e.add(ValueError, "page_size")
    elif broken == "lens":
        args["seq_lens"] = [0] + lens
        e.add(ValueError, "seq_lens")
    with raises_naming(e.errors):
        kv_out = paged_kv.pack_paged_kv(args.pop("k_tokens"), args.pop("v_tokens"),
                                        args.pop("seq_lens"), args.pop("page_size"),
                                        generator=gen, **args)
    if not e.valid:
        return
    assert kv_out.seq_lens.tolist() == lens and kv_out.k_cache.dtype == kv_dtype
    stored = kv_out.k_cache[:0, 0]
    if lens:
        stored = torch.cat(paged_kv.gather_paged(kv_out.k_cache, kv_out.block_tables,
                                                 kv_out.seq_lens, page_size))
    if granularity is None:
        want = k.to(kv_dtype)
    else:
        want, _ = paged_kv.quantize_fp8_tokens(k, granularity, kv_dtype)
    same_bytes(stored.cpu(), want.reshape(stored.shape).cpu(), "packed K")
    unowned = kv_out.k_cache.shape[0] * page_size - sum(lens)
    nan_slots = torch.isnan(kv_out.k_cache.float()).flatten(2).all(-1).sum().item()
    assert nan_slots == (unowned if poison else 0)
