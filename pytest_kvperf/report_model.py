"""What the HTML report shows, as plain data: built from results documents (this run's, or
several hosts' for `kvperf merge`), the baseline files and the saved runs.

`html_report` only renders this; the CLI's merge and the plugin build it the same way.
A run is a results document (`KvperfSession.results_document()`, `--kvperf-json`); a
baseline file given to `kvperf merge` stands for its GPU's stored state (status `stored`).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

from . import baselines
from .compare import MetricChange
from .node_ids import canonical_ids
from .report import STATUS_ORDER, key_metric
from .trend import Point

# what the report lists first, and what counts as a failure with a message
CHANGED = ("invalid", "regressed", "unreliable", "improved")
FAILED = ("invalid", "regressed", "failed", "error", "interrupted")
_RANK = {s: i for i, s in enumerate((*STATUS_ORDER, "stored"))}


class InputError(ValueError):
    """A file given to the report that is neither a results JSON nor a baseline file."""


# ------------------------------------------------------------------ inputs


def run_from_results(doc: dict, source: str) -> dict:
    hw = doc.get("hardware") or {}
    return {"label": hw.get("name") or hw.get("key") or source, "key": hw.get("key", ""),
            "source": source, "stored": False, "doc": doc}


def run_from_baseline(path: str, file: baselines.BaselineFile) -> dict:
    """A baseline file as a run: each measured entry 'stored', each n/a entry 'n/a'."""
    gpu = file.gpu or {}
    tests = {}
    for nodeid, e in file.entries.items():
        tests[nodeid] = {
            "status": "stored" if e.measured else "n/a", "outcome": None,
            "hw_skip_reason": e.hw_skip_reason or None, "skip_reason": None,
            "gpu_key": gpu.get("key"), "changes": [], "info": {}, "message": None,
            "metrics": {k: m.to_dict() for k, m in e.metrics.items()},
        }
    recorded = sorted(e.recorded for e in file.entries.values() if e.recorded)
    doc = {"hardware": {"name": gpu.get("name"), "key": gpu.get("key") or Path(path).stem,
                        "sm": gpu.get("sm"), "versions": file.versions},
           "summary": dict(Counter(t["status"] for t in tests.values())),
           "run": {"date": recorded[-1] if recorded else None,
                   "recorded from": recorded[0] if recorded else None},
           "tests": tests}
    return {"label": f"{gpu.get('name') or Path(path).stem} (baseline file)",
            "key": doc["hardware"]["key"], "source": path, "stored": True, "doc": doc}


def load_input(path: str) -> dict:
    """A run from a results JSON or a baseline file; InputError names a file of neither kind."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as JSON: {exc}") from None
    if isinstance(data, dict) and str(data.get("schema", "")).startswith(
            "pytest-kvperf/baselines/"):
        return run_from_baseline(path, baselines.decode(Path(path), data))
    if isinstance(data, dict) and isinstance(data.get("tests"), dict) and "hardware" in data:
        return run_from_results(data, path)
    raise InputError(f"{path}: neither a results JSON (--kvperf-json, --kvperf-report's .json) "
                     "nor a baseline file")


# ------------------------------------------------------------------ the log ratio


def _goodness(ratio: float, better: str) -> float:
    """value/base turned so that > 1 is better: a 15x speed-up of a time is 15."""
    if better == "lower":
        return math.inf if ratio == 0 else 1.0 / ratio
    return ratio


