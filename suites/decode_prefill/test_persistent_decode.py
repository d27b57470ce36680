"""Decode variants of the persistent-decode lab, all real paged GQA attention with softmax
(sinks and window optional), each checked for every sequence against the float64 reference:
a host loop (one launch per sequence), our batched split-KV kernel, and the persistent kernel
(atomic work counter over (chunk, KV head) items, pipelined tile loads, a merge of chunks).

The lab's own Triton variant computed only the first num_programs sequences; ``LAB_BUG`` is
that defect, and the reference check must fail on it (negative control).

FP8 E4M3 KV (per-tensor and per-token scales) through the persistent kernel: every sequence
vs the float64 reference on the same dequantised cache, free slots (and their scales) NaN.
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.attention.decode import heads_per_program
from kvperf_kernels.attention.decode_ref import dequantize_kv, paged_decode_attention_ref
from kvperf_kernels.attention.persistent_decode import (
    DEFAULT_CHUNK_TOKENS,
    MAX_TILE_COLS,
    persistent_decode_attention,
    sm_compile_report,
)
from kvperf_kernels.cache.paged_kv import cdiv
from kvperf_kernels.testing.compare import assert_matches_reference
from kvperf_kernels.testing.decode_tiers import pack_tier, query_for
from kvperf_kernels.testing.decode_variants import LAB_BUG, SPEED_SWEEP, VARIANTS, run_variant
from kvperf_kernels.testing.inputs import with_growing_keys

LENS = [5, 130, 1, 70, 200, 33]  # ragged: 1..4 chunks of 64 tokens, one single-token sequence
CHUNK = 64  # the interpreter's tile: several chunks per sequence, so the merge is exercised


def _options(variant: str, sinks, window_left: int) -> dict:
    opts = {"sinks": sinks, "window_left": window_left}
    if variant.startswith("persistent"):
        opts["chunk_tokens"] = CHUNK
    return opts


def _reference(case, kv, **opts):
    return paged_decode_attention_ref(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                      kv.seq_lens, sinks=opts.get("sinks"),
                                      window_left=opts.get("window_left", -1))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("page_size, with_sinks, window", [(16, False, -1), (64, True, 40)],
                         ids=["page16-plain", "page64-sinks-win40"])
def test_variant_matches_reference(variant, page_size, with_sinks, window, decode_case, kvperf):
    case = decode_case(LENS, hq=8, hkv=2, head_dim=64, page_size=page_size, seed=page_size)
    kv = case.pack()  # unused slots hold NaN: a read past a sequence shows
    opts = _options(variant, case.sinks if with_sinks else None, window)
    out = run_variant(variant, kv, case.q, **opts)
    ref = _reference(case, kv, **opts)
    assert_matches_reference(out, ref, f"{variant} page {page_size}")
    kvperf.accuracy("max_abs_err", (out.double() - ref).abs().max().item(), better="lower",
                    rtol=1.0, atol=1e-3)


@pytest.mark.parametrize("sweep", list(SPEED_SWEEP))
def test_speed_sweep_matches_reference(sweep, decode_case):
    """The launches the speed test times beside the default (more programs per SM)."""
    case = decode_case(LENS, hq=8, hkv=2, head_dim=64, page_size=16, seed=5)
    kv = case.pack()
    out = SPEED_SWEEP[sweep](case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
                             sinks=case.sinks)
    assert_matches_reference(out, _reference(case, kv, sinks=case.sinks), sweep)


def test_merge_over_more_chunks_than_one_step(decode_case):
    """A sequence of 18 chunks beside one of 1 and one of 2: the merge takes up to 16 chunks a
    step (MERGE_BLOCK) and fewer when the sequences have fewer, so the long one needs two
    steps, the short ones' padding none."""
    case = decode_case([18 * CHUNK - 5, 1, CHUNK + 1], hq=8, hkv=2, head_dim=64, page_size=16,
                       seed=11)
    kv = case.pack()
    out = persistent_decode_attention(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                      kv.seq_lens, sinks=case.sinks, chunk_tokens=CHUNK)
    assert_matches_reference(out, _reference(case, kv, sinks=case.sinks), "18-chunk merge")


