"""The `kvperf` command: show, diff (files and git revisions), explain, merge."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_kvperf import cli

MARKED = """
import pytest

@pytest.mark.sm100
def test_blackwell(): pass

@pytest.mark.fp4
def test_fp4(): pass

@pytest.mark.sm90
def test_hopper(): pass

@pytest.mark.requires("no_such_pkg_kvperf", "1.0")
def test_needs_pkg(): pass

@pytest.mark.skip(reason="not written yet")
def test_later(): pass

def test_anywhere(): pass
"""


def kvperf(pytester, *args):
    """The command as a user runs it, in the project folder (a subprocess)."""
    return pytester.run(sys.executable, "-m", "pytest_kvperf", *args)


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["kvperf"] == "pytest_kvperf.cli:main"
    if shutil.which("kvperf"):  # installed: the script runs the same main
        out = subprocess.run(["kvperf", "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "{show,diff,explain,merge}" in out.stdout


def test_show_lists_what_would_run_and_skip_on_a_profile(pytester):
    pytester.makepyfile(test_hw=MARKED)
    result = kvperf(pytester, "show", "--hw", "h100", "-v")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines([
        "kvperf show: skip decisions for NVIDIA H100 80GB HBM3 (sm90) *profile --kvperf-hw=h100*",
        "selected 6 of 6 tests (0 deselected)",
        "would run: 2",
        "  test_hw.py::test_anywhere",
        "  test_hw.py::test_hopper",
        "would skip: 4, by reason:",
    ])
    out = result.stdout.str()
    assert ("1 x needs sm100 (compute capability 10.x); found NVIDIA H100 80GB HBM3 (sm90) "
            "[profile --kvperf-hw=h100]") in out
    assert "1 x needs no_such_pkg_kvperf>=1.0; found no_such_pkg_kvperf not installed" in out
    assert "1 x not written yet" in out
    # the profile decides as that GPU would: a B200 runs the Blackwell and FP4 tests even
    # on this machine, and -m selects as a pytest run does
    b200 = kvperf(pytester, "show", "--hw", "b200", "-m", "sm100", "-v")
    b200.stdout.fnmatch_lines(["selected 5 of 6 tests (1 deselected)", "would run: 3",
                               "  test_hw.py::test_anywhere", "  test_hw.py::test_blackwell",
                               "  test_hw.py::test_fp4", "would skip: 2, by reason:"])


def test_show_without_a_profile_decides_for_this_machine(pytester):
    from pytest_kvperf.hardware import detect

    if detect().has_gpu:
        pytest.skip("checks the CPU machine's decisions")
    pytester.makepyfile(test_hw=MARKED)
    result = kvperf(pytester, "show")
    result.stdout.fnmatch_lines(["kvperf show: skip decisions for no CUDA GPU (*",
                                 "would run: 1", "*", "would skip: 5, by reason:",
                                 "*1 x needs sm100 (compute capability 10.x); found no CUDA*"])


def test_show_reports_a_bad_profile(pytester):
    pytester.makepyfile(test_hw=MARKED)
    result = kvperf(pytester, "show", "--hw", "z900")
    assert result.ret == 2
    result.stderr.fnmatch_lines(["kvperf show: unknown hardware profile 'z900'*"])


def metric(value, better="lower", kind="accuracy", rtol=0.5, unit=""):
    return {"value": value, "kind": kind, "better": better, "rtol": rtol, "atol": 0.0,
            "unit": unit}


def write_file(path, key, entries, schema=2):
    path.write_text(json.dumps({"schema": f"pytest-kvperf/baselines/{schema}",
                                "gpu": {"key": key, "name": key.upper(), "sm": "sm90"},
                                "entries": entries}))


def old_and_new(tmp_path):
    """An old schema-1 file (a test under its old file name, a cosine) and a newer one."""
    old = {"suites/a/test_old.py::test_q[x]": {"status": "measured", "metrics": {
               "cosine": metric(0.999, "higher", rtol=0.0),
               "max_abs_err": metric(0.01)}},
           "suites/a/test_k.py::test_speed": {"status": "measured", "metrics": {
               "median_us": metric(100.0, kind="speed", rtol=0.05, unit="us")}},
           "suites/a/test_k.py::test_gone": {"status": "n/a", "hw_skip_reason": "needs x"}}
    new = {"suites/a/test_new.py::test_q[x]": {"status": "measured", "metrics": {
               "cosine_distance": metric(0.001), "max_abs_err": metric(0.03)}},
           "suites/a/test_k.py::test_speed": {"status": "measured", "metrics": {
               "median_us": metric(40.0, kind="speed", rtol=0.05, unit="us")}}}
    write_file(tmp_path / "old.json", "old", old, schema=1)
    write_file(tmp_path / "new.json", "new", new)
    return tmp_path / "old.json", tmp_path / "new.json"


def test_diff_two_files(tmp_path, capsys):
    old, new = old_and_new(tmp_path)
    assert cli.main(["diff", str(old), str(new)]) == 0
    out = capsys.readouterr().out
    assert "1 tests moved to another file since the old one" in out
    assert "   1 x suites/a/test_old.py -> suites/a/test_new.py" in out
    assert "1 schema-1 'cosine' values compared as 1 - cosine" in out
    lines = [ln.split() for ln in out.splitlines()]
    assert ["regressed", "max_abs_err", "0.01", "0.03", "3.000"] in lines
    assert ["ok", "cosine_distance", "0.001", "0.001", "1.000"] in lines
    assert ["improved", "median_us", "[us]", "100", "40", "0.400"] in [ln[:6] for ln in lines]
    assert "(old id suites/a/test_old.py::test_q[x])" in out
    assert "only in old (" in out and "1 n/a)" in out
    assert "  median_us            0.400  (1)" in out  # geometric mean of speed ratios
    assert out.rstrip().endswith("2 tests compared (1 moved); metrics: 1 regressed, "
                                 "1 improved, 1 ok; 1 tests only in old, 0 only in new")
    assert cli.main(["diff", "--changed", str(old), str(new)]) == 0
    assert ["ok", "cosine_distance"] not in [ln.split()[:2] for ln in
                                             capsys.readouterr().out.splitlines()]


def test_diff_one_file_at_two_git_revisions(tmp_path, capsys, monkeypatch):
    old, new = old_and_new(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "cpu.json").write_text(old.read_text())
    subprocess.run([*git, "add", "cpu.json"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "1"], cwd=tmp_path, check=True)
    (tmp_path / "cpu.json").write_text(new.read_text())
    subprocess.run([*git, "commit", "-qam", "2"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["diff", "cpu.json@HEAD~1", "cpu.json@HEAD"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("old: cpu.json@HEAD~1\nnew: cpu.json@HEAD\n")
    assert "1 regressed, 1 improved, 1 ok" in out
    assert cli.main(["diff", "cpu.json@HEAD~1", "cpu.json"]) == 0  # the working copy
    assert "1 regressed" in capsys.readouterr().out
    assert cli.main(["diff", "cpu.json@nosuchrev", "cpu.json"]) == 2
    assert "git cannot show cpu.json at 'nosuchrev'" in capsys.readouterr().err
    assert cli.main(["diff", "missing.json", "cpu.json"]) == 2
    assert "missing.json: no such baseline file" in capsys.readouterr().err


def test_explain_says_why_and_what_the_baselines_hold(pytester):
    pytester.makepyfile(test_hw=MARKED)
    base = pytester.path / "baselines"
    base.mkdir()
    write_file(base / "nvidia-b200.json", "nvidia-b200", {
        "old_place.py::test_blackwell": {"status": "measured", "recorded": "2026-11-01",
                                         "metrics": {"max_abs_err": metric(0.25)}}})
    write_file(base / "cpu.json", "cpu", {"test_hw.py::test_blackwell": {
        "status": "n/a", "hw_skip_reason": "needs sm100 (compute capability 10.x); found no"}})
    result = kvperf(pytester, "explain", "test_hw.py::test_blackwell", "--hw", "h100")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines([
        "test_hw.py::test_blackwell",
        "  needs: sm100",
        "  -m selects it under: sm100",
        "  here (*): *",
        "  on NVIDIA H100 80GB HBM3 (sm90) *profile --kvperf-hw=h100*: skips: needs sm100 *",
        "  on each named profile:",
        "    a100     skips: needs sm100*",
        "    b200     runs",
        "    b300     runs",
        "*",
        "  cpu.json:",
        "    n/a: needs sm100 (compute capability 10.x); found no (recorded ?)",
        "  nvidia-b200.json (stored under its old id old_place.py::test_blackwell):",
        "    measured, recorded 2026-11-01; versions: ",
        "    max_abs_err = 0.25 [accuracy, lower is better; rtol 0.5, atol 0]",
    ])
    gone = kvperf(pytester, "explain", "test_hw.py::test_removed")
    gone.stdout.fnmatch_lines(["test_hw.py::test_removed", "  not collected here*",
                               "*cpu.json:", "    no entry"])


def results_doc(key, name, tests):
    return {"hardware": {"name": name, "key": key, "sm": "sm90", "versions": {"torch": "2"}},
            "run": {"commit": "abc", "date": "2026-12-02T00:00:00+00:00"},
            "summary": {}, "tests": tests}


def change(name, base, value, status, better="lower", kind="speed"):
    return {"name": name, "kind": kind, "better": better, "value": value, "base": base,
            "status": status, "rtol": 0.05, "atol": 0.0, "detail": ""}


def test_merge_two_hosts_into_one_report_and_review(tmp_path, capsys):
    h100 = results_doc("nvidia-h100-80gb-hbm3", "NVIDIA H100 80GB HBM3", {
        "t.py::test_decode": {"status": "regressed", "metrics": {"median_us": metric(
            130.0, kind="speed", unit="us")}, "changes": [change("median_us", 100.0, 130.0,
                                                                  "regressed")]},
        "t.py::test_gone": {"status": "lost coverage", "hw_skip_reason": "needs flashinfer",
                            "metrics": {}, "changes": []}})
    h200 = results_doc("nvidia-h200", "NVIDIA H200", {
        "t.py::test_decode": {"status": "ok", "metrics": {"median_us": metric(
            80.0, kind="speed", unit="us")}, "changes": [change("median_us", 80.0, 80.0, "ok")]},
        "t.py::test_new": {"status": "new", "metrics": {"e": metric(0.1)},
                           "changes": [change("e", None, 0.1, "new", kind="accuracy")]}})
    (tmp_path / "h100.json").write_text(json.dumps(h100))
    (tmp_path / "h200.json").write_text(json.dumps(h200))
    base = tmp_path / "baselines"
    base.mkdir()
    write_file(base / "nvidia-h200.json", "nvidia-h200", {"t.py::test_decode": {
        "status": "measured", "metrics": {"frac_of_peak_bw": metric(0.8, "higher", "speed"),
                                          "median_us": metric(80.0, kind="speed")}}})
    older = json.loads(json.dumps(h100))  # an earlier H100 run, for the trend
    older["run"]["date"] = "2026-11-30T00:00:00+00:00"
    older["tests"]["t.py::test_decode"]["metrics"]["median_us"]["value"] = 90.0
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "h100-old.json").write_text(json.dumps(older))
    out_html = tmp_path / "merged.html"
    assert cli.main(["merge", str(tmp_path / "h100.json"), str(tmp_path / "h200.json"),
                     "-o", str(out_html), "--baselines", str(base),
                     "--trend", str(tmp_path / "saved")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["NVIDIA H100 80GB HBM3 [nvidia-h100-80gb-hbm3]: 1 regressed, "
                       "1 lost coverage", "NVIDIA H200 [nvidia-h200]: 1 new, 1 ok"]
    assert out[3] == "review of baseline changes: 3"
    assert out[4].split() == ["regressed", "nvidia-h100-80gb-hbm3:", "t.py::test_decode",
                              "median_us", "100", "->", "130"]
    assert out[5].startswith("  lost coverage nvidia-h100-80gb-hbm3: t.py::test_gone")
    assert out[6].split() == ["new", "nvidia-h200:", "t.py::test_new", "e", "0.1", "(new)"]
    page = out_html.read_text()
    assert "<th>NVIDIA H100 80GB HBM3</th><th>NVIDIA H200</th>" in page  # both hosts' env
    assert "id='kv-review-table'" in page and "id='kv-gpus-table'" in page
    assert page.index("id='kv-changed'") < page.index("id='kv-tests'")
    trend = page.split("id='kv-trend-table'")[1].split("</table>")[0]
    assert "<td class='num'>2</td>" in trend  # the saved run and this one
    assert "<td class='num'>90</td><td class='num'>130</td>" in trend


def test_merge_takes_baseline_files_and_names_a_bad_input(tmp_path, capsys):
    write_file(tmp_path / "gpu.json", "gpu", {"t.py::test_a": {"status": "measured",
               "metrics": {"e": metric(0.5)}}})
    (tmp_path / "junk.json").write_text("[1, 2]")
    out_html = tmp_path / "r.html"
    assert cli.main(["merge", str(tmp_path / "gpu.json"), "-o", str(out_html),
                     "--baselines", str(tmp_path / "none")]) == 0
    assert "GPU (baseline file) [gpu]: 1 stored" in capsys.readouterr().out
    assert "e 0.5" in out_html.read_text()
    assert cli.main(["merge", str(tmp_path / "junk.json"), "-o", str(out_html)]) == 2
    assert "junk.json: neither a results JSON" in capsys.readouterr().err


def test_moved_tests_are_matched_only_when_unambiguous():
    from pytest_kvperf.node_ids import match_moved

    old = ["s/a/test_mx.py::test_q[1]", "s/a/test_mx.py::test_r", "s/b/test_x.py::test_q[1]"]
    new = ["s/a/test_m.py::test_q[1]", "s/a/test_n.py::test_r", "s/a/test_o.py::test_r",
           "s/c/test_y.py::test_q[1]"]
    # test_r has two candidates and s/b's test_q none in its folder: neither is matched
    assert match_moved(old, new) == {"s/a/test_mx.py::test_q[1]": "s/a/test_m.py::test_q[1]"}


def test_diff_reads_a_schema1_cosine_of_one_as_a_zero_distance(tmp_path, capsys):
    """0.9999999999999999 is float64's nearest cosine to 1: against a bit-exact stored 0
    that is no change (a larger gap still is one: the negative control)."""
    for cos, verdict in ((0.9999999999999999, "ok"), (0.99999, "improved")):
        write_file(tmp_path / "a.json", "a", {"t.py::test_x": {"status": "measured",
                   "metrics": {"k.cosine": metric(cos, "higher", rtol=0.0)}}}, schema=1)
        dist = dict(metric(0.0), atol=1e-24, domain=[0.0, 2.0])
        write_file(tmp_path / "b.json", "b", {"t.py::test_x": {"status": "measured",
                   "metrics": {"k.cosine_distance": dist}}})
        assert cli.main(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
        rows = [ln.split() for ln in capsys.readouterr().out.splitlines()]
        assert [verdict, "k.cosine_distance"] in [r[:2] for r in rows], rows