def ratio_view(change: dict) -> dict | None:
    """This run against its baseline as a 'x better' factor with the verdict's interval.

    good: the factor (> 1 better, < 1 worse); band: the factors the verdict calls ok
    (speed: the median ratio within rtol; otherwise value within rtol*|base| + atol);
    ci: the verdict's confidence interval of the median ratio (the change's 'ci' field:
    speed with spreads) or None, also for a results JSON written before that field existed;
    confidence: its level in percent. None when there is no baseline or the ratio means
    nothing (a negative baseline).
    """
    base, value, better = change.get("base"), change["value"], change["better"]
    if base is None or base < 0 or value < 0:
        return None
    rtol, atol = float(change.get("rtol") or 0), float(change.get("atol") or 0)
    interval = change.get("ci")
    if base == 0:
        good = 1.0 if value == 0 else (0.0 if better == "lower" else math.inf)
        return {"good": good, "band": (0.0, math.inf) if value <= atol else (1.0, 1.0),
                "ci": None, "confidence": None}
    good = _goodness(value / base, better)
    if interval:
        ci = sorted((_goodness(interval["low"], better), _goodness(interval["high"], better)))
        band = sorted((_goodness(1 + rtol, better), _goodness(max(1 - rtol, 0.0), better)))
        return {"good": good, "band": tuple(band), "ci": tuple(ci),
                "confidence": interval["confidence"] * 100}
    slack = (rtol * abs(base) + atol) / base
    band = sorted((_goodness(1 + slack, better), _goodness(max(1 - slack, 0.0), better)))
    return {"good": good, "band": tuple(band), "ci": None, "confidence": None}


def describe_view(view: dict) -> str:
    """'1.30x worse, 99% CI 1.26x-1.34x worse; ok within 0.95x-1.05x'."""
    def factor(g: float) -> str:
        if g == 0 or math.isinf(g):
            return "no finite ratio"
        if abs(g - 1) < 5e-4:
            return "unchanged"
        return f"{g:.3g}x better" if g > 1 else f"{1 / g:.3g}x worse"

    text = factor(view["good"])
    if view["ci"]:
        lo, hi = view["ci"]
        text += f", {view['confidence']:g}% CI {factor(lo)} .. {factor(hi)}"
    lo, hi = view["band"]
    if lo != hi:
        text += f"; ok from {factor(lo)} to {factor(hi)}"
    return text


def scale_for(views) -> int:
    """Half-width of the shared log2 axis: the largest finite factor, 2x to 256x."""
    logs = [0.0]
    for v in views:
        for g in (v["good"], *(v["ci"] or ())):
            if g > 0 and math.isfinite(g):
                logs.append(abs(math.log2(g)))
    return int(min(8, max(1, math.ceil(max(logs) - 1e-9))))


# ------------------------------------------------------------------ environment


def environment(run: dict) -> list[tuple[str, str]]:
    """(label, text) pairs for the header: GPU, driver/clocks when known, versions, commit."""
    doc = run["doc"]
    hw = doc.get("hardware") or {}
    rows = [("GPU", f"{hw.get('name') or '?'} ({hw.get('sm') or '?'})"
             + (f" x{hw['gpu_count']}" if (hw.get("gpu_count") or 0) > 1 else ""))]
    if hw.get("memory_bytes"):
        rows.append(("memory", f"{hw['memory_bytes'] / 2**30:.0f} GiB"))
    known = {"name", "key", "sm", "compute_capability", "sm_count", "memory_bytes", "l2_bytes",
             "gpu_count", "features", "injected_from", "versions"}
    for name, value in hw.items():  # driver, clocks, ... (whatever the run recorded)
        if name not in known and value not in (None, "", {}, []):
            rows.append((name, _flat(value)))
    for name in ("nvml", "gpu_facts", "clocks", "driver"):
        if doc.get(name):
            rows.append((name, _flat(doc[name])))
    peaks = doc.get("peaks") or {}
    device = [f"{k} {v:.5g}" for k, v in peaks.items() if isinstance(v, (int, float))]
    if device:
        rows.append(("measured peaks", ", ".join(device)))
    links = peaks.get("link_gbps") or {}
    if links:
        rows.append(("link peaks", ", ".join(f"{k} {v:.5g} GB/s" for k, v in links.items())))
    versions = {k: v for k, v in (hw.get("versions") or {}).items() if v}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    for name, value in (doc.get("run") or {}).items():
        if value:
            rows.append((name, str(value)))
    if doc.get("decision_profile"):
        rows.append(("skip decisions for", str(doc["decision_profile"].get("name"))))
    rows.append(("source", run["source"]))
    return rows


