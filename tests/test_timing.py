"""The timing engine (pytest_kvperf.timing): host clock on the CPU, events/graphs on a GPU.

CPU tests use a busy loop / sleep of known length, or a fake clock that fn advances by
a chosen amount, so that the stopping rule and grouping can be checked exactly.
"""

from __future__ import annotations

import math
import random
import statistics
import time

import pytest

from pytest_kvperf import timing
from pytest_kvperf.stats import median_ci, median_ci_rank, relative_ci_halfwidth
from pytest_kvperf.timing import measure, summarize


def busy_us(us: float) -> None:
    end = time.perf_counter_ns() + int(us * 1e3)
    while time.perf_counter_ns() < end:
        pass


class FakeClock:
    """A clock that only moves when fn says it took `step` ns."""

    def __init__(self):
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> None:
        self.now += ns


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(timing, "_now_ns", c)
    return c


# ----------------------------------------------------------------- host clock, real time


def test_busy_loop_of_1ms_measures_1ms():
    t = measure(busy_us, args_sets=[(1000.0,)], device="cpu", max_time_s=1.0)
    assert t.method == "host-clock" and t.inner_iterations == 1 and t.peak_mem_bytes is None
    assert t.rounds == len(t.samples_us) >= 10
    # Each call spins until 1000 us have passed, so no sample can be shorter; the median
    # stays close even on a shared, loaded machine.
    assert min(t.samples_us) >= 1000.0
    assert 1000.0 <= t.median_us <= 1500.0
    assert t.q1_us <= t.median_us <= t.q3_us and t.iqr_us == pytest.approx(t.q3_us - t.q1_us)
    assert all(math.isfinite(s) for s in t.samples_us)


def test_sleep_of_2ms_measures_2ms():
    t = measure(time.sleep, args_sets=[(0.002,)], device="cpu", max_time_s=0.5)
    # Sleep overshoots, never undershoots; on a loaded machine the wake-up waits for a
    # scheduler time slice (seen: 6 ms), so the upper bound only catches unit errors.
    assert 2000.0 <= t.median_us <= 25_000.0


def test_default_device_is_the_host_clock_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the default device is the GPU")
    t = measure(busy_us, args_sets=[(200.0,)], max_time_s=0.3)
    assert t.method == "host-clock" and 200.0 <= t.median_us <= 500.0


def test_stopping_rule_ends_at_max_time_when_noise_never_settles():
    rng = random.Random(0)

    def noisy():  # durations spread over 50..400 us: the CI target below is unreachable
        busy_us(rng.uniform(50.0, 400.0))

    t0 = time.perf_counter()
    t = measure(noisy, device="cpu", warmup=0.02, max_time_s=0.3, rel_ci_target=1e-9)
    wall = time.perf_counter() - t0
    assert t.stop_reason == "time" and t.rel_ci > 1e-9
    assert t.rounds >= 10
    # warm-up + sampling + at most one call past the deadline, plus scheduling slack.
    assert wall <= 0.02 + 0.3 + 0.7


def test_flush_runs_before_every_timed_round_and_outside_the_timer(monkeypatch):
    writes = []
    real_memset = timing.ctypes.memset

    def counting_memset(addr, value, size):
        writes.append(size)
        time.sleep(0.002)  # a slow flush: must not show up in the samples
        return real_memset(addr, value, size)

    monkeypatch.setattr(timing.ctypes, "memset", counting_memset)
    t = measure(busy_us, args_sets=[(100.0,)], device="cpu", flush_l2=True, max_time_s=0.3)
    assert len(writes) == t.rounds and set(writes) == {64 << 20}
    assert 100.0 <= t.median_us < 1000.0


# ----------------------------------------------------------------- fake clock: exact checks


def test_identical_samples_stop_at_min_rounds(clock):
    t = measure(lambda: clock.advance(100_000), device="cpu", warmup=0.01, min_rounds=12)
    assert t.samples_us == [100.0] * 12
    assert t.stop_reason == "ci" and t.rel_ci == 0.0
    assert (t.median_us, t.q1_us, t.q3_us, t.stdev_us) == (100.0, 100.0, 100.0, 0.0)


def test_unsettled_noise_stops_at_max_time_of_sampling(clock):
    durations = iter([100_000, 300_000] * 100_000)  # median CI spans 100..300 us forever

    def fn():
        clock.advance(next(durations))

    t = measure(fn, device="cpu", warmup=0.0, max_time_s=0.05, rel_ci_target=0.01)
    assert t.stop_reason == "time"
    sampled_ns = sum(t.samples_us) * 1e3
    # Sampling stops at the first check past the deadline: at most one round beyond it.
    assert 0.05e9 <= sampled_ns <= 0.05e9 + 300_000
    assert set(t.samples_us) == {100.0, 300.0}


