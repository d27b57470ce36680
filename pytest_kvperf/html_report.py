"""--kvperf-report=PATH.html: one self-contained page (plots inlined) plus PATH.json beside it."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .compare import change_line
from .report import key_metric, verdict_counts

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left}th{background:#f2f2f2}
.regressed,.invalid,.failed,.error,.lost{background:#fde2e2}.improved{background:#e2f5e2}
.new{background:#e8eefc}.na{color:#777}
"""


def _plot_changes(results) -> str | None:
    """Bar chart of now/baseline per compared metric (1.0 = unchanged), as a PNG data URI."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = []
    for r in results:
        for c in r.changes:
            if c.base:
                rows.append((f"{r.nodeid.split('::', 1)[-1]} {c.name}", c.value / c.base,
                             c.status))
    if not rows:
        return None
    colours = {"regressed": "#d9534f", "improved": "#5cb85c", "ok": "#8899aa"}
    height = max(2.5, 0.28 * len(rows) + 1)
    fig, ax = plt.subplots(figsize=(10, height))
    ax.barh(range(len(rows)), [v for _, v, _ in rows],
            color=[colours.get(s, "#8899aa") for _, _, s in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("this run / baseline (1.0 = unchanged; direction per metric in the table)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render(session) -> str:
    esc = html.escape
    results = sorted(session.results.values(), key=lambda r: r.nodeid)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kvperf report</title>",
        f"<style>{_STYLE}</style></head><body><h1>pytest-kvperf report</h1>",
        f"<p>Hardware: {esc(session.real_hw.describe())}. Baseline file: "
        f"{esc(str(session.baseline_file(session.real_hw.key)))}.</p>",
        f"<p>Verdicts: {esc(verdict_counts(session))}</p>",
    ]
    plot = _plot_changes(results)
    if plot:
        parts.append(f"<h2>This run against the baseline</h2><img src='{plot}' alt='changes'>")
    parts.append("<h2>Tests</h2><table><tr><th>verdict</th><th>test</th>"
                 "<th>key metric: baseline → now</th><th>reason</th></tr>")
    for r in results:
        change = key_metric(r)
        css = {"lost coverage": "lost", "n/a": "na", "ran (no metrics)": "ran"}.get(
            r.status, r.status)
        parts.append(
            f"<tr class='{esc(css)}'><td>{esc(r.status)}</td><td>{esc(r.nodeid)}</td>"
            f"<td>{esc(change_line(change)) if change else ''}</td>"
            f"<td>{esc(r.hw_skip_reason or r.skip_reason)}</td></tr>"
        )
    parts.append("</table><h2>Skipped, by reason</h2><table><tr><th>tests</th><th>reason</th></tr>")
    for reason, nodeids in session.skip_groups().items():
        parts.append(f"<tr><td>{len(nodeids)}</td><td>{esc(reason)}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write(session, path: str) -> Path:
    """Write the page and, beside it, the machine-readable results (same name, .json)."""
    page = Path(path)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(session))
    results = page.with_suffix(".json")
    session.write_json(results)
    return results