def _flat(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_flat(v)}" for k, v in value.items() if v not in (None, ""))
    if isinstance(value, (list, tuple)):
        return ", ".join(_flat(v) for v in value)
    return str(value)


# ------------------------------------------------------------------ per-GPU comparison


def _peak_metrics(entry_metrics: dict) -> dict[str, dict]:
    """{label: {frac, us, gbps}} for each timed thing of a test that has a fraction of peak."""
    out = {}
    for name, m in entry_metrics.items():
        if name == "frac_of_peak_bw" or name.endswith(".frac_of_peak_bw"):
            label = name[: -len(".frac_of_peak_bw")] if "." in name else ""
            prefix = f"{label}." if label else ""
            us = entry_metrics.get(f"{prefix}median_us")
            gbps = entry_metrics.get(f"{prefix}gbps")
            out[label] = {"frac": m.value, "us": us.value if us else None,
                          "gbps": gbps.value if gbps else None}
    return out


def gpu_comparison(files: dict[str, baselines.BaselineFile]) -> dict:
    """Every baseline file side by side: fraction of peak per kernel (test, and label)."""
    def newest(item):
        return max((e.recorded for e in item[1].entries.values() if e.recorded), default="")

    ordered = sorted(files.items(), key=newest, reverse=True)
    ids = canonical_ids([(key, f.entries) for key, f in ordered])
    columns, without, rows, moved = [], [], defaultdict(dict), {}
    for key, f in sorted(files.items()):
        found = False
        for nodeid, e in f.entries.items():
            if not e.measured:
                continue
            shown = ids[key][nodeid]
            for label, cell in _peak_metrics(e.metrics).items():
                found = True
                rows[(shown, label)][key] = {**cell, "id": nodeid}
        n_moved = sum(a != b for a, b in ids[key].items())
        if found:
            columns.append({"key": key, "name": f.gpu.get("name") or key,
                            "sm": f.gpu.get("sm") or ""})
            if n_moved:
                moved[key] = n_moved
        else:
            without.append(key)
    return {"columns": columns, "without": without, "moved": moved,
            # kernels measured on several GPUs first: those are the comparison
            "rows": [{"nodeid": k[0], "label": k[1], "cells": v}
                     for k, v in sorted(rows.items(), key=lambda kv: (-len(kv[1]), kv[0]))]}


# ------------------------------------------------------------------ the page's data


def _test_rows(run: dict, multi: bool):
    for nodeid, t in run["doc"]["tests"].items():
        changes = [MetricChange.from_dict(c) for c in t.get("changes") or ()]
        key = key_metric(SimpleNamespace(changes=changes)) if changes else None
        view = ratio_view(key.to_dict()) if key else None
        yield {"gpu": run["key"], "gpu_label": run["label"], "nodeid": nodeid,
               "status": t.get("status") or t.get("outcome") or "?",
               "key": key.to_dict() if key else None, "view": view,
               "stored": _stored_text(t) if run["stored"] else "",
               "reason": t.get("hw_skip_reason") or t.get("skip_reason") or "",
               "message": t.get("message") or "", "changes": [c.to_dict() for c in changes]}


def _stored_text(test: dict) -> str:
    metrics = test.get("metrics") or {}
    for name in ("frac_of_peak_bw", "median_us"):
        if name in metrics:
            m = metrics[name]
            return f"{name} {m['value']:.4g}{' ' + m['unit'] if m.get('unit') else ''}"
    if metrics:
        name, m = next(iter(sorted(metrics.items())))
        return f"{name} {m['value']:.4g} (+{len(metrics) - 1} more)" if len(metrics) > 1 \
            else f"{name} {m['value']:.4g}"
    return ""


