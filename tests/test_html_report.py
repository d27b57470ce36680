"""--kvperf-report: one self-contained page, parsed with html.parser part by part, and the
results JSON beside it; the log ratio and its interval; pytest-html's extra columns."""

import html
import json
import math
import re
import subprocess
from html.parser import HTMLParser

import pytest

from pytest_kvperf import html_report, report_model
from pytest_kvperf.compare import MetricChange, compare_metrics
from pytest_kvperf.metric import Metric, Spread

TESTS = """
import os, time, pytest

@pytest.mark.parametrize("k", ["a", "b", "c"])
def test_speed(kvperf, k):
    kvperf.speed("median_us", float(os.environ.get("KV_US_" + k, "100")), better="lower")

def test_err(kvperf):
    kvperf.error("rel_l2_err", float(os.environ.get("KV_ERR", "0.01")))

def test_fails():
    assert os.environ.get("KV_OK"), "lab threshold broken"

def test_bench(kv_bench):
    kv_bench(lambda: sum(range(2000)), bytes_moved=16000, max_time_s=0.05)

@pytest.mark.sm100
def test_blackwell(): pass
"""

# Two GPU baseline files; the older stores the kernel under the node id it had before it
# moved to test_report.py (another file, same test name).
GPU_ENTRY = {"status": "measured", "recorded": "2026-11-23T00:00:00+00:00", "metrics": {
    "frac_of_peak_bw": {"value": 0.0, "kind": "speed", "better": "higher", "rtol": 0.05,
                        "atol": 0.0, "unit": ""},
    "median_us": {"value": 0.0, "kind": "speed", "better": "lower", "rtol": 0.05,
                  "atol": 0.0, "unit": "us"}}}


def gpu_file(path, key, name, nodeid, frac, us, recorded):
    entry = json.loads(json.dumps(GPU_ENTRY))
    entry["metrics"]["frac_of_peak_bw"]["value"] = frac
    entry["metrics"]["median_us"]["value"] = us
    entry["recorded"] = recorded
    path.write_text(json.dumps({"schema": "pytest-kvperf/baselines/2",
                                "gpu": {"key": key, "name": name, "sm": "sm90"},
                                "versions": {}, "entries": {nodeid: entry}}))


class Page(HTMLParser):
    """What a reader sees, by part: sections, tables (rows with their verdict and cells),
    SVG shapes, and every URL the page would load."""

    def __init__(self, text):
        super().__init__()
        self.sections, self.tables, self.urls, self.shapes = [], {}, [], []
        self.scripts, self._table, self._row, self._cell = 0, None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("src", "href"):
            if a.get(name):
                self.urls.append(a[name])
        if tag == "link":
            self.urls.append(a.get("href", "link"))
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = {"status": a.get("data-status"), "cells": []}
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag in ("circle", "rect", "path", "polyline") and self._cell is not None:
            self._cell.append(f"<{tag}>")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def body(self, table_id):
        """Rows of a table without its header row."""
        return self.tables[table_id][1:]


@pytest.fixture
def project(pytester, monkeypatch):
    pytester.makepyfile(test_report=TESTS)
    subprocess.run(["git", "init", "-q"], cwd=pytester.path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], cwd=pytester.path, check=True)
    monkeypatch.setenv("KV_OK", "1")
    pytester.runpytest("-p", "no:cacheprovider", "--update-baselines",
                       "--benchmark-autosave").assert_outcomes(passed=6, skipped=1)
    base = pytester.path / "baselines"
    gpu_file(base / "nvidia-h100-80gb-hbm3.json", "nvidia-h100-80gb-hbm3",
             "NVIDIA H100 80GB HBM3", "old_place.py::test_bench", 0.9, 40.0, "2026-11-01")
    gpu_file(base / "nvidia-h200.json", "nvidia-h200", "NVIDIA H200",
             "test_report.py::test_bench", 0.7, 33.0, "2026-12-01")
    return pytester


