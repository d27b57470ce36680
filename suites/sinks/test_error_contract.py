"""The lab's error contract (item 4), given by our launcher (stock FlashInfer raises other
exceptions, see the research note): an FP8 query -> NotImplementedError "require BF16/FP16
query" naming the dtype; an unsupported KV dtype -> NotImplementedError naming it; shape
and value errors -> ValueError; other dtype mismatches -> TypeError.

float8_e4m3fnuz KV is supported (decoded in-kernel from its bits: bias 8, max 240, NaN at
0x80) and checked against the reference in test_decode_kernel.py; its fnuz query is still
an FP8 query and rejected here.
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.attention.decode import DecodeLaunch, paged_decode_attention
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.cache.paged_kv import pack_paged_kv
from kvperf_kernels.device import default_device

FP8_QUERY = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                         "float8_e5m2fnuz") if hasattr(torch, n)]
BAD_KV = [torch.float32, torch.float64, torch.float8_e5m2, torch.int8, torch.uint8]
if hasattr(torch, "float8_e5m2fnuz"):
    BAD_KV.append(torch.float8_e5m2fnuz)


def _valid_call(lens, seed: int, **pack) -> dict:
    """The arguments of a valid call over lens (pages of 16, Hq 8, Hkv 2, D 64)."""
    gen = torch.Generator().manual_seed(seed)
    dev = default_device()
    k = torch.randn(sum(lens), 2, 64, generator=gen).to(dev)
    kv = pack_paged_kv(k, k.flip(0), lens, 16, generator=gen, **pack)
    q = torch.randn(len(lens), 8, 64, generator=gen).to(dev, torch.bfloat16)
    sinks = torch.randn(8, generator=gen).to(dev)
    return dict(q=q, k_cache=kv.k_cache, v_cache=kv.v_cache, block_tables=kv.block_tables,
                seq_lens=kv.seq_lens, k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks)


@pytest.fixture(scope="module")
def inputs():
    """A valid small call: any error below comes from the one argument each test breaks."""
    return _valid_call((5, 20), 0, kv_dtype=torch.float8_e4m3fn,
                       scale_granularity="per_token")


def _call(inputs, **override):
    args = {**inputs, **override}
    return paged_decode_attention(
        args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("block_tables"),
        args.pop("seq_lens"), **args,
    )


@pytest.mark.parametrize("q_dtype", FP8_QUERY, ids=str)
@pytest.mark.parametrize("with_sinks", [True, False], ids=["sinks", "nosinks"])
def test_fp8_query_is_not_implemented(inputs, q_dtype, with_sinks):
    q = inputs["q"].float().to(q_dtype)
    sinks = inputs["sinks"] if with_sinks else None
    with pytest.raises(NotImplementedError, match="require BF16/FP16 query") as info:
        _call(inputs, q=q, sinks=sinks)
    assert str(q_dtype) in str(info.value)


def _cache_as(inputs, dtype=torch.bfloat16):
    """The FP8 K cache's stored values (unscaled; NaN free slots zeroed) recast as ``dtype``:
    a cache of another dtype for the dtype checks."""
    return inputs["k_cache"].float().nan_to_num(0.0).to(dtype)


@pytest.mark.parametrize("kv_dtype", BAD_KV, ids=str)
def test_unsupported_kv_dtype_is_not_implemented(inputs, kv_dtype):
    cache = _cache_as(inputs, kv_dtype)
    with pytest.raises(NotImplementedError, match="KV cache dtype") as info:
        _call(inputs, k_cache=cache, v_cache=cache.clone(), k_scale=None, v_scale=None)
    assert str(kv_dtype) in str(info.value)


def test_float32_query_is_a_type_error(inputs):
    with pytest.raises(TypeError, match=r"torch\.float32.*require BF16/FP16 query"):
        _call(inputs, q=inputs["q"].float())


@pytest.mark.parametrize(
    "override, exc, pattern",
    [
        (lambda i: dict(k_cache=_cache_as(i), v_cache=_cache_as(i),
                        q=i["q"].half(), k_scale=None, v_scale=None), TypeError,
         "must have the query's dtype"),
        (lambda i: dict(v_cache=_cache_as(i), v_scale=None), TypeError,
         "k_cache dtype .* != v_cache dtype"),
        (lambda i: dict(q=i["q"][0]), ValueError, r"q must be \[B, Hq, D\]"),
        (lambda i: dict(k_cache=i["k_cache"][0], v_cache=i["v_cache"][0]), ValueError,
         "NHD"),
        (lambda i: dict(q=i["q"][:, :5], sinks=None), ValueError, "multiple of Hkv"),
        (lambda i: dict(q=i["q"][..., :32], sinks=None), ValueError, "head_dim 32"),
        (lambda i: dict(v_cache=i["v_cache"][:-1]), ValueError, "k_cache .* != v_cache"),
        (lambda i: dict(sinks=i["sinks"][:4]), ValueError, r"sinks must be \[Hq=8\]"),
        (lambda i: dict(sinks=i["sinks"].long()), TypeError, "sinks must be a float tensor"),
        (lambda i: dict(k_scale=i["k_scale"][:, :8]), ValueError, "per-token"),
        (lambda i: dict(k_scale=i["k_scale"].double()), TypeError, "k_scale must be float32"),
        (lambda i: dict(v_scale=-1.0), ValueError, "v_scale must be a finite positive"),
        (lambda i: dict(block_tables=i["block_tables"].long()), TypeError,
         "block_tables must be int32"),
        (lambda i: dict(seq_lens=i["seq_lens"][:1]), ValueError, r"seq_lens must be \[B=2\]"),
        (lambda i: dict(seq_lens=i["seq_lens"] * 0), ValueError, "seq_len must be >= 1"),
        (lambda i: dict(seq_lens=i["seq_lens"] + 100), ValueError, "exceeds block_tables"),
        (lambda i: dict(block_tables=i["block_tables"] + 1000), ValueError,
         "page ids outside"),
        (lambda i: dict(q=i["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "contiguous in head_dim"),
        (lambda i: dict(num_splits=0), ValueError, "num_splits"),
        (lambda i: dict(window_left=-2), ValueError, "window_left"),
        (lambda i: dict(sm_scale=float("nan")), ValueError, "sm_scale"),
        (lambda i: dict(launch=DecodeLaunch(block_n=48)), ValueError, "block_n"),
        (lambda i: dict(launch=DecodeLaunch(ids_ahead=3)), ValueError, "ids_ahead"),
        (lambda i: dict(launch=DecodeLaunch(lazy_rescale=1)), ValueError, "lazy_rescale"),
        (lambda i: dict(out=torch.empty_like(i["q"], dtype=torch.float16)), ValueError,
         "out must be"),
        (lambda i: dict(max_seq_len=33), ValueError, "max_seq_len 33 exceeds block_tables"),
        (lambda i: dict(max_seq_len=0), ValueError, "max_seq_len"),
        (lambda i: dict(max_seq_len=10, checked=True), ValueError,
         "seq_len 20 exceeds max_seq_len 10"),
        (lambda i: dict(checked="yes"), TypeError, "checked"),
        (lambda i: dict(sinks=i["sinks"].clone().fill_(float("inf"))), ValueError, "sinks"),
        (lambda i: dict(k_scale=i["k_scale"].clone().fill_(float("nan"))), ValueError,
         "k_scale: .* not finite and positive"),
        (lambda i: dict(v_scale=float("inf")), ValueError, "v_scale must be a finite positive"),
        (lambda i: dict(v_scale=1e39), ValueError, "float32's range"),
        (lambda i: dict(sm_scale=True), TypeError, "sm_scale"),
        (lambda i: dict(block_tables=i["block_tables"] - 1000), ValueError, "page ids outside"),
        (lambda i: dict(block_tables=i["block_tables"].tolist()), TypeError, "block_tables"),
        (lambda i: dict(seq_lens=i["seq_lens"].to("meta")), ValueError, "seq_lens is on meta"),
    ],
    ids=[
        "fp16-query-bf16-kv", "k-v-dtype-mismatch", "q-2d", "cache-3d", "hq-not-multiple",
        "head-dim-32", "k-v-shape-mismatch", "sinks-shape", "sinks-int", "per-token-scale-shape",
        "scale-float64", "negative-scale", "block-tables-int64", "seq-lens-shape",
        "seq-len-zero", "seq-len-past-table", "page-id-out-of-range", "q-not-contiguous",
        "zero-splits", "window-minus-2", "sm-scale-nan", "block-n-not-pow2", "ids-ahead-3",
        "lazy-rescale-int", "out-dtype",
        "max-seq-len-past-table", "max-seq-len-zero", "checked-len-past-max-seq-len",
        "checked-not-bool", "inf-sinks", "nan-scale-tensor", "inf-scale", "scale-beyond-fp32",
        "sm-scale-bool", "negative-page-id", "block-tables-list", "seq-lens-on-meta",
    ],
)
def test_bad_input_raises_clear_error(inputs, override, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(inputs, **override(inputs))


def test_valid_call_matches_reference(inputs, matches_reference):
    """The fixture's call is valid (so each error above comes from the broken argument)."""
    out = _call(inputs)
    ref = paged_decode_attention_ref(
        inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["block_tables"],
        inputs["seq_lens"], k_scale=inputs["k_scale"], v_scale=inputs["v_scale"],
        sinks=inputs["sinks"],
    )
    matches_reference(out, ref, "valid call")


