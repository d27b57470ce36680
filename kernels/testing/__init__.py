"""Helpers the suites share (inputs, comparisons, tolerances): imported as a package, never
through conftest.
"""
