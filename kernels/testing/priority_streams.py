"""Decode steps on a high-priority stream while prefill chunks run on low-priority streams (the
lab's tma_prefill_decode scheduling experiment), timed with CUDA events; and its timeline as
an SVG picture.

``run_streams`` drives a serving-like loop: before each decode step every prefill stream that
has no chunk in flight gets its next one (at most one per stream, so ``prefill_streams`` in
flight), then the decode step is issued on its stream and waited for (a decode loop needs its
tokens before the next step). Stream priorities order which ready blocks the SMs take next;
they do not preempt running blocks, so a decode step still waits for SMs held by prefill
blocks to drain (``torch.cuda.Stream.priority_range()``: lower numbers are higher priority).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class StreamRun:
    decode_us: list[float]  # per decode step, its stream's start -> end event
    prefill_chunks: int
    prefill_window_s: float  # first prefill start -> last prefill end (0 without prefill)
    # (lane, start_ms, end_ms) from the run's base event: lane "decode" or "prefill<i>"
    timeline: list[tuple[str, float, float]] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(torch.tensor(self.decode_us).quantile(q))

    @property
    def prefill_chunks_per_s(self) -> float:
        return self.prefill_chunks / self.prefill_window_s if self.prefill_window_s else 0.0


def run_streams(decode: Callable[[], object], prefill: Callable[[], object] | None, *,
                steps: int, decode_priority: int, prefill_priority: int = 0,
                prefill_streams: int = 2) -> StreamRun:
    """``steps`` decode steps (``decode()`` on a stream of ``decode_priority``), with
    ``prefill()`` chunks kept in flight on ``prefill_streams`` streams of ``prefill_priority``
    (None: decode alone)."""
    least, greatest = torch.cuda.Stream.priority_range()
    for name, p in (("decode_priority", decode_priority), ("prefill_priority", prefill_priority)):
        if not greatest <= p <= least:
            raise ValueError(f"{name} {p} outside the device's range [{greatest}, {least}]")
    dstream = torch.cuda.Stream(priority=decode_priority)
    pstreams = [torch.cuda.Stream(priority=prefill_priority) for _ in range(prefill_streams)]

    def event():
        return torch.cuda.Event(enable_timing=True)

    torch.cuda.synchronize()
    base = event()
    base.record()
    inflight: list[tuple | None] = [None] * prefill_streams
    prefill_events, decode_events = [], []
    for _ in range(steps):
        if prefill is not None:
            for i, s in enumerate(pstreams):
                if inflight[i] is None or inflight[i][1].query():
                    start, end = event(), event()
                    with torch.cuda.stream(s):
                        start.record()
                        prefill()
                        end.record()
                    inflight[i] = (start, end)
                    prefill_events.append((f"prefill{i}", start, end))
        start, end = event(), event()
        with torch.cuda.stream(dstream):
            start.record()
            decode()
            end.record()
        end.synchronize()
        decode_events.append(("decode", start, end))
    torch.cuda.synchronize()
    timeline = [(lane, base.elapsed_time(s), base.elapsed_time(e))
                for lane, s, e in decode_events + prefill_events]
    window = 0.0
    if prefill_events:
        window = (max(base.elapsed_time(e) for _, _, e in prefill_events)
                  - min(base.elapsed_time(s) for _, s, _ in prefill_events)) / 1e3
    return StreamRun([s.elapsed_time(e) * 1e3 for _, s, e in decode_events],
                     len(prefill_events), window, timeline)


def timeline_svg(runs: dict[str, StreamRun], *, width: int = 1200, max_ms: float | None = None
                 ) -> str:
    """An SVG with one panel per run: a lane per stream, a bar per decode step / prefill chunk
    (the first ``max_ms`` of each run)."""
    lanes_per_run = {name: sorted({lane for lane, _, _ in r.timeline}) for name, r in runs.items()}
    span = max_ms or max((e for r in runs.values() for _, _, e in r.timeline), default=1.0)
    row_h, label_w = 18, 150
    height = sum(20 + row_h * len(lanes) for lanes in lanes_per_run.values()) + 30
    scale = (width - label_w - 10) / span
    colors = {"decode": "#d62728"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="monospace" font-size="11">']
    y = 10
    for name, run in runs.items():
        parts.append(f'<text x="4" y="{y + 12}" font-weight="bold">{name}</text>')
        y += 20
        for lane in lanes_per_run[name]:
            parts.append(f'<text x="14" y="{y + 12}">{lane}</text>')
            for bar_lane, s, e in run.timeline:
                if bar_lane != lane or s > span:
                    continue
                w = max((min(e, span) - s) * scale, 0.5)
                parts.append(f'<rect x="{label_w + s * scale:.1f}" y="{y + 2}" width="{w:.1f}" '
                             f'height="{row_h - 4}" fill="{colors.get(lane, "#1f77b4")}"/>')
            y += row_h
    parts.append(f'<text x="{label_w}" y="{height - 8}">0 .. {span:.2f} ms</text></svg>')
    return "\n".join(parts)