# --- the three failures of "launchers that never crash" -----------------------------------

@pytest.fixture(scope="module")
def table_of_48():
    """Two sequences (20 and 48 tokens) in pages of 16: a table of 3 pages (48 tokens) each."""
    call = _valid_call((20, 48), 1)
    assert call["block_tables"].shape[1] * 16 == 48
    return call


def test_length_past_the_table_is_an_error_or_clamped_never_a_fault(table_of_48,
                                                                     matches_reference):
    """seq_lens [20, 999] with max_seq_len=999 over a 48-token table segfaulted the
    interpreter (an out-of-bounds read on a GPU). Now: max_seq_len past the table is a host
    error (no sync); the checked mode names seq_lens; unchecked, the kernel clamps the
    length to the table (the 48 tokens sequence 1 owns), so nothing is read outside it."""
    i = table_of_48
    lying = torch.tensor([20, 999], dtype=torch.int32, device=i["q"].device)
    with pytest.raises(ValueError, match="max_seq_len 999 exceeds block_tables capacity"):
        _call(i, seq_lens=lying, max_seq_len=999)
    with pytest.raises(ValueError, match="seq_lens: seq_len 999 exceeds block_tables"):
        _call(i, seq_lens=lying, max_seq_len=48, checked=True)
    with pytest.raises(ValueError, match="seq_lens: seq_len 999 exceeds block_tables"):
        _call(i, seq_lens=lying)  # no max_seq_len: checked by default
    ref = paged_decode_attention_ref(i["q"], i["k_cache"], i["v_cache"], i["block_tables"],
                                     i["seq_lens"], sinks=i["sinks"])  # bf16 KV: no scales
    for num_splits in (1, 3):
        out = _call(i, seq_lens=lying, max_seq_len=48, checked=False, num_splits=num_splits)
        matches_reference(out, ref, f"unchecked, clamped to the table, {num_splits} splits")