@pytest.mark.parametrize("schedule", ["atomic", "static"])
def test_single_chunk_batch_writes_without_a_merge(schedule, decode_case, monkeypatch):
    """Every sequence within one chunk (max_seq_len <= chunk_tokens): each item normalises its
    own sequence's output and no merge is launched, so a missing write would leave the
    stale 7s. Unchecked, a sequence of length 0 comes out NaN, as the merge would write it."""
    import kvperf_kernels.attention.persistent_decode as pd

    def no_merge(*args, **kwargs):
        raise AssertionError("a merge was launched for a batch of single-chunk sequences")

    monkeypatch.setattr(pd, "_merge_chunks_kernel", type("NoMerge", (), {"__getitem__":
                                                                         no_merge})())
    case = decode_case([5, CHUNK, 1, 33], hq=8, hkv=2, head_dim=64, page_size=16, seed=13)
    kv = case.pack()
    ref = _reference(case, kv, sinks=case.sinks)
    out = torch.full_like(case.q, 7.0)
    opts = dict(sinks=case.sinks, chunk_tokens=CHUNK, max_seq_len=CHUNK, schedule=schedule,
                out=out)
    persistent_decode_attention(case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
                                **opts)
    assert_matches_reference(out, ref, f"single-chunk {schedule}")
    lens = kv.seq_lens.clone()
    lens[2] = 0
    out.fill_(7.0)
    persistent_decode_attention(case.q, kv.k_cache, kv.v_cache, kv.block_tables, lens,
                                checked=False, **opts)
    assert torch.isnan(out[2].float()).all()
    keep = [0, 1, 3]
    assert_matches_reference(out[keep], ref[keep], f"single-chunk {schedule}, one empty")


@pytest.mark.parametrize("num_programs", [3, 64])
@pytest.mark.parametrize("schedule", ["atomic", "static"])
def test_persistent_covers_every_item_once(num_programs, schedule, decode_case):
    """Whatever the program count (fewer or more than the items), every (chunk, KV head) item
    is computed by exactly one program; the static schedule spreads them round-robin."""
    case = decode_case(LENS, hq=8, hkv=2, head_dim=128, page_size=16, q_dtype=torch.float16,
                       seed=3)
    kv = case.pack()
    items = sum(cdiv(n, CHUNK) for n in LENS) * 2
    owner = torch.full((4 * items,), -1, dtype=torch.int32, device=case.q.device)
    out = persistent_decode_attention(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                      kv.seq_lens, sinks=case.sinks, chunk_tokens=CHUNK,
                                      num_programs=num_programs, schedule=schedule, owner=owner)
    assert_matches_reference(out, _reference(case, kv, sinks=case.sinks),
                             f"persistent {schedule} x{num_programs}")
    owned = owner[:items].cpu()
    assert (owned >= 0).all() and (owned < num_programs).all(), owned.tolist()
    assert (owner[items:] == -1).all(), "an item index beyond the batch's items was written"
    if schedule == "static":
        assert owned.tolist() == [i % num_programs for i in range(items)]


@pytest.mark.parametrize("num_programs", [2])
def test_lab_bug_fails_the_reference_check(num_programs, decode_case):
    """Negative control: the lab's variant (program p computes sequence p only) leaves every
    sequence beyond the program count uncomputed, and the per-sequence check catches it
    (NaN, not a stale plausible number); the first num_programs sequences are right."""
    case = decode_case(LENS, hq=8, hkv=2, head_dim=64, page_size=16, seed=5)
    kv = case.pack()
    out = LAB_BUG(case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
                  sinks=case.sinks, chunk_tokens=CHUNK, num_programs=num_programs)
    ref = _reference(case, kv, sinks=case.sinks)
    with pytest.raises(AssertionError, match="NaN/Inf"):
        assert_matches_reference(out, ref, "lab_bug")
    assert_matches_reference(out[:num_programs], ref[:num_programs], "lab_bug, owned sequences")
    assert torch.isnan(out[num_programs:].float()).all()


