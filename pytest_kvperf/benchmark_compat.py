"""Every use of pytest-benchmark's private API, in one module.

pytest-benchmark has no public API for what `kv_bench` needs, so this module reaches in:

- `config._benchmarksession` (its session: `only`, `skip`, `disabled`, `benchmarks`);
- `pytest_benchmark.stats.Metadata(fixture, iterations, options)` with a stand-in for its
  fixture (a namespace with the fields Metadata reads), fed with our own samples;
- `pytest_benchmark.session.get_machine_id`, which its session reads for the
  `.benchmarks/<machine id>/` folder (wrapped to add the GPU key);
- the reason texts its `pytest_collection_modifyitems` skips with.

`problems()` checks all of that against the installed release and names what is gone;
the plugin refuses to start on a release that fails it (a usage error naming the version
and what changed), and `tests/test_benchmark_compat.py` fails on it in CI. pyproject.toml
bounds the dependency to `TESTED`, the releases this was checked with.
"""

from __future__ import annotations

import inspect
import re
from types import ModuleType, SimpleNamespace

# The releases the checks below were run against (5.1.0, 5.2.3, 5.3.1); pyproject.toml's
# dependency carries the same bound (a test keeps the two equal).
TESTED = ">=5.1,<5.4"

# pytest-benchmark's own skip reasons (its pytest_collection_modifyitems): a test skipped
# with one of them was deselected by --benchmark-only / --benchmark-skip, like -k.
SKIP_BENCH_REASON = "Skipping benchmark (--benchmark-skip active)."
SKIP_OTHER_REASON = "Skipping non-benchmark (--benchmark-only active)."
SELECTION_REASONS = (SKIP_BENCH_REASON, SKIP_OTHER_REASON)

_SESSION_ATTRIBUTES = ("only", "skip", "disabled", "benchmarks", "machine_id")
_METADATA_FIXTURE_FIELDS = ("name", "fullname", "group", "param", "params", "extra_info",
                            "cprofile_stats")


class IncompatibleBenchmarkError(RuntimeError):
    """The installed pytest-benchmark lacks private API that kv_bench relies on."""


def session(config):
    """pytest-benchmark's session object, None when the plugin is off (-p no:benchmark)."""
    return getattr(config, "_benchmarksession", None)


def deselects_only(bs) -> bool:
    return bool(bs.only)


def deselects_benchmarks(bs) -> bool:
    return bool(bs.skip)


def wrap_machine_id(suffix: str, add_cleanup) -> None:
    """Make pytest-benchmark's machine id end in `-suffix` until add_cleanup's callback runs.

    Called before pytest-benchmark's (trylast) pytest_configure creates its session, which
    reads the id once.
    """
    import pytest_benchmark.session as bench_session

    previous = bench_session.get_machine_id
    original = getattr(previous, "__wrapped__", previous)  # (a pytester run inside a run)

    def get_machine_id() -> str:
        return f"{original()}-{suffix}"

    get_machine_id.__wrapped__ = original
    bench_session.get_machine_id = get_machine_id
    add_cleanup(lambda: setattr(bench_session, "get_machine_id", previous))


def machine_id_suffix(gpu_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", gpu_key)


def add_record(config, record: dict) -> None:
    """Append a measured record to pytest-benchmark's session as one of its own benchmarks."""
    from pytest_benchmark.stats import Metadata

    bs = session(config)
    if bs is None:
        return
    fixture = SimpleNamespace(
        name=record["name"], fullname=record["fullname"], group=record["group"],
        param=record["param"], params=record["params"], extra_info=record["extra_info"],
        cprofile_stats=None, has_error=False,
    )
    meta = Metadata(fixture, iterations=1, options={
        "timer": record["extra_info"]["timing_method"], "min_rounds": None,
        "max_time": None, "min_time": None, "warmup": True, "disable_gc": False,
    })
    for seconds in record["samples_s"]:
        meta.update(seconds)
    bs.benchmarks.append(meta)


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def problems(plugin: ModuleType | None = None, session_mod: ModuleType | None = None,
             stats: ModuleType | None = None) -> list[str]:
    """What of the private API above the given (default: installed) modules lack; [] if all."""
    if plugin is None or session_mod is None or stats is None:
        import pytest_benchmark.plugin as plugin
        import pytest_benchmark.session as session_mod
        import pytest_benchmark.stats as stats
    found = []
    configure = _source(getattr(plugin, "pytest_configure", None))
    if "config._benchmarksession" not in configure:
        found.append("pytest_benchmark.plugin.pytest_configure no longer sets "
                     "config._benchmarksession")
    modify = _source(getattr(plugin, "pytest_collection_modifyitems", None))
    for reason in SELECTION_REASONS:
        if reason not in modify:
            found.append(f"pytest_benchmark.plugin.pytest_collection_modifyitems no longer "
                         f"skips with {reason!r}")
    bench_session = getattr(session_mod, "BenchmarkSession", None)
    init = _source(getattr(bench_session, "__init__", None))
    for name in _SESSION_ATTRIBUTES:
        if f"self.{name} =" not in init:
            found.append(f"pytest_benchmark.session.BenchmarkSession has no attribute {name!r}")
    if "get_machine_id()" not in init or not callable(getattr(session_mod, "get_machine_id",
                                                              None)):
        found.append("pytest_benchmark.session.BenchmarkSession no longer reads the module's "
                     "get_machine_id()")
    metadata = getattr(stats, "Metadata", None)
    if metadata is None:
        return [*found, "pytest_benchmark.stats.Metadata is gone"]
    params = list(inspect.signature(metadata.__init__).parameters)[1:]
    if params != ["fixture", "iterations", "options"]:
        found.append(f"pytest_benchmark.stats.Metadata(...) takes {params}, "
                     "not (fixture, iterations, options)")
    reads = _source(metadata.__init__)
    for name in sorted(set(re.findall(r"fixture\.(\w+)", reads)) - set(_METADATA_FIXTURE_FIELDS)):
        found.append(f"pytest_benchmark.stats.Metadata reads fixture.{name}, which the "
                     "stand-in lacks")
    if not callable(getattr(metadata, "update", None)):
        found.append("pytest_benchmark.stats.Metadata has no update(duration)")
    return found


def check_installed() -> None:
    """Raise IncompatibleBenchmarkError naming the release and what changed."""
    found = problems()
    if found:
        from importlib.metadata import version

        raise IncompatibleBenchmarkError(
            f"pytest-kvperf cannot use pytest-benchmark {version('pytest-benchmark')} "
            f"(tested: pytest-benchmark{TESTED}): " + "; ".join(found)
            + f". Install pytest-benchmark{TESTED}, or run with -p no:benchmark."
        )
