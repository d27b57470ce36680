"""With pytest-html installed (`--html=PATH`): a kvperf verdict and a key-metric column in
its results table, from what the test's report carries (the plugin registers this only
where pytest-html is loaded; its hooks do not exist elsewhere)."""

from __future__ import annotations

import html
import json
from types import SimpleNamespace

from .compare import MetricChange, change_line
from .report import key_metric
from .session import PROP_GPU, PROP_METRICS, PROP_SKIP, status_of


class HtmlColumns:
    def __init__(self, session):
        self.session = session

    def verdict(self, report) -> tuple[str, str]:
        """(kvperf status, key metric text) of one test report, as the summary has them."""
        props = dict(report.user_properties)
        payload = json.loads(props[PROP_METRICS]) if PROP_METRICS in props else None
        changes = [MetricChange.from_dict(c) for c in payload["changes"]] if payload else []
        if report.skipped:
            outcome = "skipped"
            longrepr = report.longrepr
            reason = (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr))
            reason = reason.removeprefix("Skipped: ")
        else:
            outcome = "passed" if report.passed else (
                "failed" if report.when == "call" else "error")
            reason = ""
        gpu = props.get(PROP_GPU, "")
        entry = self.session.entry(gpu, report.nodeid) if gpu else None
        status = status_of(outcome, reason, props.get(PROP_SKIP, ""),
                           payload["verdict"] if payload else "", bool(changes),
                           bool(entry and entry.measured))
        key = key_metric(SimpleNamespace(changes=changes))
        text = change_line(key) if key else props.get(PROP_SKIP, "")
        return status, text

    def pytest_html_results_table_header(self, cells):
        cells.insert(2, '<th class="sortable" data-column-type="kvperf">kvperf verdict</th>')
        cells.insert(3, "<th>kvperf key metric</th>")

    def pytest_html_results_table_row(self, report, cells):
        status, text = self.verdict(report)
        cells.insert(2, f'<td class="col-kvperf">{html.escape(status)}</td>')
        cells.insert(3, f'<td class="col-kvperf-metric">{html.escape(text)}</td>')
