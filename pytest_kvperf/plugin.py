"""pytest hooks and fixtures of pytest-kvperf; the logic lives in the modules they call."""

from __future__ import annotations

import json
import os
import signal

import pytest

from . import (
    arch_selection,
    benchmark_compat,
    ci_report,
    html_report,
    named_peaks,
    report,
    role,
    xdist_gpus,
)
from .baselines import BaselineError
from .bench_fixture import (
    PROP_BENCH,
    KvBench,
    add_benchmark_record,
    keep_gpus_apart,
    select_for_benchmark_options,
)
from .hardware import UnknownProfileError, named_profile
from .html_columns import HtmlColumns
from .markers import marker_lines, skip_reasons
from .recorder import MetricRecorder
from .session import PROP_GPU, PROP_METRICS, PROP_SKIP, SPEED_POLICIES, KvperfSession

_recorder_key = pytest.StashKey[MetricRecorder]()
_session_key = pytest.StashKey[KvperfSession]()


def _hw_profile_option(value: str) -> str:
    try:
        named_profile(value)
    except UnknownProfileError as exc:
        import argparse

        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def pytest_addoption(parser):
    group = parser.getgroup("kvperf", "pytest-kvperf: KV-cache kernel correctness and speed")
    group.addoption(
        "--kvperf-hw", type=_hw_profile_option, default=None, metavar="PROFILE",
        help="make skip decisions for a named hardware profile (h100, b200, gb10, cpu, ...; "
        "h100x2 for two GPUs). Never runs a test on hardware that is not there.",
    )
    group.addoption(
        "--update-baselines", action="store_true", default=False,
        help="rewrite the baseline entries of tests that ran and passed (others are kept)",
    )
    group.addoption(
        "--kvperf-baselines", default=None, metavar="DIR",
        help="baseline directory (default: ini kvperf_baselines, else <rootdir>/baselines)",
    )
    group.addoption(
        "--kvperf-speed", choices=SPEED_POLICIES, default=None,
        help="what a speed regression does: warn (report it) or fail the test "
        "(default: ini kvperf_speed, else warn)",
    )
    group.addoption(
        "--kvperf-share-gpus", action="store_true", default=False,
        help="under xdist, allow more workers than GPUs (shared round-robin; speed metrics "
        "are then informational only)",
    )
    group.addoption(
        "--kvperf-report", default=None, metavar="PATH.html",
        help="write a self-contained HTML report (plots against the baselines) and "
        "PATH.json beside it (default: ini kvperf_report, else none)",
    )
    group.addoption(
        "--kvperf-json", default=None, metavar="PATH",
        help="write every test's outcome, verdict, metrics and hw_skip_reason as JSON",
    )
    # ini defaults (pyproject.toml [tool.pytest.ini_options], pytest.ini, ...): the
    # command-line option wins; a relative path is relative to the ini file's folder
    parser.addini("kvperf_speed", "default of --kvperf-speed: warn or fail", default="")
    parser.addini("kvperf_baselines", "default of --kvperf-baselines (a folder)", default="")
    parser.addini("kvperf_report", "default of --kvperf-report (PATH.html)", default="")


def pytest_addhooks(pluginmanager):
    from . import hookspec

    pluginmanager.add_hookspecs(hookspec)


def pytest_load_initial_conftests(early_config, parser, args):
    # Before any conftest can import torch and initialise CUDA.
    xdist_gpus.pin_this_worker()


def _plan_worker_gpus(config) -> None:
    workers = config.getoption("numprocesses", None)
    if role.is_worker(config) or not workers or config.getoption("dist", "no") == "no":
        return
    try:
        env = xdist_gpus.plan_for_workers(
            int(workers), xdist_gpus.visible_gpus(), config.getoption("kvperf_share_gpus")
        )
    except xdist_gpus.GpuSharingError as exc:
        raise pytest.UsageError(str(exc)) from None
    os.environ.update(env)  # the workers inherit the controller's environment


def _finish_on_sigterm(config) -> None:
    """SIGTERM (`timeout`, a CI runner) becomes KeyboardInterrupt, so pytest still ends the
    session: tests that completed reach the results JSON and --update-baselines."""
    if role.is_worker(config) or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)


def pytest_configure(config):
    role.decide(config)
    _plan_worker_gpus(config)
    _finish_on_sigterm(config)
    for line in marker_lines():
        config.addinivalue_line("markers", line)
    session = KvperfSession(config)
    try:
        session.load_all()
    except BaselineError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_session_key] = session
    if config.pluginmanager.has_plugin("benchmark"):
        try:
            benchmark_compat.check_installed()  # kv_bench relies on its private API
        except benchmark_compat.IncompatibleBenchmarkError as exc:
            raise pytest.UsageError(str(exc)) from None
    keep_gpus_apart(config, session.real_hw.key)
    config.pluginmanager.register(_ReportCollector(session, config), "kvperf-reports")
    if config.pluginmanager.has_plugin("html"):  # pytest-html: its hooks exist only then
        config.pluginmanager.register(HtmlColumns(session), "kvperf-html-columns")


