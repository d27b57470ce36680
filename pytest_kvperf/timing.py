"""Device-accurate timing of a callable: the measurement engine behind ``kv_bench``.

``measure(fn)`` warms ``fn`` up (JIT compile, autotune and module load stay out of the
numbers), then collects per-call samples until the median is known to ``rel_ci_target``
(distribution-free confidence interval of the median) or ``max_time_s`` has passed.

* CUDA, call >= ~20 us: one start/end event pair per call, a whole batch enqueued
  before one synchronize. A GPU spin kernel is queued in front of each batch so the
  host runs ahead of the GPU: otherwise, when Python launch overhead exceeds the
  kernel time, the start event fires on an idle GPU and host launch latency is timed.
* CUDA, call < ~20 us (launch-overhead dominated): N unrolled calls captured in one
  CUDA graph on a side stream; each replay is timed with an event pair and divided by N.
* CPU (no CUDA, or ``device="cpu"``): the same loop timed with ``time.perf_counter_ns``;
  calls shorter than ~10 us are timed in groups (``inner_iterations``) to amortise the
  clock read.

With a CUDA GPU the default device is the GPU and only device time counts (host-side
Python in fn is hidden by the run-ahead); pass ``device="cpu"`` to time host code.
Clock throttling is not filtered out of the samples (unlike nvbench): kv_bench reads the
GPU's throttle state around the timing (gpu_facts) and calls a throttled one unreliable.
Torch is imported lazily so the plugin (and this module) work without it.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .stats import quartiles, relative_ci_halfwidth

# Below this per-call device time, event pairs mostly time launch overhead and event
# resolution (~0.5 us), so graph replay is used instead (use_cuda_graph="auto").
GRAPH_THRESHOLD_US = 20.0
_GRAPH_REPLAY_TARGET_US = 1000.0  # one replay long enough to hide its own launch cost
_GRAPH_MAX_UNROLL = 1000
_CPU_GROUP_BELOW_NS = 10_000  # CPU calls shorter than this are timed in groups ...
_CPU_GROUP_TARGET_NS = 200_000  # ... of about this total length
_CPU_FLUSH_BYTES = 64 << 20  # larger than the last-level cache of common server CPUs
_BATCH_DEVICE_US = 50_000.0  # device time per CUDA batch between CI checks
_MAX_SPIN_US = 50_000.0
_SPIN_MARGIN = 2.0  # spin twice the expected enqueue deficit: clocks and host jitter vary
_CI_CONFIDENCE = 0.95

# The clock every host-side duration and deadline is read from (tests substitute it).
_now_ns = time.perf_counter_ns

METHODS = ("cuda-events", "cuda-graph", "host-clock")


@dataclass(frozen=True)
class Timing:
    """Per-call samples (microseconds) and their summary.

    ``rel_ci`` is the relative half-width of the 95 % confidence interval of the median
    reached when sampling stopped (inf when there were too few rounds to bound it);
    ``stop_reason`` is "ci" (target reached), "time" (max_time_s) or "max_rounds".
    """

    samples_us: list[float]
    median_us: float
    q1_us: float
    q3_us: float
    iqr_us: float
    stdev_us: float
    rounds: int
    method: str
    inner_iterations: int
    peak_mem_bytes: int | None
    rel_ci: float = math.inf
    stop_reason: str = ""
    notes: tuple[str, ...] = ()

    @property
    def min_us(self) -> float:
        return min(self.samples_us)

    @property
    def max_us(self) -> float:
        return max(self.samples_us)

    @property
    def mean_us(self) -> float:
        return statistics.fmean(self.samples_us)

    def as_baseline(self, include_samples: bool = True) -> dict[str, Any]:
        """The record ``verdict.speed_verdict`` takes as its baseline."""
        rec: dict[str, Any] = {
            "median": self.median_us,
            "q1": self.q1_us,
            "q3": self.q3_us,
            "n": self.rounds,
        }
        if include_samples:
            rec["samples"] = list(self.samples_us)
        return rec


def summarize(samples_us: Sequence[float]) -> tuple[float, float, float, float]:
    """(median, q1, q3, stdev); quartiles interpolate linearly like numpy's default."""
    q1, med, q3 = quartiles(samples_us)
    return med, q1, q3, statistics.stdev(samples_us) if len(samples_us) > 1 else 0.0