@pytest.mark.parametrize("with_max_seq_len", [False, True], ids=["checked", "max_seq_len"])
def test_empty_batch_gives_an_empty_result(inputs, with_max_seq_len):
    """A batch of 0 raised an internal torch error (aminmax of nothing)."""
    extra = dict(max_seq_len=16) if with_max_seq_len else {}
    empty = dict(q=inputs["q"][:0], block_tables=inputs["block_tables"][:0],
                 seq_lens=inputs["seq_lens"][:0], **extra)
    out = _call(inputs, **empty)
    assert out.shape == (0, 8, 64) and out.dtype == torch.bfloat16
    given = torch.empty(0, 8, 64, dtype=torch.bfloat16, device=inputs["q"].device)
    assert _call(inputs, out=given, **empty) is given
    ref = paged_decode_attention_ref(inputs["q"][:0], inputs["k_cache"], inputs["v_cache"],
                                     inputs["block_tables"][:0], inputs["seq_lens"][:0])
    assert ref.shape == (0, 8, 64)


def test_nan_sinks_are_rejected_like_non_finite_scales(inputs):
    """NaN sinks were accepted and made every output NaN, while a NaN scale was rejected."""
    sinks = inputs["sinks"].clone()
    sinks[3] = float("nan")
    with pytest.raises(ValueError, match="sinks: 1 NaN or \\+inf of 8"):
        _call(inputs, sinks=sinks)
    with pytest.raises(ValueError, match="sinks"):
        _call(inputs, sinks=sinks, max_seq_len=20, checked=True)
    # -inf is a valid sink (no sink); unchecked mode takes NaN as given (garbage, no fault)
    sinks[3] = float("-inf")
    assert torch.isfinite(_call(inputs, sinks=sinks)).all()
    sinks[3] = float("nan")
    assert _call(inputs, sinks=sinks, max_seq_len=20).shape == inputs["q"].shape