def test_min_rounds_are_taken_even_past_the_deadline(clock):
    t = measure(lambda: clock.advance(1_000_000), device="cpu", warmup=0.0,
                min_rounds=7, max_time_s=1e-6, rel_ci_target=0.0)
    assert t.rounds == 7  # identical samples: CI 0 <= target 0 right at min_rounds


def test_max_rounds_bounds_the_sample_count(clock):
    durations = iter([100_000, 300_000] * 100_000)
    t = measure(lambda: clock.advance(next(durations)), device="cpu", warmup=0.0,
                max_time_s=1e3, rel_ci_target=0.0, max_rounds=50)
    assert t.rounds == 50 and t.stop_reason == "max_rounds"


def test_calls_shorter_than_10us_are_timed_in_groups(clock):
    t = measure(lambda: clock.advance(1_000), device="cpu", warmup=0.001)
    assert t.inner_iterations == 200  # ~200 us per group at 1 us per call
    assert t.samples_us == [1.0] * t.rounds  # per-call time, not per-group


def test_warmup_calls_each_set_then_runs_for_the_warmup_time(clock):
    seen = []

    def fn(x):
        seen.append(x)
        clock.advance(100_000)

    t = measure(fn, args_sets=[(0,), (1,), (2,)], device="cpu", warmup=0.001, min_rounds=10)
    # 3 calls (one per set) + 10 warm-up calls (1 ms of 100 us calls) + 10 timed rounds.
    assert len(seen) == 3 + 10 + t.rounds and t.rounds == 10


# ----------------------------------------------------------------- rotation


def test_rotation_uses_every_arg_set_round_robin():
    seen = []
    sets = [("a",), ("b",), ("c",), ("d",)]
    t = measure(lambda s: (seen.append(s), busy_us(50.0)), args_sets=sets, device="cpu",
                max_time_s=0.2)
    assert seen[:4] == ["a", "b", "c", "d"]  # warm-up calls each set first
    assert seen == [sets[i % 4][0] for i in range(len(seen))]
    assert len(seen) >= 4 + t.rounds * t.inner_iterations


def test_rotation_passes_all_positional_args():
    got = []
    measure(lambda a, b: got.append(a + b), args_sets=[(1, 2), [10, 20]], device="cpu",
            warmup=0.0, max_time_s=0.05)
    assert set(got) == {3, 30}


# ----------------------------------------------------------------- statistics helpers


def test_summarize_matches_numpy_linear_quartiles():
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    xs = [rng.lognormvariate(0.0, 0.5) for _ in range(37)]
    med, q1, q3, sd = summarize(xs)
    assert (q1, med, q3) == pytest.approx(tuple(np.percentile(xs, [25, 50, 75])), rel=1e-12)
    assert sd == pytest.approx(float(np.std(xs, ddof=1)), rel=1e-12)


def test_median_ci_uses_the_exact_order_statistic_ranks():
    xs = list(range(1, 11))  # n=10: P(Bin<=1)=0.0107 <= 0.025 < P(Bin<=2) -> x_(2), x_(9)
    assert median_ci(xs) == (2, 9)
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) == (-math.inf, math.inf)  # n too small
    assert relative_ci_halfwidth([1.0, 2.0, 3.0]) == math.inf


def test_median_ci_rank_is_the_exact_binomial_rank():
    """r is the largest rank with P(Binomial(n, 1/2) <= r-1) <= 2.5 %, summed exactly."""
    from fractions import Fraction

    for n in (*range(1, 130), 400, 999):
        r, cdf = 0, Fraction(0)
        while r < n and cdf + Fraction(math.comb(n, r), 2**n) <= Fraction(1, 40):
            cdf += Fraction(math.comb(n, r), 2**n)
            r += 1
        assert median_ci_rank(n, 0.95) == r, n