def measure(
    fn: Callable[..., Any],
    *,
    args_sets: Sequence[Sequence[Any]] | None = None,
    warmup: float = 0.05,
    flush_l2: bool = False,
    use_cuda_graph: bool | str = "auto",
    min_rounds: int = 10,
    max_time_s: float = 1.0,
    rel_ci_target: float = 0.005,
    device: Any = None,
    max_rounds: int = 100_000,
) -> Timing:
    """Time ``fn(*args)`` per call; see the module docstring for the methods.

    args_sets: input tuples to rotate among (call i uses ``args_sets[i % len]``) so that
        repeated calls do not find their inputs in cache; every set is called once
        during warm-up (each shape gets its JIT compile there). None: ``fn()``.
    warmup: seconds of warm-up calls after one call per arg set.
    flush_l2: on CUDA, zero a buffer of 2x the L2 size before each timed call, outside
        the event pair (forces CUDA events, not graphs); on the CPU, write 64 MiB.
    use_cuda_graph: "auto" (graph when a call takes < 20 us and flush_l2 is off), True
        (always; capture failure raises) or False (never).
    min_rounds / max_time_s / rel_ci_target: stop after at least min_rounds samples,
        once the 95 % CI of the median is within +-rel_ci_target of it or max_time_s of
        sampling has passed (the first min_rounds are always taken).
    device: None (the current CUDA device if torch sees one, else the CPU), "cpu",
        "cuda", "cuda:N" or a torch.device.

    Returns per-call samples in microseconds (graph replays and CPU groups divided by
    their call count). peak_mem_bytes is the extra device memory one call needs
    (torch.cuda.max_memory_allocated over one call; this resets torch's peak-memory
    statistics), None on the CPU.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    calls = _normalise_args_sets(args_sets)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not warmup >= 0:
        raise ValueError(f"warmup must be a number of seconds >= 0, got {warmup!r}")
    if use_cuda_graph not in ("auto", True, False):
        raise ValueError(f"use_cuda_graph must be 'auto', True or False, got {use_cuda_graph!r}")
    if use_cuda_graph is True and flush_l2:
        raise ValueError("flush_l2 cannot be combined with use_cuda_graph=True: "
                         "inside a graph the flush would be timed with the call")
    if isinstance(min_rounds, bool) or not isinstance(min_rounds, int) or min_rounds < 1:
        raise ValueError(f"min_rounds must be an int >= 1, got {min_rounds!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < min_rounds:
        raise ValueError(f"max_rounds must be an int >= min_rounds, got {max_rounds!r}")
    if not (isinstance(max_time_s, (int, float)) and max_time_s > 0 and math.isfinite(max_time_s)):
        raise ValueError(f"max_time_s must be a finite number > 0, got {max_time_s!r}")
    if not (isinstance(rel_ci_target, (int, float)) and rel_ci_target >= 0):
        raise ValueError(f"rel_ci_target must be a number >= 0, got {rel_ci_target!r}")

    torch, cuda_index = _resolve_device(device)
    if cuda_index is None:
        runner: _HostRunner | _CudaRunner = _HostRunner(fn, calls, flush_l2)
    else:
        runner = _CudaRunner(torch, cuda_index, fn, calls, flush_l2, use_cuda_graph)
    with runner.context():
        runner.warm_up(float(warmup))
        samples, rel_ci, stop_reason = _sample(
            runner, min_rounds, max_rounds, max_time_s, rel_ci_target
        )
        runner.close()
    med, q1, q3, sd = summarize(samples)
    return Timing(
        samples_us=samples, median_us=med, q1_us=q1, q3_us=q3, iqr_us=q3 - q1, stdev_us=sd,
        rounds=len(samples), method=runner.method, inner_iterations=runner.inner,
        peak_mem_bytes=runner.peak_mem_bytes, rel_ci=rel_ci, stop_reason=stop_reason,
        notes=tuple(runner.notes),
    )


def _normalise_args_sets(args_sets: Sequence[Sequence[Any]] | None) -> list[tuple]:
    if args_sets is None:
        return [()]
    if isinstance(args_sets, (str, bytes)) or not isinstance(args_sets, Sequence):
        raise TypeError("args_sets must be a sequence of argument tuples, "
                        f"got {type(args_sets).__name__}")
    if len(args_sets) == 0:
        raise ValueError("args_sets is empty: give at least one argument tuple (or None)")
    out = []
    for i, a in enumerate(args_sets):
        if not isinstance(a, (tuple, list)):
            raise TypeError(f"args_sets[{i}] must be a tuple of positional arguments, "
                            f"got {type(a).__name__}")
        out.append(tuple(a))
    return out


def _resolve_device(device: Any) -> tuple[Any, int | None]:
    """(torch module or None, CUDA device index or None for the host clock)."""
    if device is None or str(device).startswith("cuda"):
        try:
            import torch
        except ImportError:
            if device is None:
                return None, None
            raise ValueError(f"device {device!r} needs torch, which is not installed") from None
        if device is None:
            if not torch.cuda.is_available():
                return torch, None
            return torch, torch.cuda.current_device()
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not a device name: {exc}") from None
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s)")
        return torch, index
    if str(device) == "cpu":
        return None, None
    raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _sample(runner, min_rounds, max_rounds, max_time_s, rel_ci_target):
    """Collect batches of samples until the stopping rule holds."""
    samples: list[float] = []
    start = _now_ns()
    deadline = start + int(max_time_s * 1e9)
    rel_ci = math.inf
    while True:
        n = len(samples)
        if n < min_rounds:
            want = min_rounds - n
        else:
            # Grow geometrically so the O(n log n) CI check stays cheap, but never
            # plan past the deadline (overshoot is bounded by one round).
            left_ns = max(deadline - _now_ns(), 0)
            want = max(1, min(n // 4 + 1, int(left_ns / max(runner.round_ns, 1.0)) + 1))
        want = min(want, max_rounds - n)
        samples.extend(runner.run(want, deadline if n >= min_rounds else None))
        n = len(samples)
        if n < min_rounds:
            continue
        rel_ci = relative_ci_halfwidth(samples, _CI_CONFIDENCE)
        if rel_ci <= rel_ci_target:
            return samples, rel_ci, "ci"
        if n >= max_rounds:
            return samples, rel_ci, "max_rounds"
        if _now_ns() >= deadline:
            return samples, rel_ci, "time"


def _host_timed_calls(call, seconds: float) -> list[int]:
    """Call repeatedly for `seconds` (warm-up); each call's host duration in ns."""
    durations = []
    start = _now_ns()
    while _now_ns() - start < seconds * 1e9:
        t0 = _now_ns()
        call()
        durations.append(_now_ns() - t0)
    return durations


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _HostRunner:
    method = "host-clock"
    peak_mem_bytes = None

    def __init__(self, fn, calls, flush_l2):
        self.fn, self.calls = fn, calls
        self.inner = 1
        self.index = 0
        self.round_ns = 1.0
        self.notes: list[str] = []
        self._flush_buf = bytearray(_CPU_FLUSH_BYTES) if flush_l2 else None

    def context(self):
        return _NullContext()

    def _call(self):
        self.fn(*self.calls[self.index % len(self.calls)])
        self.index += 1

    def _flush(self):
        if self._flush_buf is not None:
            # Writes every line of a buffer larger than the LLC: evicts fn's data.
            addr = ctypes.addressof(ctypes.c_char.from_buffer(self._flush_buf))
            ctypes.memset(addr, self.index & 0xFF, len(self._flush_buf))

    def warm_up(self, warmup_s):
        durations = []
        for _ in self.calls:  # every input set once: JIT per shape, lazy init
            t0 = _now_ns()
            self._call()
            durations.append(_now_ns() - t0)
        first = durations[-1]
        durations = _host_timed_calls(self._call, warmup_s)
        per_call = statistics.median(durations) if durations else first
        if per_call < _CPU_GROUP_BELOW_NS:
            self.inner = min(10_000, math.ceil(_CPU_GROUP_TARGET_NS / max(per_call, 1)))
        self.round_ns = float(max(per_call, 1)) * self.inner

    def run(self, count, deadline):
        out = []
        for _ in range(count):
            self._flush()
            t0 = _now_ns()
            for _ in range(self.inner):
                self._call()
            t1 = _now_ns()
            out.append((t1 - t0) / self.inner / 1e3)
            if deadline is not None and t1 >= deadline:
                break
        return out

    def close(self):
        self._flush_buf = None


