"""The `kvperf` command: look at skip decisions, baselines and several hosts' runs without
running a test.

    kvperf show [--hw PROFILE] [-m EXPR] [-k EXPR] [-v] [PATH ...]
    kvperf diff A B [--changed] [-v]          A, B: baseline files, or PATH@REV (git)
    kvperf explain NODEID [--hw PROFILE]
    kvperf merge RESULTS.json ... -o report.html [--baselines DIR] [--trend FILE|DIR ...]

`show` and `explain` collect with pytest (`--collect-only`, this project's plugin and
conftests, so `-m` selects as a run would) and decide the skips for the named profile
itself, as that GPU would: on a CPU, `--hw b200` lists what a B200 would run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from . import baseline_diff, baselines, html_report, report_model, trend
from .arch_selection import architectures_for, requirement_marks
from .bench_fixture import BENCHMARK_SELECTION_REASONS
from .hardware import PROFILES, UnknownProfileError, detect, named_profile
from .markers import skip_reasons
from .node_ids import match_moved

HW_PREFIX = "hw_skip_reason: "  # the plugin's own skip marks, decided for the real machine


class _Collector:
    """A pytest plugin that keeps what collection selected (after every plugin's hooks)."""

    def __init__(self):
        self.items, self.deselected, self.baseline_dir = [], 0, None

    def pytest_deselected(self, items):
        self.deselected += len(items)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        from .session import KvperfSession

        self.items = list(session.items)
        self.baseline_dir = KvperfSession(session.config).baseline_dir


def collect(args: list[str]) -> tuple[int, _Collector, str]:
    """(pytest's exit code, what it selected, what it printed) for `--collect-only args`."""
    collector = _Collector()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args],
                           plugins=[collector])
    return int(code), collector, out.getvalue()


def _profile(spec: str | None):
    return named_profile(spec) if spec else detect()


def other_skip(item) -> str | None:
    """A skip that is not about hardware: a static skip, a true skipif, a benchmark option."""
    for mark in item.iter_markers("skip"):
        reason = mark.kwargs.get("reason", mark.args[0] if mark.args else "unconditional skip")
        if not str(reason).startswith(HW_PREFIX):
            return str(reason) + (" (a selection, like -k)"
                                  if reason in BENCHMARK_SELECTION_REASONS else "")
    for mark in item.iter_markers("skipif"):
        if mark.args and mark.args[0] is True:
            return str(mark.kwargs.get("reason", "skipif(True)"))
    return None


def decide(item, profile) -> str | None:
    """Why the item would skip on `profile` (None: it would run); as that GPU would decide."""
    try:
        reasons = skip_reasons(requirement_marks(item), profile, profile)
    except ValueError as exc:
        return f"bad mark: {exc}"
    return "; ".join(reasons) or other_skip(item)


def _collect_or_fail(args) -> _Collector:
    code, collector, out = collect(args)
    if code not in (0, 5):  # 5: nothing selected, which show reports as such
        sys.stdout.write(out)
        raise SystemExit(code)
    return collector


def cmd_show(ns) -> int:
    profile = _profile(ns.hw)
    args = [*(["-m", ns.m] if ns.m else []), *(["-k", ns.k] if ns.k else []),
            *(["--kvperf-hw", ns.hw] if ns.hw else []), *ns.paths]
    collector = _collect_or_fail(args)
    run, skip = [], defaultdict(list)
    for item in collector.items:
        why = decide(item, profile)
        (skip[why] if why else run).append(item.nodeid)
    print(f"kvperf show: skip decisions for {profile.describe()}"
          + (f"; -m {ns.m!r}" if ns.m else "") + (f"; -k {ns.k!r}" if ns.k else ""))
    print("(requires(...) marks are checked against this machine's packages)")
    total = len(collector.items) + collector.deselected
    print(f"selected {len(collector.items)} of {total} tests "
          f"({collector.deselected} deselected)")
    print(f"\nwould run: {len(run)}")
    _print_ids(run, ns.verbose)
    n_skip = sum(len(v) for v in skip.values())
    print(f"\nwould skip: {n_skip}" + (", by reason:" if skip else ""))
    for why, ids in sorted(skip.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(ids):4d} x {why}")
        if ns.verbose:
            print("\n".join(f"         {i}" for i in sorted(ids)))
    return 0


