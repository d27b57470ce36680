"""--kvperf-report writes a self-contained page with a plot, and the results JSON beside it."""

import json

TESTS = """
import os, pytest

def test_fast(kvperf):
    kvperf.speed("median_us", float(os.environ.get("KV_US", "100")), better="lower")

@pytest.mark.sm100
def test_blackwell(): pass
"""


def test_report_page_and_json(pytester, monkeypatch):
    pytester.makepyfile(TESTS)
    pytester.runpytest("--update-baselines").assert_outcomes(passed=1, skipped=1)
    monkeypatch.setenv("KV_US", "130")
    result = pytester.runpytest("--kvperf-report=out/report.html")
    result.assert_outcomes(passed=1, skipped=1)
    page = (pytester.path / "out" / "report.html").read_text()
    assert "<img src='data:image/png;base64," in page  # plot inlined: no other files
    assert "median_us 100 -&gt; 130 (+30.0%)" in page
    assert "needs sm100 (compute capability 10.x)" in page
    doc = json.loads((pytester.path / "out" / "report.json").read_text())
    fast = doc["tests"]["test_report_page_and_json.py::test_fast"]
    assert fast["status"] == "regressed" and fast["metrics"]["median_us"]["value"] == 130.0
