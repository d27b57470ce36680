"""pytest-kvperf: correctness and speed regression tests for LLM KV-cache GPU kernels."""

__version__ = "0.1.0"