def _print_ids(ids, verbose: bool) -> None:
    if verbose:
        print("\n".join(f"  {i}" for i in sorted(ids)))
        return
    for path, n in sorted(Counter(i.partition("::")[0] for i in ids).items()):
        print(f"  {n:4d} x {path}")


def cmd_diff(ns) -> int:
    old_name, old = baseline_diff.read_spec(ns.old)
    new_name, new = baseline_diff.read_spec(ns.new)
    d = baseline_diff.diff_files(old, new, old_name, new_name)
    print("\n".join(baseline_diff.format_diff(d, changed_only=ns.changed, verbose=ns.verbose)))
    return 0


def _entry_lines(entry: baselines.Entry) -> list[str]:
    if not entry.measured:
        return [f"    n/a: {entry.hw_skip_reason} (recorded {entry.recorded or '?'})"]
    lines = [f"    measured, recorded {entry.recorded or '?'}; versions: "
             + ", ".join(f"{k} {v}" for k, v in sorted(entry.versions.items()) if v)]
    for name, m in sorted(entry.metrics.items()):
        unit = f" {m.unit}" if m.unit else ""
        spread = (f", median of {m.spread.n} (q1 {m.spread.q1:.4g}, q3 {m.spread.q3:.4g})"
                  if m.spread else "")
        lines.append(f"    {name} = {m.value:.6g}{unit} [{m.kind}, {m.better} is better; "
                     f"rtol {m.rtol:g}, atol {m.atol:g}{spread}]")
    return lines


def cmd_explain(ns) -> int:
    code, collector, out = collect([ns.nodeid, *(["--kvperf-hw", ns.hw] if ns.hw else [])])
    items = [i for i in collector.items if i.nodeid == ns.nodeid] or collector.items[:1]
    print(ns.nodeid)
    if not items:
        print(f"  not collected here (pytest exit {code}): "
              + (out.strip().splitlines() or [""])[-1])
    else:
        item = items[0]
        marks = requirement_marks(item)
        print("  needs: " + (", ".join(_mark_text(m) for m in marks) or "nothing marked "
                             "(runs anywhere)"))
        print("  -m selects it under: " + (", ".join(architectures_for(marks)) or "none "
                                           "of sm90, sm100, sm121"))
        here = detect()
        why = decide(item, here)
        print(f"  here ({here.describe()}): " + (f"skips: {why}" if why else "runs"))
        if ns.hw:
            profile = named_profile(ns.hw)
            why = decide(item, profile)
            print(f"  on {profile.describe()}: " + (f"skips: {why}" if why else "runs"))
        print("  on each named profile:")
        for name in sorted(PROFILES):
            why = decide(item, named_profile(name))
            print(f"    {name:<8} " + (f"skips: {why}" if why else "runs"))
    folder = Path(ns.baselines) if ns.baselines else collector.baseline_dir or Path("baselines")
    print(f"  baselines ({folder}):")
    files = baselines.validate_directory(folder) if folder.is_dir() else {}
    if not files:
        print("    no baseline files")
    for key, f in files.items():
        nodeid = ns.nodeid
        if nodeid not in f.entries:
            nodeid = {v: k for k, v in match_moved(f.entries, [ns.nodeid]).items()}.get(
                ns.nodeid, nodeid)
        entry = f.entries.get(nodeid)
        print(f"  {key}.json" + (f" (stored under its old id {nodeid})"
                                 if nodeid != ns.nodeid else "") + ":")
        print("\n".join(_entry_lines(entry)) if entry else "    no entry")
    return 0


def _mark_text(mark) -> str:
    name, args, kwargs = mark
    inner = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    return f"{name}({inner})" if inner else name


