"""Fixtures of the decode_prefill lab; decode cases and variants live in kvperf_kernels.testing."""

from __future__ import annotations

import pytest

from kvperf_kernels.testing.inputs import make_decode_case


@pytest.fixture
def decode_case():
    """Factory fixture: decode_case(lens, hq=, hkv=, head_dim=, page_size=, ...) -> DecodeCase."""
    return make_decode_case
