"""Fixtures of the sinks suite; the decode cases and tolerances live in kvperf_kernels.testing."""

from __future__ import annotations

import pytest

from kvperf_kernels.testing.compare import assert_matches_reference
from kvperf_kernels.testing.inputs import make_decode_case


@pytest.fixture
def decode_case():
    """Factory fixture: decode_case(lens, hq=, hkv=, head_dim=, page_size=, ...) -> DecodeCase."""
    return make_decode_case


@pytest.fixture
def matches_reference():
    return assert_matches_reference