def _trend_files(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) + sorted(p.glob("*/*.json")) if p.is_dir() else [p]
    return files


def format_review(model) -> list[str]:
    lines = []
    for run in model["runs"]:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(
            run["counts"].items(), key=lambda kv: report_model._RANK.get(kv[0], 99)))
        lines.append(f"{run['label']} [{run['key']}]: {counts}")
    review = model["review"] or []
    lines += ["", f"review of baseline changes: {len(review)}"
              + ("" if review else " (every compared metric is ok)")]
    for r in review:
        change = "" if r["base"] is None and r["value"] is None else (
            f" {r['value']:.6g} (new)" if r["base"] is None
            else f" {r['base']:.6g} -> {r['value']:.6g}")
        lines.append(f"  {r['status']:<13} {r['gpu']}: {r['nodeid']}"
                     + (f" {r['metric']}" if r["metric"] else "") + change
                     + (f"  ({r['detail']})" if r["detail"] and r["status"] != "new" else ""))
    return lines


def cmd_merge(ns) -> int:
    runs = [report_model.load_input(p) for p in ns.results]
    folder = Path(ns.baselines)
    files = baselines.validate_directory(folder) if folder.is_dir() else {}
    trend_files = _trend_files(ns.trend)
    series, problems = trend.read_runs(trend_files)
    model = report_model.build(runs, files, series, problems,
                               [str(p) for p in ns.trend], with_review=True,
                               title=f"pytest-kvperf: {len(runs)} runs merged")
    html_report.write_page(model, ns.output)
    print("\n".join(format_review(model)))
    print(f"\nreport: {ns.output} ({len(runs)} runs, {len(files)} baseline files from "
          f"{folder}, {len(trend_files)} saved runs)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvperf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="what would run and what would skip, and why")
    s.add_argument("--hw", metavar="PROFILE", help="decide for a named profile "
                   f"({', '.join(sorted(PROFILES))}; xN for N GPUs); default: this machine")
    s.add_argument("-m", metavar="EXPR", help="pytest's -m expression (e.g. sm100)")
    s.add_argument("-k", metavar="EXPR", help="pytest's -k expression")
    s.add_argument("-v", "--verbose", action="store_true", help="list every node id")
    s.add_argument("paths", nargs="*", help="test paths (default: the ini's testpaths)")
    s.set_defaults(func=cmd_show)
    d = sub.add_parser("diff", help="two baseline files (or PATH@REV) per test and metric")
    d.add_argument("old", help="baseline file, or PATH@GITREV")
    d.add_argument("new", help="baseline file, or PATH@GITREV")
    d.add_argument("--changed", action="store_true", help="leave out ok metrics")
    d.add_argument("-v", "--verbose", action="store_true",
                   help="list unpaired tests one by one")
    d.set_defaults(func=cmd_diff)
    e = sub.add_parser("explain", help="why a test skips, and what its baselines hold")
    e.add_argument("nodeid")
    e.add_argument("--hw", metavar="PROFILE", help="also decide for this named profile")
    e.add_argument("--baselines", metavar="DIR", help="default: the plugin's baseline folder")
    e.set_defaults(func=cmd_explain)
    m = sub.add_parser("merge", help="several hosts' results into one report and review")
    m.add_argument("results", nargs="+", help="results JSONs (--kvperf-json, the report's "
                   ".json) or baseline files (their stored state)")
    m.add_argument("-o", "--output", required=True, metavar="PATH.html")
    m.add_argument("--baselines", default="baselines", metavar="DIR",
                   help="baseline files for the per-GPU comparison (default: baselines)")
    m.add_argument("--trend", nargs="*", default=[], metavar="FILE|DIR",
                   help="saved runs: pytest-benchmark autosaves (.benchmarks), results JSONs")
    m.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (baselines.BaselineError, report_model.InputError, UnknownProfileError) as exc:
        print(f"kvperf {ns.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