def review(runs: list[dict]) -> list[dict]:
    """What --update-baselines would change, per host: each regressed, improved, invalid or
    new metric and each test that lost coverage (for `kvperf merge`'s review)."""
    out = []
    for run in runs:
        if run["stored"]:
            continue
        for nodeid, t in sorted(run["doc"]["tests"].items()):
            if t.get("status") == "lost coverage":
                out.append({"gpu": run["key"], "nodeid": nodeid, "metric": "",
                            "status": "lost coverage", "base": None, "value": None,
                            "detail": t.get("hw_skip_reason") or t.get("skip_reason") or ""})
            for c in t.get("changes") or ():
                if c["status"] in ("regressed", "improved", "invalid", "unreliable", "new"):
                    out.append({"gpu": run["key"], "nodeid": nodeid, "metric": c["name"],
                                "status": c["status"], "base": c["base"], "value": c["value"],
                                "detail": c.get("detail") or ""})
    rank = {"invalid": 0, "regressed": 1, "lost coverage": 2, "unreliable": 3, "improved": 4,
            "new": 5}
    return sorted(out, key=lambda r: (rank[r["status"]], r["gpu"], r["nodeid"], r["metric"]))


def _trend_rows(runs, series: dict[tuple[str, str], list[Point]]) -> list[dict]:
    rows = []
    for run in runs:
        if run["stored"]:
            continue
        current = {}
        for nodeid, t in run["doc"]["tests"].items():
            for name, m in (t.get("metrics") or {}).items():
                if name == "median_us" or name.endswith(".median_us"):
                    label = name[: -len(".median_us")] if "." in name else ""
                    current[f"{nodeid}[{label}]" if label else nodeid] = m["value"]
        for (key, name), points in sorted(series.items()):
            if key != run["key"]:
                continue
            now = current.get(name)
            pts = [{"date": p.date, "us": p.median_us, "commit": p.commit} for p in points]
            if now is not None and not (pts and math.isclose(pts[-1]["us"], now,
                                                             rel_tol=1e-9)):
                pts.append({"date": "this run", "us": now, "commit": ""})
            rows.append({"gpu": run["key"], "name": name, "points": pts})
    return rows


def build(runs: list[dict], files: dict[str, baselines.BaselineFile],
          series: dict | None = None, trend_problems=(), trend_sources=(),
          with_review: bool = False, title: str = "pytest-kvperf report") -> dict:
    multi = len(runs) > 1
    tests = [row for run in runs for row in _test_rows(run, multi)]
    tests.sort(key=lambda r: (_RANK.get(r["status"], 99), r["nodeid"], r["gpu"]))
    changed = []
    for row in tests:
        if row["status"] not in CHANGED:
            continue
        for c in row["changes"]:
            changed.append({**row, "metric": c, "metric_view": ratio_view(c)})
    changed.sort(key=lambda r: (_RANK.get(r["metric"]["status"], 99), r["nodeid"]))
    views = [r["view"] for r in tests if r["view"]]
    views += [r["metric_view"] for r in changed if r["metric_view"]]
    counts = Counter(r["status"] for r in tests)
    skips = defaultdict(list)
    for r in tests:
        if r["status"] in ("n/a", "skipped", "lost coverage") and r["reason"]:
            skips[(r["gpu"], r["status"] == "lost coverage", r["reason"])].append(r["nodeid"])
    return {
        "title": title, "multi": multi,
        "runs": [{"label": run["label"], "key": run["key"], "stored": run["stored"],
                  "env": environment(run),
                  "counts": Counter(t.get("status") for t in run["doc"]["tests"].values())}
                 for run in runs],
        "counts": [(s, counts[s]) for s in sorted(counts, key=lambda s: _RANK.get(s, 99))],
        "scale": scale_for(views),
        "tests": tests, "changed": changed,
        "failures": [r for r in tests if r["status"] in FAILED and r["message"]],
        "skips": [{"gpu": g, "lost": lost, "reason": reason, "nodeids": sorted(ids)}
                  for (g, lost, reason), ids in sorted(skips.items(),
                                                       key=lambda kv: (-len(kv[1]), kv[0]))],
        "gpus": gpu_comparison(files),
        "trend": _trend_rows(runs, series or {}),
        "trend_problems": list(trend_problems), "trend_sources": list(trend_sources),
        "review": review(runs) if with_review else None,
    }
