"""What the property-based tests (hypothesis) share: reproducible settings sized for the
machine, and the contract every launcher's draw must meet.

Settings: derandomized (the same examples on every run: CI is reproducible), no example
database (nothing written into the tree), no deadline (the CPU interpreter is slow and its
first call of a kernel variant compiles nothing but still parses it). Each test states its
example count for the CPU interpreter; on a GPU it runs ``GPU_FACTOR`` times as many, and
``KVPERF_HYPOTHESIS_EXAMPLES=N`` sets every property test to N examples (e.g. a long run on
the H200: ``KVPERF_HYPOTHESIS_EXAMPLES=2000``). ``KVPERF_HYPOTHESIS_SEED=S`` replaces the
derandomized stream by seed S (other examples, still reproducible).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from hypothesis import HealthCheck, seed, settings

from kvperf_kernels.device import interpreted

GPU_FACTOR = 10
EXAMPLES_ENV = "KVPERF_HYPOTHESIS_EXAMPLES"
SEED_ENV = "KVPERF_HYPOTHESIS_SEED"


def example_count(cpu_examples: int) -> int:
    """Examples for a test that takes ``cpu_examples`` in the CPU interpreter."""
    override = os.environ.get(EXAMPLES_ENV)
    if override:
        return max(1, int(override))
    return cpu_examples if interpreted() else cpu_examples * GPU_FACTOR


def property_settings(cpu_examples: int):
    """Decorator: hypothesis settings for a property test (see the module docstring)."""
    chosen_seed = os.environ.get(SEED_ENV)
    configured = settings(
        max_examples=example_count(cpu_examples), deadline=None,
        derandomize=chosen_seed is None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )
    if chosen_seed is None:
        return configured

    def apply(test):
        return seed(int(chosen_seed))(configured(test))

    return apply


@contextmanager
def raises_naming(expected: dict[type, tuple[str, ...]] | None):
    """The launcher's contract for one draw.

    ``expected`` None: the call must succeed. Otherwise it maps each acceptable exception
    type to the argument names one of which its message must contain (several arguments
    may be broken in one draw; whichever the launcher checks first may be named). Any
    other exception (IndexError, RuntimeError, a Triton error: something leaked past the
    checks) fails the test, as does no exception.
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - the point is to classify every exception
        if expected is None:
            raise AssertionError(f"a valid draw raised {type(err).__name__}: {err}") from err
        names = expected.get(type(err))
        if names is None:
            raise AssertionError(f"expected one of {sorted(t.__name__ for t in expected)} "
                                 f"naming {sorted(set(sum(expected.values(), ())))}, got "
                                 f"{type(err).__name__}: {err}") from err
        if not any(name in str(err) for name in names):
            raise AssertionError(f"{type(err).__name__} names none of {list(names)}: "
                                 f"{err}") from err
    else:
        if expected is not None:
            raise AssertionError(f"expected {sorted(t.__name__ for t in expected)} naming "
                                 f"{sorted(set(sum(expected.values(), ())))}, nothing raised")


class Expect:
    """Accumulates what a draw breaks: ``expect.add(ValueError, "seq_lens")``; ``expect.errors``
    is None while nothing is broken (then the call must match the reference)."""

    def __init__(self):
        self.errors: dict[type, tuple[str, ...]] | None = None

    def add(self, exc: type, *names: str) -> None:
        self.errors = dict(self.errors or {})
        self.errors[exc] = self.errors.get(exc, ()) + names

    @property
    def valid(self) -> bool:
        return self.errors is None


def flush_bf16_subnormals(x: torch.Tensor) -> torch.Tensor:
    """bf16 subnormals set to 0 in the CPU interpreter, whose loads read them as wrong fp32
    values (Triton 3.9's defect, not the kernels'); unchanged on a GPU or for other dtypes."""
    if not interpreted() or x.dtype != torch.bfloat16:
        return x
    tiny = x.abs() < torch.finfo(torch.bfloat16).tiny
    return torch.where(tiny & (x != 0), torch.zeros_like(x), x)
