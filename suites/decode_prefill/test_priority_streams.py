"""Decode steps (the 24-layer step, FULL graph replay, batch 8 x 2K) on a high-priority stream
with prefill chunks (8K causal attention, Hq 32, Hkv 8, D 128) on two low-priority streams, at
most 2 in flight; against decode alone and the same work at equal priority.

Recorded: decode step latency p50 / p99 per run, prefill chunks per second, the ratios to the
isolated p99 (goal, H200: high priority <= 1.3x isolated, equal-priority figure beside it),
and a timeline picture (SVG: KVPERF_ARTIFACT_DIR, else the test's tmp_path). Correctness: the
decode step's logits under concurrency equal its isolated logits bit for bit (the same graph
on the same inputs), the prefill output matches the float64 reference on sampled rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvperf_kernels.attention.prefill import prefill_attention, prefill_attention_ref, tma_ready
from kvperf_kernels.models.decode_step import QWEN25_05B, DecodeStepModel
from kvperf_kernels.models.step_graphs import StepRunner
from kvperf_kernels.testing.decode_step import pages_needed, step_workload
from kvperf_kernels.testing.priority_streams import StreamRun, timeline_svg

STEPS = 200


def test_timeline_svg_draws_every_bar_in_the_window():
    runs = {"a": StreamRun([10.0, 30.0, 20.0], 1, 0.002,
                           [("decode", 0.0, 0.01), ("decode", 0.02, 0.05), ("decode", 0.06, 0.08),
                            ("prefill0", 0.0, 2.0)]),
            "b": StreamRun([5.0], 0, 0.0, [("decode", 0.0, 0.005), ("decode", 9.0, 9.5)])}
    svg = timeline_svg(runs, max_ms=1.0)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<rect") == 5  # the bar starting at 9 ms lies beyond the 1 ms window
    assert runs["a"].percentile(0.5) == 20.0
    assert runs["a"].prefill_chunks_per_s == pytest.approx(500.0)
    assert runs["b"].prefill_chunks_per_s == 0.0


@pytest.mark.gpu
def test_decode_latency_under_prefill(kvperf, tmp_path):
    from kvperf_kernels.testing.priority_streams import run_streams

    least, greatest = torch.cuda.Stream.priority_range()
    if least == greatest:
        kvperf.skip(f"needs CUDA stream priorities; found the range [{greatest}, {least}]")
    lens = [2048] * 8
    model = DecodeStepModel(QWEN25_05B, num_pages=pages_needed(lens, 1, 16) + 1, seed=5)
    tokens, positions, table = step_workload(model, lens, 1, seed=6)
    runner = StepRunner(model, "FULL", max_pages=table.shape[1])

    def decode():
        return runner.run(tokens, positions, table)

    isolated_logits = decode()[0].clone()  # captures the graph (same slot rewritten each step)

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 8192, h, 128, generator=gen).to("cuda", torch.bfloat16)
               for h in (32, 8, 8))
    out = torch.empty_like(q)
    use_tma = tma_ready()[0]

    def prefill():
        prefill_attention(q, k, v, use_tma=use_tma, out=out)

    prefill()
    rows = torch.linspace(0, 8191, 32, device="cuda").long()
    ref = prefill_attention_ref(q, k, v, rows=rows)
    err = (out[:, rows].double() - ref).abs()
    assert (err <= 1e-2 + 1e-2 * ref.abs()).all(), f"prefill chunk wrong: max err {err.max()}"

    runs = {
        "isolated": run_streams(decode, None, steps=STEPS, decode_priority=greatest),
        "high_priority": run_streams(decode, prefill, steps=STEPS, decode_priority=greatest,
                                     prefill_priority=least),
        "equal_priority": run_streams(decode, prefill, steps=STEPS, decode_priority=least,
                                      prefill_priority=least),
    }
    assert torch.equal(decode()[0], isolated_logits), "decode logits changed under concurrency"
    for name, run in runs.items():
        assert len(run.decode_us) == STEPS and all(t > 0 for t in run.decode_us)
        kvperf.speed(f"decode_p50_us_{name}", run.percentile(0.5), better="lower", rtol=0.3)
        kvperf.speed(f"decode_p99_us_{name}", run.percentile(0.99), better="lower", rtol=0.5)
        if name != "isolated":
            assert run.prefill_chunks > 0
            kvperf.speed(f"prefill_chunks_per_s_{name}", run.prefill_chunks_per_s,
                         better="higher", unit="chunks/s", rtol=0.3)
    iso = runs["isolated"].percentile(0.99)
    kvperf.info("p99_high_priority_over_isolated",
                round(runs["high_priority"].percentile(0.99) / iso, 3))
    kvperf.info("p99_equal_priority_over_isolated",
                round(runs["equal_priority"].percentile(0.99) / iso, 3))
    kvperf.info("goal", "decode p99 under prefill <= 1.3x isolated at high priority")
    kvperf.info("prefill_path", "tma" if use_tma else "plain")
    kvperf.info("priority_range", f"[{greatest}, {least}]")
    out_dir = Path(os.environ.get("KVPERF_ARTIFACT_DIR") or tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    svg = out_dir / "priority_streams_timeline.svg"
    # about 40 contended decode steps per panel
    svg.write_text(timeline_svg(runs, max_ms=40 * runs["high_priority"].percentile(0.5) / 1e3))
    kvperf.info("timeline_svg", str(svg))