@pytest.mark.parametrize("n", [12, 25, 200])
def test_median_ci_covers_the_true_median_at_least_95_percent(n):
    rng = random.Random(n)
    trials = 400
    hits = 0
    for _ in range(trials):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        lo, hi = median_ci(xs)
        hits += lo <= math.log(2.0) <= hi  # median of Exp(1)
    # Nominal >= 95 %; 93 % leaves room for 400-trial sampling noise (sd ~1.1 %).
    assert hits / trials >= 0.93


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"args_sets": []}, ValueError, "args_sets is empty"),
        ({"args_sets": "ab"}, TypeError, "args_sets must be a sequence"),
        ({"args_sets": [1, 2]}, TypeError, "args_sets[0] must be a tuple"),
        ({"use_cuda_graph": "yes"}, ValueError, "use_cuda_graph"),
        ({"use_cuda_graph": True, "flush_l2": True}, ValueError, "flush_l2 cannot"),
        ({"min_rounds": 0}, ValueError, "min_rounds"),
        ({"max_rounds": 5}, ValueError, "max_rounds"),
        ({"max_time_s": 0}, ValueError, "max_time_s"),
        ({"max_time_s": math.inf}, ValueError, "max_time_s"),
        ({"rel_ci_target": -0.1}, ValueError, "rel_ci_target"),
        ({"warmup": -1}, ValueError, "warmup"),
        ({"device": "tpu"}, ValueError, "device must be"),
    ],
)
def test_bad_arguments_raise_a_clear_error(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        measure(lambda *a: None, **kwargs)


def test_non_callable_fn_is_rejected():
    with pytest.raises(TypeError, match="fn must be callable"):
        measure(42)


def test_cuda_device_without_a_gpu_is_rejected():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        measure(lambda: None, device="cuda")


# ----------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_tiny_kernel_is_timed_by_cuda_graph_replay():
    import torch

    x = torch.randn(1024, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    before = x.clone()
    t = measure(x.add_, args_sets=[(1.0,)])
    assert t.method == "cuda-graph" and t.inner_iterations > 1
    assert 0.0 < t.median_us < timing.GRAPH_THRESHOLD_US
    assert all(math.isfinite(s) and s > 0 for s in t.samples_us)
    # Each replay really ran the unrolled calls: x grew by at least one per timed call.
    assert (x - before).min().item() >= t.rounds * t.inner_iterations


@pytest.mark.gpu
def test_long_copy_is_timed_with_events_and_matches_the_wall_clock():
    import torch

    src = torch.randn(64 << 20, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    dst = torch.empty_like(src)
    t = measure(dst.copy_, args_sets=[(src,)], max_time_s=1.0)
    assert t.method == "cuda-events" and t.inner_iterations == 1
    # Independent reference: wall clock over many back-to-back copies (launch cost hidden).
    torch.cuda.synchronize()
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        dst.copy_(src)
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / n * 1e6
    assert t.median_us == pytest.approx(wall_us, rel=0.10)
    assert torch.equal(dst, src)


@pytest.mark.gpu
def test_flush_and_peak_memory_on_cuda():
    import torch

    src = torch.randn(1 << 20, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    t = measure(lambda: src * 2.0, flush_l2=True, max_time_s=0.5)
    assert t.method == "cuda-events"  # a flush is never inside a graph
    assert t.peak_mem_bytes is not None and t.peak_mem_bytes >= src.numel() * 4


@pytest.mark.gpu
def test_capture_unsafe_fn_falls_back_to_events_or_raises_when_forced():
    import torch

    x = torch.ones(16, device="cuda")

    def capture_unsafe():
        # A few-us call, so "auto" tries a graph; it syncs only while being captured,
        # which CUDA refuses. (A call that always syncs, like .item(), times >= 20 us
        # with its host round trip, and "auto" would not even try to capture it.)
        y = x * 2.0
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return y

    t = measure(capture_unsafe, max_time_s=0.2)
    assert t.method == "cuda-events" and any("capture failed" in n for n in t.notes), t.notes
    assert statistics.median(t.samples_us) == t.median_us > 0
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        measure(capture_unsafe, use_cuda_graph=True, max_time_s=0.2)


@pytest.mark.gpu
def test_rotation_on_cuda_events_calls_every_set():
    import torch

    seen = []
    bufs = [torch.zeros(1 << 20, device="cuda") for _ in range(3)]

    def fn(i):
        seen.append(i)
        bufs[i].add_(1.0)

    t = measure(fn, args_sets=[(0,), (1,), (2,)], use_cuda_graph=False, max_time_s=0.2)
    assert set(seen) == {0, 1, 2} and seen == [i % 3 for i in range(len(seen))]
    assert sum(b[0].item() for b in bufs) == len(seen) >= t.rounds


def test_works_without_torch(monkeypatch):
    """Torch is optional: with it unimportable, the default device is the host clock."""
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch -> ImportError
    t = measure(busy_us, args_sets=[(100.0,)], max_time_s=0.1)
    assert t.method == "host-clock" and 100.0 <= t.median_us <= 400.0
    with pytest.raises(ValueError, match="needs torch"):
        measure(busy_us, args_sets=[(1.0,)], device="cuda")