def test_report_page_parts(project, monkeypatch):
    monkeypatch.delenv("KV_OK")
    for k, v in {"KV_US_a": "1500", "KV_US_b": "7", "KV_ERR": "0.03"}.items():
        monkeypatch.setenv(k, v)
    result = project.runpytest("-p", "no:cacheprovider", "--kvperf-report=out/report.html",
                               "--benchmark-autosave")
    result.assert_outcomes(passed=4, failed=2, skipped=1)
    text = (project.path / "out" / "report.html").read_text()
    page = Page(text)

    # self-contained: inline style, script and SVG; nothing to fetch
    assert page.urls == [] and "<img" not in text and page.scripts == 1
    assert page.sections == ["kv-changed", "kv-failures", "kv-tests", "kv-gpus", "kv-trend",
                             "kv-skips"]

    env = {r["cells"][0]: r["cells"][1:] for r in page.tables["kv-env"][1:]}
    assert env["GPU"] == ["cpu (cpu)"] and "torch" in env["versions"][0]
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", env["commit"][0]), env["commit"]
    assert env["date"][0].startswith("20") and env["verdicts"][0].endswith("1 n/a")

    # (test_bench's verdict is whatever this machine's clock gives: left out below)
    def not_bench(rows):
        return [r for r in rows if "test_bench" not in "".join(r["cells"])]

    # regressed first, then improved; each metric as a log-ratio strip with its interval
    changed = not_bench(page.body("kv-changed-table"))
    assert [r["cells"][0] for r in changed] == ["regressed", "regressed", "improved"]
    by_test = {r["cells"][1]: r for r in changed}
    speed_a = by_test["test_report.py::test_speed[a]"]["cells"]
    assert speed_a[2].startswith("median_us") and speed_a[3:5] == ["100", "1500"]
    assert "<circle>" in speed_a[5]  # 15x: on the shared axis, which reaches 16x
    assert speed_a[6].startswith("15x worse; ok from 1.05x worse to 1.05x better")
    err = by_test["test_report.py::test_err"]["cells"]
    assert "<rect>" in err[5] and "<circle>" in err[5]  # ok band and the value
    assert err[6].startswith("3x worse; ok from 1.5x worse to 2x better")
    assert by_test["test_report.py::test_speed[b]"]["cells"][6].startswith("14.3x better")

    tests = not_bench(page.body("kv-tests-table"))
    assert [r["status"] for r in tests] == ["regressed", "regressed", "failed", "improved",
                                            "ok", "n/a"]
    failed = next(r for r in tests if r["status"] == "failed")
    assert failed["cells"][4] == "AssertionError: lab threshold broken"
    assert "lab threshold broken" in text.split("id='kv-failures'")[1].split("</section>")[0]

    # per GPU: both files side by side, the old id matched to the new one
    gpus = page.body("kv-gpus-table")
    assert len(gpus) == 1 and gpus[0]["cells"][0] == "test_report.py::test_bench"
    assert gpus[0]["cells"][1].startswith("<rect><rect> 0.900 · 40 µs")
    assert "stored as old_place.py::test_bench" in gpus[0]["cells"][1]
    assert gpus[0]["cells"][2].startswith("<rect><rect> 0.700 · 33 µs")

    trend = page.body("kv-trend-table")
    assert trend[0]["cells"][0] == "test_report.py::test_bench"
    assert trend[0]["cells"][1] == "2" and "<polyline>" in trend[0]["cells"][2]

    skips = page.body("kv-skips-table")
    assert skips[0]["cells"][0] == "1" and "needs sm100" in skips[0]["cells"][1]

    doc = json.loads((project.path / "out" / "report.json").read_text())
    speed = doc["tests"]["test_report.py::test_speed[a]"]
    assert speed["status"] == "regressed" and speed["metrics"]["median_us"]["value"] == 1500.0
    # the speed verdict's interval is a field of the change: timed (spread on both sides)
    # tests carry it, a plain speed number has none
    assert [c["ci"] for c in speed["changes"]] == [None]
    bench = {c["name"]: c for c in doc["tests"]["test_report.py::test_bench"]["changes"]}
    ci = bench["median_us"]["ci"]
    assert ci["confidence"] == 0.99 and 0 < ci["low"] <= ci["high"]
    assert "lab threshold broken" in doc["tests"]["test_report.py::test_fails"]["message"]


