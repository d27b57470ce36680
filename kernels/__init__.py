"""The project's KV-cache kernels (Triton) with their torch references.

Imported as ``kvperf_kernels`` (see pyproject.toml), so an installed third-party
``kernels`` package can never shadow it.
"""