class _CudaRunner:
    def __init__(self, torch, index, fn, calls, flush_l2, use_cuda_graph):
        self.torch, self.device_index = torch, index
        self.fn, self.calls = fn, calls
        self.flush_l2, self.use_cuda_graph = flush_l2, use_cuda_graph
        self.method = "cuda-events"
        self.inner = 1
        self.index = 0
        self.notes: list[str] = []
        self.peak_mem_bytes: int | None = None
        self.round_ns = 1.0
        self._host_round_us = 10.0
        self._device_round_us = 0.0
        self._graph = None
        self._flush_buf = None
        self._cycles_per_us: float | None = None

    def context(self):
        return self.torch.cuda.device(self.device_index)

    def _call(self):
        self.fn(*self.calls[self.index % len(self.calls)])
        self.index += 1

    def _spin(self, us):
        # Keeps the GPU busy while the host enqueues the batch that follows.
        if self._cycles_per_us is not None and us > 0:
            self.torch.cuda._sleep(int(min(us, _MAX_SPIN_US) * self._cycles_per_us))

    def warm_up(self, warmup_s):
        cuda = self.torch.cuda
        cuda.synchronize()
        for _ in self.calls:  # every input set once: JIT, autotune, module load
            self._call()
        cuda.synchronize()
        # Peak extra device memory of one call (outputs + temporaries), measured on
        # its own so that warm-up autotuning and our flush buffer do not count.
        base = cuda.memory_allocated()
        cuda.reset_peak_memory_stats()
        self._call()
        cuda.synchronize()
        self.peak_mem_bytes = max(0, cuda.max_memory_allocated() - base)
        host = _host_timed_calls(self._call, warmup_s)
        cuda.synchronize()
        # Calibrated now, with clocks at their working level after the warm-up calls.
        self._cycles_per_us = _spin_cycles_per_us(self.torch)
        if host:
            self._host_round_us = statistics.median(host) / 1e3 + 10.0  # + events, flush
        if self.flush_l2:
            props = cuda.get_device_properties(self.device_index)
            l2 = getattr(props, "L2_cache_size", 0) or (128 << 20)
            self._flush_buf = self.torch.empty(2 * l2 // 4, dtype=self.torch.int32,
                                               device=f"cuda:{self.device_index}")
        # Pilot batch: per-call device time decides between events and a graph.
        pilot = self._event_batch(5)
        per_call_us = statistics.median(pilot)
        if self._cycles_per_us is None:
            self.notes.append("torch.cuda._sleep unavailable: host launch gaps may be timed")
        want_graph = self.use_cuda_graph is True or (
            self.use_cuda_graph == "auto" and not self.flush_l2
            and per_call_us < GRAPH_THRESHOLD_US)
        if want_graph:
            self._try_capture(per_call_us)
            if self._graph is not None:
                self._device_round_us = per_call_us * self.inner
        self.round_ns = per_call_us * self.inner * 1e3

    def _try_capture(self, per_call_us):
        torch = self.torch
        n = math.ceil(_GRAPH_REPLAY_TARGET_US / max(per_call_us, 0.1))
        n = max(1, min(_GRAPH_MAX_UNROLL, n))
        side = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):  # allocator/lazy init on the capture stream
                for _ in range(3):
                    self._call()
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                for _ in range(n):
                    self._call()
            graph.replay()  # first replay uploads the graph
            torch.cuda.synchronize()
        except Exception as exc:  # capture-unsafe fn (host sync, .item(), ...)
            # torch.cuda.graph leaves the side stream current when capture_end raises.
            torch.cuda.set_stream(main)
            torch.cuda.synchronize()
            if self.use_cuda_graph is True:
                raise RuntimeError(f"CUDA graph capture of fn failed: {exc}") from exc
            self.notes.append(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                              "timed with CUDA events instead")
            return
        self._graph, self.inner, self.method = graph, n, "cuda-graph"

    def _event_batch(self, count):
        torch = self.torch
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(count)]
        # The host must stay ahead for the whole batch: spin for the enqueue deficit.
        deficit_us = max(self._host_round_us - self._device_round_us, 0.0)
        self._spin(_SPIN_MARGIN * count * deficit_us + 2.0 * self._host_round_us + 50.0)
        t0 = _now_ns()
        for start, end in pairs:
            if self._flush_buf is not None:
                self._flush_buf.zero_()  # outside the event pair
            start.record()
            if self._graph is not None:
                self._graph.replay()
            else:
                self._call()
            end.record()
        self._host_round_us = (_now_ns() - t0) / 1e3 / count + 1.0
        torch.cuda.synchronize()  # the only host sync: after the whole batch
        out = [s.elapsed_time(e) * 1e3 / self.inner for s, e in pairs]
        self._device_round_us = statistics.median(out) * self.inner
        return out

    def run(self, count, deadline):
        # Cap the batch so its device time and its spin stay short; `deadline` is
        # honoured by the caller's batch sizing (no per-call host sync here).
        per_round_us = max(self.round_ns / 1e3, 1e-3)
        deficit_us = max(self._host_round_us - self._device_round_us, 1e-3)
        cap = min(_BATCH_DEVICE_US / per_round_us, _MAX_SPIN_US / (_SPIN_MARGIN * deficit_us))
        out: list[float] = []
        while len(out) < count:
            out.extend(self._event_batch(max(1, min(count - len(out), int(cap)))))
            if deadline is not None and _now_ns() >= deadline:
                break
        return out

    def close(self):
        self._graph = None
        self._flush_buf = None


def _spin_cycles_per_us(torch) -> float | None:
    """Clock cycles per microsecond of torch.cuda._sleep on the current GPU (None: no spin)."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return None
    cycles = 1_000_000
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    sleep(cycles // 10)  # load the kernel outside the calibration
    start.record()
    sleep(cycles)
    end.record()
    end.synchronize()
    us = start.elapsed_time(end) * 1e3
    return cycles / us if us > 0 else None
