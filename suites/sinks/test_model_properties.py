"""Property tests of the tiny LM's public entry points (``kvperf_kernels.models.tiny_lm``)
over their argument space (hypothesis): ``TinyLM.forward``, ``greedy_decode`` (paged KV
cache, our decode kernel or the float64 reference) and ``greedy_decode_no_cache``.

Every draw either raises a TypeError / ValueError / NotImplementedError naming a broken
argument, or runs: finite logits of the right shape, and with teacher forcing the kernel's
logits match the reference's on the same stored cache. Empty batches give empty results.
A randomly initialised model (seeded) is enough: the contract does not need trained weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvperf_kernels.device import default_device
from kvperf_kernels.models.tiny_lm import (
    TinyLM,
    TinyLMConfig,
    greedy_decode,
    greedy_decode_no_cache,
)
from kvperf_kernels.testing.properties import property_settings, raises_naming

DEV = default_device()
KV = [(torch.bfloat16, None), (torch.float8_e4m3fn, "per_token"),
      (torch.float8_e4m3fn, "per_tensor")]


@pytest.fixture(scope="module")
def model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(TinyLMConfig()).to(DEV).eval().requires_grad_(False)


prompt_lists = st.lists(st.lists(st.integers(0, 63), min_size=2, max_size=12), max_size=2)


@property_settings(cpu_examples=4)
@given(prompts=prompt_lists, new_tokens=st.integers(1, 3), kv=st.sampled_from(KV),
       page_size=st.sampled_from([16, 4]))
def test_kernel_decode_matches_the_reference_decode(model, prompts, new_tokens, kv,
                                                    page_size):
    kv_dtype, granularity = kv
    common = dict(kv_dtype=kv_dtype, granularity=granularity, page_size=page_size)
    with raises_naming(None):
        ref = greedy_decode(model, prompts, new_tokens, attention="reference", **common)
        forced = ref.tokens[:, :-1]
        ref = greedy_decode(model, prompts, new_tokens, attention="reference", forced=forced,
                            **common)
        got = greedy_decode(model, prompts, new_tokens, attention="kernel", forced=forced,
                            **common)
    assert got.logits.shape == (len(prompts), new_tokens, model.cfg.vocab_size)
    assert torch.isfinite(got.logits).all()
    torch.testing.assert_close(got.logits, ref.logits, atol=2e-2, rtol=2e-2)


BAD_DECODE = [
    (dict(prompts="0 1 2"), TypeError, "prompts"),
    (dict(prompts=[[1, 2], 3]), TypeError, "prompts"),
    (dict(prompts=[[1]]), ValueError, "prompts"),
    (dict(prompts=[[1, 64]]), ValueError, "prompts"),
    (dict(prompts=[[1, -1]]), ValueError, "prompts"),
    (dict(prompts=[[1, 2.0]]), ValueError, "prompts"),
    (dict(new_tokens=0), ValueError, "new_tokens"),
    (dict(new_tokens=1.5), ValueError, "new_tokens"),
    (dict(page_size=0), ValueError, "page_size"),
    (dict(attention="flash"), ValueError, "attention"),
    (dict(kv_dtype=torch.float16), NotImplementedError, "kv_dtype"),
    (dict(kv_dtype=torch.float8_e4m3fn), ValueError, "granularity"),
    (dict(granularity="per_token"), ValueError, "granularity"),
    (dict(forced=[[1]]), TypeError, "forced"),
    (dict(forced=torch.zeros(1, 5, dtype=torch.long)), ValueError, "forced"),
    (dict(forced=torch.full((1, 2), 99, dtype=torch.long)), ValueError, "forced"),
    (dict(forced=torch.zeros(1, 2)), TypeError, "forced"),
]


@pytest.mark.parametrize("override, exc, name", BAD_DECODE,
                         ids=[f"{next(iter(o))}-{i}" for i, (o, _, _) in enumerate(BAD_DECODE)])
def test_greedy_decode_rejects_broken_arguments(model, override, exc, name):
    args = {**dict(prompts=[[1, 2, 3]], new_tokens=3, attention="reference"), **override}
    with raises_naming({exc: (name,)}):
        greedy_decode(model, args.pop("prompts"), args.pop("new_tokens"), **args)


def test_empty_batches_give_empty_results(model):
    for result in (greedy_decode(model, [], 2), greedy_decode(model, [], 2, attention="kernel"),
                   greedy_decode_no_cache(model, [], 2)):
        assert result.tokens.shape == (0, 2) and result.logits.shape == (0, 2, 64)
    assert model(torch.zeros(0, 5, dtype=torch.long, device=DEV)).shape == (0, 5, 64)


@property_settings(cpu_examples=20)
@given(shape=st.sampled_from([(2, 5), (1, 1), (0, 3), (3,), (2, 2, 2)]),
       dtype=st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool]),
       lo=st.sampled_from([0, -1]), hi=st.sampled_from([63, 64, 2**40]))
def test_forward_takes_token_ids_or_names_them(model, shape, dtype, lo, hi):
    tokens = torch.full(shape, 7, dtype=torch.long)
    if tokens.numel():
        tokens.view(-1)[0] = lo
        tokens.view(-1)[-1] = hi
    tokens = tokens.to(dtype).to(DEV) if dtype != torch.bool else tokens.bool().to(DEV)
    if dtype not in (torch.long, torch.int32):
        expected = {TypeError: ("tokens",)}
    elif len(shape) != 2:
        expected = {ValueError: ("tokens",)}
    elif tokens.numel() and (lo < 0 or int(tokens.max()) >= 64):
        expected = {ValueError: ("tokens",)}
    else:
        expected = None
    with raises_naming(expected):
        logits = model(tokens)
    if expected is None:
        assert logits.shape == (*shape, 64) and torch.isfinite(logits).all()
        assert not math.isnan(float(logits.sum()))
