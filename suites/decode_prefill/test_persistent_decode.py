"""Decode variants of the persistent-decode lab, all real paged GQA attention with softmax
(sinks and window optional), each checked for every sequence against the float64 reference:
a host loop (one launch per sequence), our batched split-KV kernel, and the persistent kernel
(atomic work counter over (chunk, KV head) items, double-buffered tiles, a merge of chunks).

The lab's own Triton variant computed only the first num_programs sequences; ``LAB_BUG`` is
that defect, and the reference check must fail on it (negative control).
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.attention.persistent_decode import (
    persistent_decode_attention,
    sm_compile_report,
)
from kvperf_kernels.cache.paged_kv import cdiv
from kvperf_kernels.testing.compare import assert_matches_reference
from kvperf_kernels.testing.decode_variants import LAB_BUG, VARIANTS, run_variant

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
    with pytest.raises(ValueError, match="num_programs"):
        persistent_decode_attention(case.q, *args, num_programs=0)
    with pytest.raises(ValueError, match="seq_len"):
        persistent_decode_attention(case.q, kv.k_cache, kv.v_cache, kv.block_tables,
                                    torch.zeros_like(kv.seq_lens))


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
def test_persistent_atomic_spreads_the_work(decode_case, kvperf):
    """On the GPU the atomic counter hands items to many programs: every item once, and the
    busiest program's item count recorded beside the mean."""
    case = decode_case(LONG_LENS, hq=64, hkv=8, head_dim=64, page_size=16, seed=12)
    kv = case.pack()
    items = sum(cdiv(n, 256) for n in LONG_LENS) * 8
    bound = len(LONG_LENS) * cdiv(max(LONG_LENS), 256) * 8  # the launcher's item bound
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
    """Every KV format x schedule of the persistent kernel, and its merge, compiled offline for
    sm90 (no GPU): the atomic schedule's PTX has its atomics (one site per counter read), the
    others none."""
    try:
        report = sm_compile_report(90)
    except RuntimeError as exc:  # no NVIDIA backend / ptxas in this Triton
        kvperf.skip(f"needs Triton's NVIDIA backend to compile for sm90 offline; found {exc}"
                    [:300])
    assert report.pop("merge")["atomics"] == 0
    for variant, facts in report.items():
        assert (facts["atomics"] > 0) == variant.endswith("-atomic"), (variant, facts)
    assert len(report) == 5
