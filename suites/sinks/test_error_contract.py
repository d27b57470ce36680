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


@pytest.fixture(scope="module")
def inputs():
    """A valid small call: any error below comes from the one argument each test breaks."""
    gen = torch.Generator().manual_seed(0)
    dev = default_device()
    lens = (5, 20)
    k = torch.randn(sum(lens), 2, 64, generator=gen).to(dev)
    kv = pack_paged_kv(k, k.flip(0), lens, 16, kv_dtype=torch.float8_e4m3fn,
                       scale_granularity="per_token", generator=gen)
    q = torch.randn(2, 8, 64, generator=gen).to(dev, torch.bfloat16)
    sinks = torch.randn(8, generator=gen).to(dev)
    return dict(q=q, k_cache=kv.k_cache, v_cache=kv.v_cache, block_tables=kv.block_tables,
                seq_lens=kv.seq_lens, k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks)


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
        (lambda i: dict(out=torch.empty_like(i["q"], dtype=torch.float16)), ValueError,
         "out must be"),
    ],
    ids=[
        "fp16-query-bf16-kv", "k-v-dtype-mismatch", "q-2d", "cache-3d", "hq-not-multiple",
        "head-dim-32", "k-v-shape-mismatch", "sinks-shape", "sinks-int", "per-token-scale-shape",
        "scale-float64", "negative-scale", "block-tables-int64", "seq-lens-shape",
        "seq-len-zero", "seq-len-past-table", "page-id-out-of-range", "q-not-contiguous",
        "zero-splits", "window-minus-2", "sm-scale-nan", "block-n-not-pow2", "out-dtype",
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