def test_empty_batch_and_bad_input(decode_case):
    case = decode_case([3, 9], hq=4, hkv=2, head_dim=64, page_size=16)
    kv = case.pack()
    args = (kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
    empty = persistent_decode_attention(case.q[:0], kv.k_cache, kv.v_cache,
                                        kv.block_tables[:0], kv.seq_lens[:0])
    assert empty.shape == (0, 4, 64)
    with pytest.raises(TypeError, match="k_cache dtype"):
        persistent_decode_attention(case.q.half(), *args)
    strided = kv.k_cache.transpose(2, 3).contiguous().transpose(2, 3)  # head_dim strided
    with pytest.raises(ValueError, match="k_cache must be contiguous in head_dim"):
        persistent_decode_attention(case.q, strided, kv.v_cache, kv.block_tables, kv.seq_lens)
    with pytest.raises(ValueError, match="schedule"):
        persistent_decode_attention(case.q, *args, schedule="fast")
    with pytest.raises(ValueError, match="chunk_tokens"):
        persistent_decode_attention(case.q, *args, chunk_tokens=100)
    with pytest.raises(ValueError, match="maxnreg must be an int >= 24, got 8"):
        persistent_decode_attention(case.q, *args, maxnreg=8)
    with pytest.raises(ValueError, match="num_programs"):
        persistent_decode_attention(case.q, *args, num_programs=0)
    with pytest.raises(ValueError, match="seq_len"):
        persistent_decode_attention(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                    torch.zeros_like(kv.seq_lens))


# --- FP8 E4M3 KV (decode.py's tile decode and scale contract) -------------------------------

def _fp8_inputs(case, granularity: str, scale_form: str = "tensor"):
    kv = case.pack(torch.float8_e4m3fn, granularity)
    scales = {"k_scale": kv.k_scale, "v_scale": kv.v_scale}
    if scale_form == "float":  # a Python float: the scalar mode
        scales = {n: float(t) for n, t in scales.items()}
    elif scale_form == "trailing1":  # quantize_per_token's [..., 1]
        scales = {n: t[..., None] for n, t in scales.items()}
    return kv, scales


def _fp8_reference(case, kv, k_scale, v_scale, **opts):
    return paged_decode_attention_ref(case.q, dequantize_kv(kv.k_cache, k_scale),
                                      dequantize_kv(kv.v_cache, v_scale), kv.block_tables,
                                      kv.seq_lens, sinks=opts.get("sinks"),
                                      window_left=opts.get("window_left", -1))


@pytest.mark.parametrize("granularity, scale_form", [
    ("per_tensor", "tensor"), ("per_tensor", "float"), ("per_token", "tensor"),
    ("per_token", "trailing1")])
@pytest.mark.parametrize("page_size, with_sinks, window, q_dtype", [
    (16, False, -1, torch.bfloat16), (64, True, 40, torch.float16)],
    ids=["page16-plain-bf16", "page64-sinks-win40-fp16"])
def test_persistent_fp8_matches_reference(granularity, scale_form, page_size, with_sinks, window,
                                          q_dtype, decode_case, kvperf):
    case = decode_case(LENS, hq=8, hkv=2, head_dim=64, page_size=page_size, q_dtype=q_dtype,
                       seed=page_size + 1)
    kv, scales = _fp8_inputs(case, granularity, scale_form)
    # the free slots are poisoned (NaN codes, NaN per-token scales): a read past a sequence
    # or a wrongly masked scale shows as NaN
    assert torch.isnan(kv.k_cache.float()).any() and torch.isnan(kv.v_cache.float()).any()
    if granularity == "per_token":
        assert torch.isnan(kv.k_scale).any() and torch.isnan(kv.v_scale).any()
    opts = _options("persistent", case.sinks if with_sinks else None, window)
    out = persistent_decode_attention(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                      kv.seq_lens, **scales, **opts)
    ref = _fp8_reference(case, kv, kv.k_scale, kv.v_scale, **opts)
    assert_matches_reference(out, ref, f"persistent fp8 {granularity} {scale_form}")
    kvperf.accuracy("max_abs_err", (out.double() - ref).abs().max().item(), better="lower",
                    rtol=1.0, atol=1e-3)


def _persistent_and_reference(case, kv: str, **opts):
    """The persistent kernel with ``opts`` on the case's BF16 ("bf16") or per-token FP8
    ("fp8_per_token") cache, and the float64 reference with the same sinks and window."""
    if kv == "bf16":
        cache, scales = case.pack(), {}
        ref = _reference(case, cache, **opts)
    else:
        cache, scales = _fp8_inputs(case, "per_token")
        ref = _fp8_reference(case, cache, cache.k_scale, cache.v_scale, **opts)
    out = persistent_decode_attention(case.q, cache.k_cache, cache.v_cache, cache.block_tables,
                                      cache.seq_lens, **scales, **opts)
    return out, ref


@pytest.mark.parametrize("growth", ["gentle", "jumps"])
@pytest.mark.parametrize("kv", ["bf16", "fp8_per_token"])
def test_persistent_lazy_rescale(kv, growth, decode_case):
    """lazy_rescale=True (a stale running max until some row's grows by more than 8) on keys
    that grow gently or in jumps along each sequence, several chunks per sequence (the
    merge takes each chunk's stale max) and a window, against the float64 reference; FP8
    per-token V also rescales acc where its running power of two grows."""
    case = with_growing_keys(decode_case(LENS, hq=8, hkv=2, head_dim=64, page_size=16,
                                         seed=23), growth)
    # 16-token tiles: four per 64-token chunk, so a chunk keeps a stale max across tiles
    out, ref = _persistent_and_reference(case, kv, sinks=case.sinks, chunk_tokens=CHUNK,
                                         window_left=100, lazy_rescale=True, block_n=16)
    assert_matches_reference(out, ref, f"persistent lazy rescale, {kv}, {growth}")


@pytest.mark.parametrize("kv", ["bf16", "fp8_per_token", "int4", "fp32"])
def test_persistent_two_heads_per_item(kv, decode_case):
    """Items of two KV heads (max_tile_cols=128 at D 64: block-diagonal q, per-token scales by
    row, INT4 group scales per head, partials stored per head) against the float64
    reference; FP8 with NaN-poisoned free slots."""
    case = decode_case(LENS, hq=8, hkv=2, head_dim=64, page_size=16, seed=21)
    opts = dict(sinks=case.sinks, chunk_tokens=CHUNK, max_tile_cols=128)
    if kv in ("int4", "fp32"):
        args, ref_k, ref_v, cache = pack_tier(case, kv)
        out = persistent_decode_attention(query_for(case, kv), **args, **opts)
        ref = paged_decode_attention_ref(query_for(case, kv), ref_k, ref_v, cache.block_tables,
                                         cache.seq_lens, sinks=case.sinks)
    else:
        out, ref = _persistent_and_reference(case, kv, **opts)
    assert_matches_reference(out, ref, f"persistent, two KV heads per item, {kv}")


def test_persistent_fp8_controls(decode_case):
    """Negative controls with FP8 KV: the lab's schedule still leaves the sequences beyond
    the program count NaN (and computes the owned ones right); the kernel's output misses a
    reference that swaps the per-token K and V scales (so the scales are really applied)."""
    case = decode_case(LENS, hq=8, hkv=2, head_dim=64, page_size=16, seed=6)
    kv, scales = _fp8_inputs(case, "per_token")
    ref = _fp8_reference(case, kv, kv.k_scale, kv.v_scale, sinks=case.sinks)
    bug = LAB_BUG(case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
                  sinks=case.sinks, chunk_tokens=CHUNK, num_programs=2, **scales)
    with pytest.raises(AssertionError, match="NaN/Inf"):
        assert_matches_reference(bug, ref, "fp8 lab_bug")
    assert_matches_reference(bug[:2], ref[:2], "fp8 lab_bug, owned sequences")
    assert torch.isnan(bug[2:].float()).all()
    swapped = _fp8_reference(case, kv, kv.v_scale, kv.k_scale, sinks=case.sinks)
    with pytest.raises(AssertionError, match="beyond"):
        assert_matches_reference(bug[:2], swapped[:2], "fp8 vs swapped scales")


def test_persistent_fp8_bad_scales(decode_case):
    """The batched kernel's scale contract, each error naming the argument."""
    case = decode_case([3, 9], hq=4, hkv=2, head_dim=64, page_size=16, seed=2)
    kv, scales = _fp8_inputs(case, "per_token")
    args = (kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)

    def run(*a, **kw):
        return persistent_decode_attention(case.q, *(a or args), **{**scales, **kw})

    with pytest.raises(TypeError, match="k_scale must be float32"):
        run(k_scale=kv.k_scale.double())
    with pytest.raises(TypeError, match="v_scale must be None, a float"):
        run(v_scale="1.0")
    with pytest.raises(TypeError, match="k_scale must be None, a float.*'bool'"):
        run(k_scale=True)
    with pytest.raises(ValueError,
                       match=r"v_scale must have one element \(per-tensor\) or shape \(3, 16, 2\)"):
        run(v_scale=kv.v_scale[:, :, :1])
    with pytest.raises(ValueError, match="k_scale must be a finite positive"):
        run(k_scale=-0.5)
    bad = kv.k_scale.clone()
    slot = kv.block_tables[1, 0].item()  # sequence 1's first token: owned
    bad[slot, 0, 1] = 0.0
    with pytest.raises(ValueError, match="k_scale: 1 scales the sequences read"):
        run(k_scale=bad)
    with pytest.raises(ValueError, match="v_scale: 1 scales"):
        run(v_scale=torch.tensor([float("nan")], device=kv.k_cache.device))
    bf16 = case.pack()
    with pytest.raises(TypeError, match="k_scale/v_scale belong to FP8"):
        run(bf16.k_cache, bf16.v_cache, bf16.block_tables, bf16.seq_lens)
    with pytest.raises(TypeError, match="k_cache dtype"):
        run(kv.k_cache, bf16.v_cache, kv.block_tables, kv.seq_lens)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        run(kv.k_cache.view(torch.float8_e5m2), kv.v_cache.view(torch.float8_e5m2),
            kv.block_tables, kv.seq_lens)


# --- GPU: long ragged batches (kv up to 32K), every sequence, every variant -----------------

LONG_LENS = [32768, 1, 513, 4000, 17, 9000, 64, 2048]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("page_size", [16, 64])
def test_variant_long_ragged(variant, page_size, decode_case, kvperf):
    """gpt-oss shapes (Hq 64, Hkv 8, D 64, sinks), lengths 1 to 32K: every sequence checked."""
    case = decode_case(LONG_LENS, hq=64, hkv=8, head_dim=64, page_size=page_size, seed=11)
    kv = case.pack()
    out = run_variant(variant, kv, case.q, sinks=case.sinks)
    ref = _reference(case, kv, sinks=case.sinks)
    assert_matches_reference(out, ref, f"{variant} long ragged page {page_size}")
    kvperf.accuracy("max_abs_err", (out.double() - ref).abs().max().item(), better="lower",
                    rtol=1.0, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_persistent_fp8_long_ragged(granularity, decode_case, kvperf):
    """FP8 E4M3 KV at gpt-oss shapes, lengths 1 to 32K (sinks): the persistent kernel (inline
    PTX V decode, the GPU's path) and the batched kernel beside it, every sequence checked
    against float64 on the dequantised cache."""
    case = decode_case(LONG_LENS, hq=64, hkv=8, head_dim=64, page_size=16, seed=13)
    kv, scales = _fp8_inputs(case, granularity)
    ref = _fp8_reference(case, kv, kv.k_scale, kv.v_scale, sinks=case.sinks)
    for name in ("persistent", "batched"):
        out = VARIANTS[name](case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
                             sinks=case.sinks, **scales)
        assert_matches_reference(out, ref, f"{name} fp8 {granularity} long ragged")
        kvperf.accuracy(f"{name}_max_abs_err", (out.double() - ref).abs().max().item(),
                        better="lower", rtol=1.0, atol=1e-3)


@pytest.mark.gpu
def test_persistent_atomic_spreads_the_work(decode_case, kvperf):
    """On the GPU the atomic counter hands items to many programs: every item once, and the
    busiest program's item count recorded beside the mean."""
    case = decode_case(LONG_LENS, hq=64, hkv=8, head_dim=64, page_size=16, seed=12)
    kv = case.pack()
    chunk = DEFAULT_CHUNK_TOKENS
    kv_blocks = 8 // heads_per_program(8, 8, 64, MAX_TILE_COLS)  # KV-head blocks per chunk
    items = sum(cdiv(n, chunk) for n in LONG_LENS) * kv_blocks
    bound = len(LONG_LENS) * cdiv(max(LONG_LENS), chunk) * kv_blocks  # the launcher's bound
    owner = torch.full((bound,), -1, dtype=torch.int32, device=case.q.device)
    out = persistent_decode_attention(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                      kv.seq_lens, sinks=case.sinks, owner=owner)
    assert_matches_reference(out, _reference(case, kv, sinks=case.sinks), "persistent")
    assert (owner[:items] >= 0).all() and (owner[items:] == -1).all()
    per_program = torch.bincount(owner[:items].long().cpu())
    busy = per_program[per_program > 0]
    assert len(busy) > 1, "one program took every item on the GPU"
    kvperf.info("items", items)
    kvperf.info("programs_used", len(busy))
    kvperf.info("max_items_per_program", int(busy.max()))
    kvperf.info("mean_items_per_program", round(float(busy.float().mean()), 2))



def test_persistent_kernels_compile_for_sm90(kvperf):
    """Every KV format x schedule of the persistent kernel (FP8 with per-token and per-tensor
    scales; 16-bit and FP8 per-token with two KV heads per item too; 16-bit where no merge
    follows), and its merge, compiled offline for sm90 (no GPU): the atomic schedule's PTX has
    its atomics (one site per counter read), the others none; FP8 tiles are decoded by the
    packed hardware convert (cvt.rn.f16x2.e4m3x2), which no other format has; every
    variant's tiles but INT4's load through cp.async (Triton pipelined its token loop), and
    its loop's wait leaves copies in flight (before the page ids loaded a tile ahead, every
    wait drained them: 3 stages prefetched one tile, as 2 do)."""
    try:
        report = sm_compile_report(90)
    except RuntimeError as exc:  # no NVIDIA backend / ptxas in this Triton
        kvperf.skip(f"needs Triton's NVIDIA backend to compile for sm90 offline; found {exc}"
                    [:300])
    assert report.pop("merge")["atomics"] == 0
    for variant, facts in report.items():
        assert (facts["atomics"] > 0) == variant.endswith("-atomic"), (variant, facts)
        assert (facts["e4m3_converts"] > 0) == variant.startswith("fp8"), (variant, facts)
        # the token loop is pipelined; INT4 gathers a byte per element (no cp.async)
        assert (facts["async_copies"] > 0) == (not variant.startswith("int4")), (variant, facts)
        # ... and keeps the next tiles' copies in flight while it waits for this one's
        assert (facts["prefetch_depth"] > 0) == (not variant.startswith("int4")), (variant, facts)
    assert len(report) == 10
    assert {"fp8_per_token-atomic", "fp8_per_tensor-atomic", "16bit_2heads-atomic",
            "fp8_per_token_2heads-atomic", "16bit_unmerged-atomic"} <= set(report)
