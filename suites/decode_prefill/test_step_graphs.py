"""The multi-layer decode step run eager / FULL / PIECEWISE / FULL_AND_PIECEWISE.

CPU (Triton interpreter, TINY config, no capture): the eager step against its float64
reference (with a control that must miss), every mode's bucketing, padding and piece split
against eager (same logits and tokens, step after step), the padding touching only the
scratch page (with a misdirected-padding control), the error contract.
GPU (Qwen2.5-0.5B sizes: 24 layers): every mode captured as CUDA graphs against eager, token
for token, and the step's time per mode (the launch overhead the graphs remove).
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.models.decode_step import (
    QWEN25_05B,
    TINY,
    DecodeStepModel,
    reference_step,
)
from kvperf_kernels.models.step_graphs import StepRunner, bucket_for, pad_rows
from kvperf_kernels.testing.decode_step import greedy_steps, pages_needed, step_workload

LENS = [5, 40, 17]  # batch 3: padded to bucket 4
STEPS = 2
FULL_BUCKETS, PIECE_BUCKETS = (1, 2, 4), (4, 8)
STEP_RTOL = 2e-2  # bf16 matmuls vs float64, rel L2 of the logits (measured 5e-3 on TINY)
# A padded bucket vs the unpadded eager batch on a GPU: other GEMM kernels and split counts
# flip bf16 roundings, and 24 layers amplify them (on the CPU, one-ulp flips of 10 % of the
# attention outputs at every layer of the Qwen-sized step moved the logits by rel L2 1.5e-2).
GPU_MODE_RTOL = 5e-2


def _rel_l2(a, b) -> float:
    a, b = a.double(), b.double().to(a.device)
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny():
    """The TINY model, a workload of batch 3, and the eager run of STEPS greedy steps."""
    model = DecodeStepModel(TINY, num_pages=pages_needed(LENS, STEPS, 16) + 2, page_size=16,
                            seed=1)
    tokens, positions, table = step_workload(model, LENS, STEPS, seed=2)
    snapshot = model.cache.clone()
    eager = greedy_steps(StepRunner(model, "EAGER", max_pages=table.shape[1]).run,
                         tokens, positions, table, STEPS)
    return model, (tokens, positions, table), snapshot, eager


def test_eager_step_matches_float64_reference(tiny, kvperf):
    model, (tokens, positions, table), snapshot, eager = tiny
    model.set_cache(snapshot)
    ref = reference_step(model, tokens, positions, table)
    err = _rel_l2(eager[0][0], ref)
    assert torch.isfinite(eager[0]).all()
    assert err < STEP_RTOL, f"eager step vs float64 reference: rel L2 {err:.3g}"
    assert torch.equal(eager[1][0].cpu(), ref.argmax(-1).cpu())
    kvperf.accuracy("logits_rel_l2_vs_float64", err, better="lower", rtol=1.0, atol=1e-3)
    # control: the reference one position on (new K/V in the next slot, RoPE shifted, one
    # random cached token more) must miss the tolerance
    wrong = reference_step(model, tokens, positions + 1, table)
    assert _rel_l2(eager[0][0], wrong) > STEP_RTOL


def test_persistent_attention_in_the_step(tiny):
    """The step with the persistent kernel as its attention: the float64 reference's logits."""
    model, (tokens, positions, table), snapshot, eager = tiny
    model.set_cache(snapshot)
    ref = reference_step(model, tokens, positions, table)
    model.attention = "persistent"
    try:
        logits, toks = StepRunner(model, "EAGER", max_pages=table.shape[1]).run(
            tokens, positions, table)
    finally:
        model.attention = "batched"
    assert _rel_l2(logits, ref) < STEP_RTOL
    assert torch.equal(toks.cpu(), ref.argmax(-1).cpu())


@pytest.mark.parametrize("mode", ["FULL", "PIECEWISE", "FULL_AND_PIECEWISE"])
def test_mode_matches_eager_without_capture(mode, tiny):
    """Bucketing, padding and the piece split on the CPU: the same logits and tokens as
    eager, step after step (bit for bit: the same torch ops on the CPU)."""
    model, (tokens, positions, table), snapshot, eager = tiny
    model.set_cache(snapshot)
    # FULL_AND_PIECEWISE with full graphs up to 2: batch 3 takes its piecewise side
    full = (1, 2) if mode == "FULL_AND_PIECEWISE" else FULL_BUCKETS
    runner = StepRunner(model, mode, max_pages=table.shape[1], full_buckets=full,
                        piecewise_buckets=PIECE_BUCKETS, capture=False)
    assert runner.kind_for(3) == ("PIECEWISE" if mode != "FULL" else "FULL")
    logits, toks = greedy_steps(runner.run, tokens, positions, table, STEPS, forced=eager[1])
    assert runner.graph_count == 0
    _same_as_eager(logits, toks, eager, mode)