def test_no_empty_sections(project):
    """Nothing changed, failed or skipped: those parts say so or are left out."""
    project.runpytest("-p", "no:cacheprovider", "-k", "not blackwell and not bench",
                      "--kvperf-report=r.html").assert_outcomes(passed=5, deselected=2)
    page = Page((project.path / "r.html").read_text())
    assert "kv-skips" not in page.sections and "kv-failures" not in page.sections
    assert "kv-changed-table" not in page.tables
    assert "No test regressed or improved" in (project.path / "r.html").read_text()


def speed_metric(median, spread_width, n=30):
    samples = [median * (1 + spread_width * ((i % 7) - 3) / 3) for i in range(n)]
    return Metric(median, "speed", "lower", 0.05, 0.0, "us", (0.0, None),
                  Spread.of(samples))


def test_log_ratio_carries_the_verdicts_interval():
    base, now = speed_metric(100.0, 0.02), speed_metric(130.0, 0.02)
    (judged,) = compare_metrics({"median_us": base}, {"median_us": now}).changes
    # through the results JSON, as the report reads it
    change = MetricChange.from_dict(json.loads(json.dumps(judged.to_dict()))).to_dict()
    assert change["ci"] == {"low": judged.ci.low, "high": judged.ci.high, "confidence": 0.99}
    view = report_model.ratio_view(change)
    assert judged.status == "regressed"
    assert view["ci"] == pytest.approx((1 / judged.ci.high, 1 / judged.ci.low))
    assert view["confidence"] == 99
    assert "99% CI 1.3" in report_model.describe_view(view)
    assert view["good"] == pytest.approx(100 / 130)  # < 1: worse
    assert view["band"] == pytest.approx((1 / 1.05, 1 / 0.95))
    assert view["ci"][1] < view["band"][0]  # the whole interval outside the ok band
    # higher-is-better: the factor is the ratio itself; a 15x rate is 15x better
    rate = dict(change, better="higher", value=1500.0, detail="", ci=None)
    assert report_model.ratio_view(rate)["good"] == 15.0
    assert report_model.scale_for([report_model.ratio_view(rate)]) == 4
    # accuracy: the band is rtol*|base| + atol around the baseline
    acc = {"name": "e", "kind": "accuracy", "better": "lower", "value": 0.03, "base": 0.01,
           "status": "regressed", "rtol": 0.5, "atol": 0.0, "detail": ""}
    v = report_model.ratio_view(acc)
    assert v["band"] == pytest.approx((1 / 1.5, 2.0)) and v["ci"] is None
    # a bit-exact baseline (0) that stops being exact: no finite ratio, shown off the axis
    exact = dict(acc, base=0.0, value=1e-3, atol=1e-12)
    assert report_model.ratio_view(exact)["good"] == 0.0
    assert report_model.describe_view(report_model.ratio_view(exact)).startswith(
        "no finite ratio")
    assert report_model.ratio_view(dict(acc, base=None)) is None
    assert math.isfinite(report_model.scale_for([v]))


def test_results_json_without_ci_field_draws_no_interval():
    """A results JSON written before changes carried 'ci': read, no interval, no crash;
    the interval's text left in the detail is not read back."""
    base, now = speed_metric(100.0, 0.02), speed_metric(130.0, 0.02)
    new = compare_metrics({"median_us": base}, {"median_us": now}).changes[0].to_dict()
    old = {k: v for k, v in new.items() if k != "ci"}
    assert "99% CI [" in old["detail"]

    def page_for(change):
        doc = {"hardware": {"name": "NVIDIA H200", "key": "nvidia-h200", "sm": "sm90"},
               "tests": {"t.py::test_decode": {"status": "regressed", "metrics": {},
                                               "changes": [change]}}}
        model = report_model.build([report_model.run_from_results(doc, "r.json")], {})
        return model, html_report.render(model)

    interval = "stroke-width='3'"  # how strip() draws the interval
    model, text = page_for(old)
    assert model["changed"][0]["metric_view"]["ci"] is None
    assert model["tests"][0]["view"]["ci"] is None
    row = Page(text).body("kv-changed-table")[0]
    assert row["status"] == "regressed" and "<circle>" in row["cells"][5]
    assert interval not in text and "CI" not in row["cells"][6].split(";")[0]
    # the same change with its field: the interval is drawn (the check above can fail)
    model, text = page_for(new)
    assert model["changed"][0]["metric_view"]["ci"] is not None and interval in text


