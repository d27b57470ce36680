"""Which process of the run this one is, decided once in pytest_configure.

Under pytest-xdist the workers run tests and send their results to the controller in
user_properties; only the controller (or a plain, single-process run) classifies,
writes the results JSON and the benchmark JSON, and updates baselines.
"""

from __future__ import annotations

import pytest

_is_worker = pytest.StashKey[bool]()


def decide(config) -> None:
    # xdist gives a worker's config its `workerinput`; nothing else tells them apart
    config.stash[_is_worker] = hasattr(config, "workerinput")


def is_worker(config) -> bool:
    """True in an xdist worker; False in the controller and in a single-process run."""
    return config.stash[_is_worker]