def _same_as_eager(logits, toks, eager, what) -> None:
    """Bit for bit on the CPU; on a GPU a padded bucket may pick other GEMM kernels and split
    counts than the unpadded eager batch: eager's tokens (bar near-ties), logits within
    GPU_MODE_RTOL."""
    if logits.device.type == "cpu":
        assert torch.equal(toks, eager[1])
        assert torch.equal(logits, eager[0]), f"{what}: max diff {(logits - eager[0]).abs().max()}"
    else:
        _tokens_agree(eager[0], eager[1], toks)
        assert _rel_l2(logits, eager[0]) < GPU_MODE_RTOL


def _changed_slots(before, after, page_size):
    changed = (before != after).any(-1).any(-1).any(0).any(0)  # [pages, slots]
    return {int(p) * page_size + int(s) for p, s in changed.nonzero().tolist()}


@pytest.mark.parametrize("misdirect", [False, True], ids=["scratch", "control-real-page"])
def test_padding_writes_only_the_scratch_page(misdirect, tiny):
    """One FULL step of batch 3 in bucket 4 changes exactly the 3 new tokens' slots and slot 0
    of the scratch page; padding pointed at a real page (the control) changes a real
    sequence's token 0, and its output."""
    model, (tokens, positions, table), snapshot, eager = tiny
    model.set_cache(snapshot)
    scratch = model.scratch_page
    if misdirect:
        model.scratch_page = int(table[0, 0])  # the mutation: sequence 0's first page
    try:
        runner = StepRunner(model, "FULL", max_pages=table.shape[1], full_buckets=(4,),
                            capture=False)
        logits, toks = runner.run(tokens, positions, table)
    finally:
        model.scratch_page = scratch
    ps = model.page_size
    new = {int(table[b, positions[b] // ps]) * ps + int(positions[b] % ps) for b in range(3)}
    pad_slot = (int(table[0, 0]) if misdirect else scratch) * ps
    assert _changed_slots(snapshot, model.cache, ps) == new | {pad_slot}
    if misdirect:
        assert not torch.equal(logits[0], eager[0][0][0]), "the control left sequence 0 intact"
    else:
        _same_as_eager(logits[None], toks[None], (eager[0][:1], eager[1][:1]), "padded")


def test_buckets_dispatch_and_errors(tiny):
    model, (tokens, positions, table), snapshot, _ = tiny
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="batch 9 is larger than the largest captured bucket 8"):
        bucket_for(9, (1, 2, 4, 8))
    with pytest.raises(ValueError, match="batch"):
        bucket_for(0, (1, 2))
    both = StepRunner(model, "FULL_AND_PIECEWISE", max_pages=table.shape[1], full_buckets=(1, 2),
                      piecewise_buckets=(4, 8))
    assert [both.kind_for(n) for n in (1, 2, 3, 8)] == ["FULL", "FULL", "PIECEWISE", "PIECEWISE"]
    full = StepRunner(model, "FULL", max_pages=table.shape[1], full_buckets=(1, 2))
    with pytest.raises(ValueError, match="batch 3 is larger than the largest captured bucket 2"):
        full.run(tokens, positions, table)
    with pytest.raises(ValueError, match="mode"):
        StepRunner(model, "GRAPHS", max_pages=4)
    with pytest.raises(ValueError, match="full_buckets"):
        StepRunner(model, "FULL", max_pages=4, full_buckets=(0,))
    with pytest.raises(ValueError, match="block_tables"):
        StepRunner(model, "EAGER", max_pages=1).run(tokens, positions, table)
    with pytest.raises(TypeError, match="cache dtype"):
        model.set_cache(snapshot.half())
    with pytest.raises(ValueError, match="cache must be contiguous"):
        model.set_cache(snapshot.transpose(-1, -2).contiguous().transpose(-1, -2))
    with pytest.raises(ValueError, match="attention"):
        DecodeStepModel(TINY, num_pages=2, attention="flash")
    b = model.new_buffers(4, table.shape[1])
    pad_rows(b, 1, model.scratch_page, model.page_size)
    assert b.seq_lens[1:].tolist() == [1, 1, 1] and (b.block_tables[1:] == model.scratch_page).all()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="capture=True needs the model on a CUDA device"):
            StepRunner(model, "FULL", max_pages=4, capture=True)


# --- GPU: CUDA graphs of the 24-layer step ---------------------------------------------------

GPU_LENS = {1: [3000], 3: [1024, 4000, 17], 8: [1024 + 300 * i for i in range(8)],
            24: [64 * (i + 1) for i in range(24)]}
GPU_STEPS = 4
TIE = 1e-2  # a token may differ from eager only where eager's top-2 logits are this close


SPEED = [(1, 1024), (1, 4096), (8, 1024), (8, 4096)]


def _device_ops_per_call(fn, *args):
    """Kernels, copies and memsets one call puts on the GPU (torch.profiler), or why unknown."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(*args)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as exc:  # no CUPTI here: the count is context only
        return f"n/a: {type(exc).__name__}: {exc}"[:200]


@pytest.fixture(scope="module")
def qwen_sized():
    pages = max([pages_needed(lens, GPU_STEPS, 16) for lens in GPU_LENS.values()]
                + [pages_needed([n] * b, 1, 16) for b, n in SPEED])
    return DecodeStepModel(QWEN25_05B, num_pages=pages + 1, page_size=16, seed=3)


def _tokens_agree(eager_logits, eager_tokens, tokens) -> None:
    top2 = eager_logits.topk(2, dim=-1).values
    tie = (top2[..., 0] - top2[..., 1]) < TIE * top2[..., 0].abs().clamp(min=1)
    differ = tokens != eager_tokens
    assert not (differ & ~tie).any(), f"tokens differ from eager away from ties: {differ.sum()}"


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["batched", "persistent"])
@pytest.mark.parametrize("batch", list(GPU_LENS))
def test_graph_modes_match_eager(batch, attention, qwen_sized, kvperf):
    """Every mode, captured, fed eager's tokens, gives eager's next tokens at every one of
    GPU_STEPS steps (a token may differ only at a near-tie of eager's logits) and logits
    within GPU_MODE_RTOL; FULL and PIECEWISE run the same kernels at the same bucket, so their
    logits are equal bit for bit. Whether a mode equals eager bit for bit (expected where
    the batch fills its bucket: the same kernels at the same shapes) is recorded."""
    model = qwen_sized
    model.attention = attention
    tokens, positions, table = step_workload(model, GPU_LENS[batch], GPU_STEPS, seed=batch)
    snapshot = model.cache.clone()
    runs = {}
    for mode in ("EAGER", "FULL", "PIECEWISE", "FULL_AND_PIECEWISE"):
        model.set_cache(snapshot)
        # FULL_AND_PIECEWISE with full graphs up to 8: batch 24 runs its piecewise side
        full = (1, 2, 4, 8) if mode == "FULL_AND_PIECEWISE" else (1, 2, 4, 8, 16, 32)
        runner = StepRunner(model, mode, max_pages=table.shape[1], full_buckets=full)
        forced = runs["EAGER"][1] if mode != "EAGER" else None  # eager's tokens as inputs
        runs[mode] = greedy_steps(runner.run, tokens, positions, table, GPU_STEPS, forced)
        assert torch.isfinite(runs[mode][0]).all(), f"{mode}: NaN/Inf logits"
        if mode != "EAGER":
            assert runner.graph_count > 0
    eager_logits, eager_tokens = runs["EAGER"]
    assert torch.equal(runs["FULL"][0], runs["PIECEWISE"][0])
    for mode, (logits, toks) in runs.items():
        _tokens_agree(eager_logits, eager_tokens, toks)
        err = _rel_l2(logits, eager_logits)
        assert err < GPU_MODE_RTOL, f"{mode} vs eager: rel L2 {err:.3g}"
        kvperf.info(f"{mode.lower()}_bitwise_eager", bool(torch.equal(logits, eager_logits)))
        kvperf.accuracy(f"{mode.lower()}_vs_eager_rel_l2", err, better="lower", rtol=1.0,
                        atol=1e-3)
    del snapshot


@pytest.mark.gpu
@pytest.mark.parametrize("batch, kv_len", SPEED, ids=[f"batch{b}-kv{n}" for b, n in SPEED])
def test_step_speed_by_mode(batch, kv_len, qwen_sized, kv_bench, kvperf):
    """One 24-layer decode step per mode (goal: FULL <= 0.5x eager at batch 1-8, kv 1-4K);
    the launch overhead removed is eager - FULL. Each timed mode's logits are checked
    against eager's first."""
    model = qwen_sized
    model.attention = "batched"
    tokens, positions, table = step_workload(model, [kv_len] * batch, 1, seed=kv_len)
    snapshot = model.cache.clone()
    median, first, kernels = {}, None, None
    for mode in ("EAGER", "FULL", "PIECEWISE"):
        model.set_cache(snapshot)
        runner = StepRunner(model, mode, max_pages=table.shape[1])
        logits = runner.run(tokens, positions, table)[0].clone()
        first = logits if first is None else first
        assert _rel_l2(logits, first) < GPU_MODE_RTOL, f"{mode}: logits differ from eager"
        res = kv_bench(runner.run, tokens, positions, table, label=mode.lower())
        median[mode] = res.median_us
        if mode == "EAGER":
            kernels = _device_ops_per_call(runner.run, tokens, positions, table)
            kvperf.info("device_ops_per_eager_step", kernels)
    if median["EAGER"] and median["FULL"]:
        kvperf.info("full_over_eager", round(median["FULL"] / median["EAGER"], 3))
        kvperf.info("piecewise_over_eager", round(median["PIECEWISE"] / median["EAGER"], 3))
        kvperf.info("launch_overhead_removed_us", round(median["EAGER"] - median["FULL"], 1))
        if isinstance(kernels, int) and kernels:
            kvperf.info("removed_us_per_device_op",
                        round((median["EAGER"] - median["FULL"]) / kernels, 3))
        kvperf.info("goal", "FULL <= 0.5x eager (batch 1-8, kv 1K-4K)")
    del snapshot