def _session(config) -> KvperfSession:
    return config.stash[_session_key]


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    # Before pytest's -m deselection: -m sm90 selects every test that applies to sm90.
    for item in items:
        arch_selection.add_architecture_marks(item)
    result = yield
    # After every other plugin's (pytest-benchmark's skips), on the selected items only.
    select_for_benchmark_options(config, items)
    _skip_for_hardware(_session(config), items)
    return result


def _skip_for_hardware(session: KvperfSession, items) -> None:
    for item in items:
        item.user_properties.append((PROP_GPU, session.real_hw.key))
        marks = arch_selection.requirement_marks(item)
        if not marks:
            continue
        try:
            reasons = skip_reasons(marks, session.decision_hw, session.real_hw)
        except ValueError as exc:
            raise pytest.UsageError(f"{item.nodeid}: {exc}") from None
        if reasons:
            reason = "; ".join(reasons)
            item.user_properties.append((PROP_SKIP, reason))
            item.add_marker(pytest.mark.skip(reason=f"hw_skip_reason: {reason}"))


@pytest.fixture
def kvperf(request) -> MetricRecorder:
    """Records accuracy and speed metrics that are compared with the stored baseline."""
    recorder = MetricRecorder(request.node)
    request.node.stash[_recorder_key] = recorder
    return recorder


@pytest.fixture
def kv_bench(request, kvperf) -> KvBench:
    """Times GPU (or CPU) work device-accurately; see pytest_kvperf.bench_fixture."""
    session = _session(request.config)
    return KvBench(request, kvperf, session.peaks, session.gpu_facts_reader,
                   named_peaks.resolver(request.config, session.peaks))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    session, recorder = _session(item.config), item.stash.get(_recorder_key, None)
    try:
        result = yield
    except BaseException:
        # The test's own failure is the story: record its numbers, add no second error.
        session.after_call(item, recorder, test_failed=True)
        raise
    failure = session.after_call(item, recorder, test_failed=False)
    if failure:
        pytest.fail(failure, pytrace=False)  # the message says it all; no plugin frames
    return result


class _ReportCollector:
    """Feeds every test report to the session; under xdist this runs in the controller."""

    def __init__(self, session: KvperfSession, config):
        self.session = session
        self.config = config

    @pytest.hookimpl(tryfirst=True)  # before JUnit XML reads the teardown report
    def pytest_runtest_logreport(self, report):
        self.session.on_report(report)
        for name, value in report.user_properties:
            if name == PROP_BENCH and report.when == "call" and not role.is_worker(self.config):
                # a worker's measurement joins the controller's one benchmark JSON
                add_benchmark_record(self.config, json.loads(value))
        if report.when == "teardown" and not role.is_worker(self.config):
            # JUnit: one property per metric and the verdict, not the transport JSON
            report.user_properties = ci_report.testcase_properties(
                report.user_properties, PROP_METRICS, drop=(PROP_BENCH,))

    @pytest.hookimpl(tryfirst=True)  # before JUnit XML writes its file
    def pytest_sessionfinish(self, session):
        if role.is_worker(self.config):
            return
        self.session.classify()
        ci_report.add_suite_properties(self.config, ci_report.suite_properties(
            self.session, report.verdict_counts(self.session)))

    @pytest.hookimpl(optionalhook=True)  # pytest-xdist's: a worker finished
    def pytest_testnodedown(self, node, error):
        rec = getattr(node, "workeroutput", {}).get(xdist_gpus.WORKER_OUTPUT)
        if rec is not None:
            self.session.workers[node.gateway.id] = rec

    @pytest.hookimpl(optionalhook=True)
    def pytest_benchmark_update_machine_info(self, config, machine_info):
        machine_info["kvperf"] = {
            "gpu": self.session.real_hw.as_dict(),
            "peaks": self.session.peaks_record(),
            "gpu_facts": self.session.gpu_static_facts(),  # driver, clocks (NVML)
        }


def pytest_report_header(config):
    session = _session(config)
    hw = session.real_hw
    lines = [f"kvperf: {hw.describe()}; baselines {session.baseline_file(hw.key)}"]
    if session.hw_spec:
        lines.append(f"kvperf: skip decisions for profile {session.decision_hw.describe()}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if role.is_worker(config):  # what this worker ran on, for the controller's record
        config.workeroutput[xdist_gpus.WORKER_OUTPUT] = xdist_gpus.worker_gpu_record()
        return
    kv = _session(config)
    kv.classify()
    if kv.update:
        kv.write_baselines()
    if kv.json_path:
        kv.write_json(kv.json_path)
    if kv.report_path:
        html_report.write(kv, kv.report_path)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if role.is_worker(config):
        return
    report.terminal_summary(terminalreporter, _session(config))

