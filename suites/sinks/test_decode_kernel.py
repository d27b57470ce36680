"""Our Triton paged decode kernel with sinks against the float64 reference on the same KV.

FP8 cases dequantise the same stored bytes in both, so the comparison is tight (about one
ulp of the 16-bit output); FP8 rounding itself is measured in test_fp8_drift.py. Every
cache slot no sequence owns holds NaN: any read past seq_len shows as NaN in the output.
The CPU interpreter runs the small cases; the long, lab-sized ones need the GPU.
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.attention.decode import (
    MAX_SPLITS,
    DecodeLaunch,
    choose_num_splits,
    paged_decode_attention,
    sm_compile_report,
)
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.device import interpreted
from kvperf_kernels.testing.decode_specs import BF16, CPU_SPECS, E4M3, GPU_SPECS, RAGGED, Spec
from kvperf_kernels.testing.inputs import KEY_GROWTH, with_growing_keys

# Small tiles in the interpreter so that short sequences still span several tiles;
# on the GPU the launcher's own choice is what we test.
LAUNCH = DecodeLaunch(block_n=16) if interpreted() else DecodeLaunch()


def _run_and_check(spec: Spec, decode_case, matches_reference, kvperf):
    case = decode_case(spec.lens, hq=spec.hq, hkv=spec.hkv, head_dim=spec.head_dim,
                       page_size=spec.page_size, q_dtype=spec.q_dtype)
    kv = case.pack(spec.kv_dtype, spec.granularity)
    sinks = case.sinks if spec.sinks else None
    out = paged_decode_attention(
        case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
        k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks, window_left=spec.window_left,
        num_splits=spec.num_splits, launch=LAUNCH,
    )
    ref = paged_decode_attention_ref(
        case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
        k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks, window_left=spec.window_left,
    )
    kvperf.info("kv_dtype", str(spec.kv_dtype))
    m = kvperf.errors(out, ref)
    matches_reference(out, ref, spec.id)
    assert m["cosine"] >= 0.9999, f"{spec.id}: cosine {m['cosine']:.6f}"


@pytest.mark.parametrize("spec", CPU_SPECS, ids=lambda s: s.id)
def test_kernel_matches_reference(spec, decode_case, matches_reference, kvperf):
    _run_and_check(spec, decode_case, matches_reference, kvperf)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", GPU_SPECS, ids=lambda s: s.id)
def test_kernel_matches_reference_long(spec, decode_case, matches_reference, kvperf):
    _run_and_check(spec, decode_case, matches_reference, kvperf)


def _launch(case, kv, **kwargs):
    kwargs.setdefault("launch", LAUNCH)
    return paged_decode_attention(
        case.q, kv.k_cache, kv.v_cache, kv.block_tables, kwargs.pop("seq_lens", kv.seq_lens),
        k_scale=kv.k_scale, v_scale=kv.v_scale, **kwargs,
    )


@pytest.mark.parametrize(
    "kv_dtype, granularity, num_splits",
    [(BF16, None, 3), (E4M3, "per_token", 1)],  # the sink in the merge / in the decode kernel
    ids=["bf16-split3", "e4m3-per_token-split1"],
)
def test_sink_limits(kv_dtype, granularity, num_splits, decode_case, matches_reference):
    """A +30 sink takes (nearly) all the probability mass; -inf and -1e4 sinks change nothing."""
    case = decode_case((9, 40), hq=8, hkv=2, head_dim=64, page_size=16)
    kv = case.pack(kv_dtype, granularity)
    hq = case.q.shape[1]
    no_sink = _launch(case, kv, num_splits=num_splits)
    ref = paged_decode_attention_ref(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                     kv.seq_lens, k_scale=kv.k_scale, v_scale=kv.v_scale)
    matches_reference(no_sink, ref, "no sink")

    big = torch.full((hq,), 30.0, device=case.q.device)
    swamped = _launch(case, kv, sinks=big, num_splits=num_splits)
    assert torch.isfinite(swamped).all()
    # Scores here are O(5): the sink leaves each output a weight below ~e^-25 * len.
    assert swamped.abs().max().item() <= 1e-6, swamped.abs().max().item()
    assert no_sink.abs().max().item() > 0.1  # the shrink is the sink's doing

    for value in (float("-inf"), -1e4):
        silent = _launch(case, kv, sinks=torch.full((hq,), value, device=case.q.device),
                         num_splits=num_splits)
        # Same arithmetic up to one fp32 rounding of 1/denominator: at most one output ulp.
        torch.testing.assert_close(silent, no_sink, rtol=2 ** -7, atol=0.0,
                                   msg=lambda m, v=value: f"sink {v}: {m}")


def _check_windows_and_splits(case, kv, launch, window, matches_reference, what):
    """``launch`` with sinks, in one split, in two, and in two with ``window``, against the
    float64 reference."""
    for window_left, splits in ((-1, 1), (-1, 2), (window, 2)):
        out = _launch(case, kv, sinks=case.sinks, num_splits=splits, window_left=window_left,
                      launch=launch)
        ref = paged_decode_attention_ref(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                         kv.seq_lens, k_scale=kv.k_scale, v_scale=kv.v_scale,
                                         sinks=case.sinks, window_left=window_left)
        matches_reference(out, ref, f"{what}, window {window_left}, {splits} splits")


@pytest.mark.parametrize("ids_ahead", [0, 1, 2])
@pytest.mark.parametrize("kv_dtype", [BF16, E4M3], ids=["bf16", "e4m3"])
def test_page_ids_ahead_match_reference(ids_ahead, kv_dtype, decode_case, matches_reference):
    """Page ids loaded in the tile, or one or two tiles ahead (DecodeLaunch.ids_ahead): the
    same attention, on lengths that end inside, at and just past a tile (the ids a tile ahead
    past a split's end are masked, never read) and a window that starts mid-page."""
    case = decode_case((1, 16, 17, 50, 64), hq=8, hkv=2, head_dim=64, page_size=16)
    kv = case.pack(kv_dtype, "per_token" if kv_dtype is E4M3 else None)
    _check_windows_and_splits(case, kv, DecodeLaunch(block_n=16, ids_ahead=ids_ahead), 23,
                              matches_reference, f"ids_ahead {ids_ahead}")


@pytest.mark.parametrize("growth", list(KEY_GROWTH))
@pytest.mark.parametrize("kv_dtype, granularity", [(BF16, None), (E4M3, "per_tensor"),
                                                   (E4M3, "per_token")],
                         ids=["bf16", "e4m3-per_tensor", "e4m3-per_token"])
def test_lazy_rescale_matches_reference(kv_dtype, granularity, growth, decode_case,
                                        matches_reference):
    """DecodeLaunch(lazy_rescale=True) keeps a stale running max while no row's grows by more
    than 8 (log2): keys that grow along the sequence gently (every tile's max a little
    higher: the stale max stays, p grows up to 2^8) or in jumps (later tiles' scores far
    above: the accumulator is rescaled mid-sequence) give the reference's attention, with
    splits, sinks and a window (the merge and the sink take the partial's stale max)."""
    case = with_growing_keys(decode_case((70, 33, 16), hq=8, hkv=2, head_dim=64, page_size=16),
                             growth)
    kv = case.pack(kv_dtype, granularity)
    _check_windows_and_splits(case, kv, DecodeLaunch(block_n=16, lazy_rescale=True), 40,
                              matches_reference, f"lazy rescale, {growth}")


def test_split_merge_matches_single_pass(decode_case, matches_reference, kvperf):
    """Split-KV with the sink merged once equals the single-pass result, including splits
    that are empty for short sequences (1 and 17 tokens over 5 splits)."""
    case = decode_case(RAGGED, hq=8, hkv=2, head_dim=64, page_size=16, seed=3)
    kv = case.pack(BF16)
    ref = paged_decode_attention_ref(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                     kv.seq_lens, sinks=case.sinks)
    single = _launch(case, kv, sinks=case.sinks, num_splits=1)
    matches_reference(single, ref, "1 split vs reference")
    for num_splits in (2, 5):
        out = _launch(case, kv, sinks=case.sinks, num_splits=num_splits)
        kvperf.errors(out, ref, prefix=f"split{num_splits}_")
        matches_reference(out, ref, f"{num_splits} splits vs reference")
        # Split and single pass differ only in fp32 summation order.
        torch.testing.assert_close(out, single, rtol=2 ** -7, atol=1e-3)


def test_reading_past_seq_len_would_show(decode_case):
    """Control for the NaN poisoning: claim one token more than each sequence owns and the
    kernel reads a poisoned slot, so every output of that sequence turns NaN."""
    case = decode_case((5, 17), hq=4, hkv=2, head_dim=64, page_size=16)
    kv = case.pack(BF16)
    good = _launch(case, kv, sinks=case.sinks)
    assert torch.isfinite(good).all()
    too_long = _launch(case, kv, sinks=case.sinks, seq_lens=kv.seq_lens + 1)
    assert torch.isnan(too_long.float()).flatten(1).all(dim=1).all(), (
        "an over-long seq_len read a slot that was not NaN: the poisoning is not effective"
    )


def test_strided_views_and_out(decode_case, matches_reference):
    """q sliced from a fused qkv tensor, K/V as views of one [pages, 2, page, Hkv, D]
    cache (FlashInfer's combined layout), output into a NaN-filled preallocated tensor."""
    case = decode_case((33, 7), hq=8, hkv=2, head_dim=64, page_size=16, seed=5)
    kv = case.pack(BF16)
    fused_kv = torch.stack([kv.k_cache, kv.v_cache], dim=1)
    k_view, v_view = fused_kv[:, 0], fused_kv[:, 1]
    b, hq, d = case.q.shape
    qkv = torch.full((b, hq + 4, d), float("nan"), dtype=case.q.dtype, device=case.q.device)
    qkv[:, :hq] = case.q
    q_view = qkv[:, :hq]
    assert not q_view.is_contiguous() and not k_view.is_contiguous()
    out = torch.full_like(case.q, float("nan"))
    got = paged_decode_attention(q_view, k_view, v_view, kv.block_tables, kv.seq_lens,
                                 sinks=case.sinks, num_splits=2, out=out, launch=LAUNCH)
    assert got is out
    ref = paged_decode_attention_ref(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                     kv.seq_lens, sinks=case.sinks)
    matches_reference(out, ref, "strided views")


def test_no_sync_path_matches_checked_path(decode_case):
    """max_seq_len given (no device sync, graph-capturable) launches the same kernel; so do
    the checked mode with it (data checks, one sync) and checked=False without it."""
    case = decode_case(RAGGED, hq=8, hkv=2, head_dim=64, page_size=16, seed=7)
    kv = case.pack(E4M3, "per_tensor")
    checked = _launch(case, kv, sinks=case.sinks, num_splits=2)
    unchecked = _launch(case, kv, sinks=case.sinks, num_splits=2, max_seq_len=max(RAGGED))
    assert torch.isfinite(checked).all()
    assert torch.equal(checked, unchecked)
    both = _launch(case, kv, sinks=case.sinks, num_splits=2, max_seq_len=max(RAGGED),
                   checked=True)
    assert torch.equal(checked, both)
    assert torch.equal(checked, _launch(case, kv, sinks=case.sinks, num_splits=2, checked=False))


@pytest.mark.parametrize("batch, hkv, kv_len", [(64, 8, 8192), (1, 8, 32768), (4, 8, 1024),
                                                (1, 1, 300), (2, 8, 128)])
def test_split_heuristic(batch, hkv, kv_len):
    """The heuristic fills >= 2 waves of an H100 (132 SMs) when the length allows it and
    never gives a split fewer than 256 tokens (the merge would cost more than it saves)."""
    sms = 132
    splits = choose_num_splits(batch, hkv, kv_len, sms)
    assert 1 <= splits <= MAX_SPLITS
    assert splits == 1 or kv_len // splits >= 256
    assert batch * hkv * splits >= 2 * sms or splits == min(MAX_SPLITS, max(1, kv_len // 256))



def test_token_loop_prefetches_for_sm90(kvperf):
    """Every KV format's decode kernel compiled offline for sm90 (no GPU) at 3 stages with the
    page ids a tile ahead loads its tiles through cp.async and waits with the next tiles'
    copies still in flight. The control: with the page ids loaded in the tile (in its K/V
    address chain) Triton's pipeliner spends a stage on them and the wait drains every copy,
    so the depth reads 0 (3 stages then prefetch no deeper than 2)."""
    try:
        ahead = sm_compile_report(90, num_stages=3, ids_ahead=1)
        in_tile = sm_compile_report(90, num_stages=3, ids_ahead=0)
    except RuntimeError as exc:  # no NVIDIA backend / ptxas in this Triton
        kvperf.skip(f"needs Triton's NVIDIA backend to compile for sm90 offline; found {exc}"
                    [:300])
    assert set(ahead) == {"16bit", "fp8_e4m3fn", "mxfp8", "nvfp4"}
    for fmt, facts in ahead.items():
        assert facts["async_copies"] > 0, (fmt, facts)
        assert facts["prefetch_depth"] >= 1, (fmt, facts)
        assert (facts["e4m3_converts"] > 0) == (fmt != "16bit"), (fmt, facts)
        assert in_tile[fmt]["prefetch_depth"] == 0, (fmt, in_tile[fmt])