def test_pytest_html_gets_verdict_and_key_metric_columns(pytester, monkeypatch):
    pytest.importorskip("pytest_html", reason="pytest-html is not installed (pip install "
                        "pytest-html): its columns are tested where it is")
    pytester.makepyfile(test_report=TESTS)
    monkeypatch.setenv("KV_OK", "1")
    pytester.runpytest("-p", "no:cacheprovider", "--update-baselines", "-k", "speed")
    monkeypatch.setenv("KV_US_a", "1500")
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "speed or blackwell",
                                "--html=out.html", "--self-contained-html")
    result.assert_outcomes(passed=3, skipped=1)
    text = (pytester.path / "out.html").read_text()
    assert '<th class="sortable" data-column-type="kvperf">kvperf verdict</th>' in text
    blob = json.loads(html.unescape(re.search(r'data-jsonblob="([^"]*)"', text).group(1)))
    cells = {nodeid: "".join(t[0]["resultsTableRow"]) for nodeid, t in blob["tests"].items()}
    assert '<td class="col-kvperf">regressed</td>' in cells["test_report.py::test_speed[a]"]
    assert "median_us 100 -&gt; 1500 (+1400.0%)" in cells["test_report.py::test_speed[a]"]
    assert '<td class="col-kvperf">ok</td>' in cells["test_report.py::test_speed[b]"]
    assert '<td class="col-kvperf">n/a</td>' in cells["test_report.py::test_blackwell"]


def test_filters_run_in_a_real_browser(project, monkeypatch, tmp_path):
    """Headless Chromium runs the page's script: a link's #q= and #hide= filter the rows."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("no chromium here (Debian: apt-get install chromium)")
    monkeypatch.setenv("KV_US_a", "1500")
    project.runpytest("-p", "no:cacheprovider", "-k", "not bench", "--kvperf-report=r.html")
    url = (project.path / "r.html").as_uri() + "#q=speed&hide=ok"
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    table = dom.split('id="kv-tests-table"')[1].split("</table>")[0]
    rows = re.findall(r'<tr data-status="([^"]*)"( style="display: none;")?>.*?'
                      r'<td class="id">(.*?)</td>', table)
    shown = {re.sub("<[^>]+>", "", name) for _, hidden, name in rows if not hidden}
    assert shown == {"test_report.py::test_speed[a]"}  # speed[b], speed[c] are ok: hidden
    assert len(rows) == 6 and '(1 of 6)' in dom


def test_throttled_timing_is_listed_as_unreliable_not_as_a_change():
    doc = {"hardware": {"name": "NVIDIA H200", "key": "nvidia-h200", "sm": "sm90"},
           "tests": {"t.py::test_decode": {"status": "unreliable", "metrics": {}, "changes": [
               {"name": "median_us", "kind": "speed", "better": "lower", "value": 130.0,
                "base": 100.0, "status": "unreliable", "rtol": 0.05, "atol": 0.0,
                "detail": "GPU throttled during timing (hw_slowdown); would be regressed"}]}}}
    model = report_model.build([report_model.run_from_results(doc, "r.json")], {},
                               with_review=True)
    assert [r["metric"]["status"] for r in model["changed"]] == ["unreliable"]
    assert [(r["status"], r["metric"]) for r in model["review"]] == [("unreliable",
                                                                       "median_us")]
    page = Page(html_report.render(model))
    row = page.body("kv-changed-table")[0]
    assert row["status"] == "unreliable" and "would be regressed" in row["cells"][6]
