"""--kvperf-report=PATH.html (and `kvperf merge`): one self-contained page, PATH.json beside it.

No network and no plotting library: inline CSS, SVG and a little JavaScript (filter by
verdict, search, sort by any column; without JavaScript every row is shown). What it
shows is built by `report_model`; this module only draws it:

- a header with each run's environment (GPU, driver and clocks where recorded, versions,
  commit, date) and the verdict counts, which are also the verdict filters;
- regressed and improved tests first, each metric as a log ratio against its baseline
  ("x better / x worse" on one log2 axis) with the verdict's interval: the band the
  verdict calls ok and, for speed, the confidence interval of the median ratio;
- every test (its key metric the same way), failures with their messages, skips grouped
  by reason (only when there are any);
- the baseline files side by side: fraction of the measured copy peak per kernel;
- a trend over saved runs (pytest-benchmark autosaves, results JSONs).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from . import baselines, jsonfile, report_model, trend
from .compare import change_line

_COLOURS = {"regressed": "#c62828", "invalid": "#6a1b9a", "failed": "#c62828",
            "error": "#c62828", "interrupted": "#c62828", "lost coverage": "#e65100",
            "unreliable": "#f9a825", "improved": "#2e7d32", "new": "#1565c0", "ok": "#546e7a",
            "stored": "#546e7a"}

_STYLE = """
:root{--fg:#1d2329;--muted:#66707a;--line:#d9dee3;--head:#f3f5f7}
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:var(--fg)}
main{padding:0 24px 40px}header{padding:16px 24px 8px;border-bottom:1px solid var(--line)}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:28px 0 6px}
.sub{color:var(--muted);font-size:12px;margin:0 0 8px}
table{border-collapse:collapse;margin:6px 0}td,th{border-bottom:1px solid var(--line);
padding:3px 8px;text-align:left;vertical-align:top;font-size:13px}
th{background:var(--head);position:sticky;top:44px;z-index:1}
th.sortable{cursor:pointer;user-select:none}th.sortable:after{content:" \\2195";color:#aab}
table.env th{position:static}table.env td{max-width:560px}
td.id{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere;
min-width:260px;max-width:560px}td.num{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap}td.why{color:var(--muted);font-size:12px;max-width:420px}
.st{display:inline-block;padding:0 6px;border-radius:8px;color:#fff;font-size:12px;
white-space:nowrap;background:#90a4ae}
#bar{position:sticky;top:0;z-index:2;background:#fff;padding:8px 24px;
border-bottom:1px solid var(--line);display:flex;gap:6px;flex-wrap:wrap;align-items:center}
#bar input{font-size:13px;padding:3px 8px;width:320px}
.chip{border:1px solid var(--line);background:#fff;border-radius:12px;padding:2px 10px;
font-size:12px;cursor:pointer}.chip.off{opacity:.35;text-decoration:line-through}
.none{color:var(--muted)}pre{background:#f7f7f7;border:1px solid var(--line);padding:8px;
overflow:auto;max-height:320px;font-size:12px;white-space:pre-wrap}
details{margin:4px 0}summary{cursor:pointer}.count{color:var(--muted);font-weight:normal;
font-size:13px}svg text{font:10px system-ui,sans-serif;fill:#555}
"""

_SCRIPT = """
(function(){
  var hidden = {}, query = '';
  function apply(){
    document.querySelectorAll('table.filterable').forEach(function(t){
      var shown = 0, rows = t.tBodies[0].rows;
      for (var i = 0; i < rows.length; i++){
        var r = rows[i], st = r.getAttribute('data-status');
        var ok = !(st && hidden[st]) && (!query ||
                 r.textContent.toLowerCase().indexOf(query) >= 0);
        r.style.display = ok ? '' : 'none'; if (ok) shown++;
      }
      var c = document.getElementById(t.id + '-count');
      if (c) c.textContent = shown === rows.length ? '(' + rows.length + ')'
                                                   : '(' + shown + ' of ' + rows.length + ')';
    });
  }
  document.getElementById('kv-search').addEventListener('input', function(e){
    query = e.target.value.trim().toLowerCase(); apply(); });
  document.querySelectorAll('.chip[data-status]').forEach(function(b){
    b.addEventListener('click', function(){
      var s = b.getAttribute('data-status'); hidden[s] = !hidden[s];
      document.querySelectorAll('.chip[data-status="' + s + '"]').forEach(function(o){
        o.classList.toggle('off', !!hidden[s]); });
      apply(); });
  });
  document.querySelectorAll('th.sortable').forEach(function(th){
    th.addEventListener('click', function(){
      var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
      var dir = th.getAttribute('data-dir') === 'asc' ? -1 : 1;
      th.setAttribute('data-dir', dir === 1 ? 'asc' : 'desc');
      var rows = Array.prototype.slice.call(body.rows);
      function key(r){ var c = r.cells[col]; if (!c) return '';
        var v = c.getAttribute('data-sort'); return v === null ? c.textContent : v; }
      rows.sort(function(a, b){
        var x = key(a), y = key(b), fx = parseFloat(x), fy = parseFloat(y);
        if (!isNaN(fx) && !isNaN(fy) && String(fx) === x.trim() && String(fy) === y.trim())
          return (fx - fy) * dir;
        return x.localeCompare(y) * dir; });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
  // report.html#q=decode&hide=ok,n/a: a link that opens the page filtered
  var hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get('q')) { query = hash.get('q').toLowerCase();
                       document.getElementById('kv-search').value = hash.get('q'); }
  (hash.get('hide') || '').split(',').forEach(function(s){ if (s) { hidden[s] = true;
    document.querySelectorAll('.chip[data-status="' + s + '"]').forEach(function(o){
      o.classList.add('off'); }); } });
  apply();
})();
"""

_W, _H, _PAD = 240, 18, 8  # the log-ratio strip


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _id(nodeid: str) -> str:
    """A node id that wraps at its natural joints (/, ::, [, -) instead of mid-word."""
    text = _esc(nodeid)
    for joint in ("/", "::", "[", "-"):
        text = text.replace(joint, joint + "<wbr>")
    return text


def _first_line(message: str) -> str:
    """The line of a failure that says what failed: pytest's first 'E ' line, else the first."""
    lines = [ln for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("E "):
            return ln[1:].strip()
    return lines[0].strip() if lines else ""


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4g}"


def _status(status: str) -> str:
    colour = _COLOURS.get(status, "#90a4ae")
    return f"<span class='st' style='background:{colour}'>{_esc(status)}</span>"


def _x(good: float, scale: int) -> float:
    if good <= 0:
        lg = -scale
    elif math.isinf(good):
        lg = scale
    else:
        lg = max(-scale, min(scale, math.log2(good)))
    return _PAD + (lg + scale) / (2 * scale) * (_W - 2 * _PAD)


def strip(view: dict | None, status: str, scale: int) -> str:
    """One metric as an inline SVG on the shared log2 axis: ok band, interval, value."""
    if not view:
        return ""
    colour = _COLOURS.get(status, "#546e7a")
    mid = _H / 2
    lo, hi = (_x(g, scale) for g in view["band"])
    parts = [f"<svg width='{_W}' height='{_H}' role='img'><title>"
             f"{_esc(report_model.describe_view(view))}</title>",
             f"<line x1='{_PAD}' y1='{mid}' x2='{_W - _PAD}' y2='{mid}' stroke='#ccd'/>",
             f"<rect x='{lo:.1f}' y='3' width='{max(hi - lo, 1):.1f}' height='{_H - 6}' "
             "fill='#dfe4ea'/>",
             f"<line x1='{_x(1, scale):.1f}' y1='1' x2='{_x(1, scale):.1f}' y2='{_H - 1}' "
             "stroke='#8a949e'/>"]
    if view["ci"]:
        a, b = (_x(g, scale) for g in view["ci"])
        parts.append(f"<line x1='{a:.1f}' y1='{mid}' x2='{max(b, a + 1):.1f}' y2='{mid}' "
                     f"stroke='{colour}' stroke-width='3'/>")
    g = view["good"]
    x = _x(g, scale)
    if g <= 0 or math.isinf(g) or abs(math.log2(g)) > scale:  # off the axis: an arrow
        d = -1 if g < 1 else 1
        parts.append(f"<path d='M{x + 5 * d:.1f} {mid} L{x - 2 * d:.1f} {mid - 5} "
                     f"L{x - 2 * d:.1f} {mid + 5} Z' fill='{colour}'/>")
    else:
        parts.append(f"<circle cx='{x:.1f}' cy='{mid}' r='4' fill='{colour}' "
                     "stroke='#fff' stroke-width='1'/>")
    return "".join(parts) + "</svg>"


def axis(scale: int) -> str:
    """The strip column's header: ticks at powers of two, 'worse' left, 'better' right."""
    step = 1 if scale <= 4 else 2
    parts = [f"<svg width='{_W}' height='24' role='img'><title>log2 axis: this run "
             "against the baseline, better to the right</title>"]
    for lg in range(-scale, scale + 1, step):
        x = _x(2.0 ** lg, scale)
        label = "same" if lg == 0 else (f"{2 ** -lg}x worse" if lg < 0 else f"{2 ** lg}x better")
        parts.append(f"<line x1='{x:.1f}' y1='15' x2='{x:.1f}' y2='22' stroke='#889'/>")
        if lg in (-scale, 0, scale) or scale <= 2:
            anchor = "start" if lg == -scale else "end" if lg == scale else "middle"
            parts.append(f"<text x='{x:.1f}' y='11' text-anchor='{anchor}'>{label}</text>")
    return "".join(parts) + "</svg>"


def _th(names, sortable=True) -> str:
    cls = " class='sortable'" if sortable else ""
    return "<thead><tr>" + "".join(f"<th{cls}>{n}</th>" for n in names) + "</tr></thead>"


def _gpu_cell(row, multi: bool) -> str:
    return f"<td>{_esc(row['gpu'])}</td>" if multi else ""


def _header(model) -> list[str]:
    out = [f"<header><h1>{_esc(model['title'])}</h1>"]
    labels = []
    for run in model["runs"]:
        for label, _ in run["env"]:
            if label not in labels:
                labels.append(label)
    out.append("<table class='env' id='kv-env'><thead><tr><th></th>"
               + "".join(f"<th>{_esc(r['label'])}</th>" for r in model["runs"])
               + "</tr></thead><tbody>")
    for label in labels:
        cells = "".join(f"<td>{_esc(dict(r['env']).get(label, ''))}</td>"
                        for r in model["runs"])
        out.append(f"<tr><th>{_esc(label)}</th>{cells}</tr>")
    out.append("<tr><th>verdicts</th>" + "".join(
        "<td>" + ", ".join(f"{n} {_esc(s)}" for s, n in sorted(
            r["counts"].items(), key=lambda kv: report_model._RANK.get(kv[0], 99))) + "</td>"
        for r in model["runs"]) + "</tr></tbody></table></header>")
    chips = "".join(
        f"<button class='chip' data-status='{_esc(s)}' title='show or hide {_esc(s)}'>"
        f"{_status(s)} {n}</button>" for s, n in model["counts"])
    out.append("<div id='bar'><input id='kv-search' type='search' placeholder="
               "'search tests, metrics, reasons, messages'>"
               f"<span id='kv-counts'>{chips}</span></div>")
    return out


def _changed(model) -> list[str]:
    rows, multi, scale = model["changed"], model["multi"], model["scale"]
    out = ["<section id='kv-changed'><h2>Regressed, unreliable and improved "
           "<span class='count' id='kv-changed-table-count'></span></h2>"
           "<p class='sub'>Each metric of each test that regressed, improved, or whose timing is "
           "unreliable (the GPU throttled), against its stored baseline. The strip is the "
           "factor on a log2 axis, better to the right: the "
           "dot is this run, the grey band is what the verdict calls ok, a bar is the "
           "verdict's confidence interval (speed metrics with a spread).</p>"]
    if not rows:
        out.append("<p class='none'>No test regressed or improved against its baseline.</p>"
                   "</section>")
        return out
    out.append("<table class='filterable' id='kv-changed-table'>"
               + _th(["verdict", *(["GPU"] if multi else []), "test", "metric", "baseline",
                      "this run", axis(scale), "interval"]) + "<tbody>")
    for r in rows:
        c, v = r["metric"], r["metric_view"]
        unit = f" {c.get('unit', '')}" if c.get("unit") else ""
        out.append(
            f"<tr data-status='{_esc(r['status'])}'><td data-sort='{_esc(c['status'])}'>"
            f"{_status(c['status'])}</td>{_gpu_cell(r, multi)}"
            f"<td class='id'>{_id(r['nodeid'])}</td>"
            f"<td>{_esc(c['name'])}<br><span class='sub'>{_esc(c['kind'])}, {_esc(c['better'])}"
            f" is better</span></td><td class='num'>{_fmt(c['base'])}{_esc(unit)}</td>"
            f"<td class='num'>{_fmt(c['value'])}{_esc(unit)}</td>"
            f"<td data-sort='{_sort_good(v)}'>{strip(v, c['status'], scale)}</td>"
            f"<td class='why'>{_esc(report_model.describe_view(v) if v else '')}"
            f"{'<br>' + _esc(c['detail']) if c.get('detail') else ''}</td></tr>")
    out.append("</tbody></table></section>")
    return out


def _sort_good(view) -> str:
    if not view:
        return ""
    g = view["good"]
    return "-1e9" if g <= 0 else "1e9" if math.isinf(g) else f"{math.log2(g):.6g}"


def _tests(model) -> list[str]:
    multi, scale = model["multi"], model["scale"]
    out = ["<section id='kv-tests'><h2>All tests <span class='count' id='kv-tests-table-count'>"
           f"({len(model['tests'])})</span></h2><p class='sub'>Sorted worst first; click a "
           "column to sort, a verdict above to hide it. Key metric: a failing one, else the "
           "first speed metric.</p>",
           "<table class='filterable' id='kv-tests-table'>"
           + _th(["verdict", *(["GPU"] if multi else []), "test", "key metric",
                  axis(scale), "reason / message"]) + "<tbody>"]
    rank = report_model._RANK
    for r in model["tests"]:
        key = r["key"]
        text = change_line(report_model.MetricChange.from_dict(key)) if key else r["stored"]
        why = r["reason"] or _first_line(r["message"])
        out.append(
            f"<tr data-status='{_esc(r['status'])}'>"
            f"<td data-sort='{rank.get(r['status'], 99):02d}'>{_status(r['status'])}</td>"
            f"{_gpu_cell(r, multi)}<td class='id'>{_id(r['nodeid'])}</td>"
            f"<td class='why'>{_esc(text)}</td>"
            f"<td data-sort='{_sort_good(r['view'])}'>"
            f"{strip(r['view'], key['status'] if key else r['status'], scale)}</td>"
            f"<td class='why'>{_esc(why)}</td></tr>")
    out.append("</tbody></table></section>")
    return out


def _failures(model) -> list[str]:
    if not model["failures"]:
        return []
    out = ["<section id='kv-failures'><h2>Failures <span class='count'>"
           f"({len(model['failures'])})</span></h2>"]
    for r in model["failures"]:
        gpu = f" on {_esc(r['gpu'])}" if model["multi"] else ""
        out.append(f"<details open data-status='{_esc(r['status'])}'><summary>"
                   f"{_status(r['status'])} <code>{_esc(r['nodeid'])}</code>{gpu}</summary>"
                   f"<pre>{_esc(r['message'])}</pre></details>")
    out.append("</section>")
    return out


def _skips(model) -> list[str]:
    if not model["skips"]:
        return []  # no empty table
    multi = model["multi"]
    out = ["<section id='kv-skips'><h2>Not run, by reason</h2>",
           "<table class='filterable' id='kv-skips-table'>"
           + _th(["tests", *(["GPU"] if multi else []), "reason", "which"]) + "<tbody>"]
    for s in model["skips"]:
        status = "lost coverage" if s["lost"] else "n/a"
        ids = "".join(f"<div>{_esc(i)}</div>" for i in s["nodeids"])
        out.append(f"<tr data-status='{status}'><td class='num'>{len(s['nodeids'])}</td>"
                   f"{_gpu_cell(s, multi)}<td>{_status(status) if s['lost'] else ''} "
                   f"{_esc(s['reason'])}</td><td class='id'><details><summary>"
                   f"{len(s['nodeids'])} tests</summary>{ids}</details></td></tr>")
    out.append("</tbody></table></section>")
    return out


def _gpus(model) -> list[str]:
    g = model["gpus"]
    out = ["<section id='kv-gpus'><h2>Per GPU: fraction of peak per kernel "
           "<span class='count' id='kv-gpus-table-count'></span></h2><p class='sub'>"
           "Every baseline file side by side. Fraction of the copy bandwidth measured on that "
           "GPU (bytes read + written per second / device-to-device copy rate), with the "
           "median time; above 1 the working set was served from L2.</p>"]
    if not g["columns"]:
        out.append("<p class='none'>No baseline file holds a fraction of peak (GPU runs of "
                   "kv_bench tests record frac_of_peak_bw).</p></section>")
        return out
    top = max([1.0] + [c["frac"] for r in g["rows"] for c in r["cells"].values()])
    out.append("<table class='filterable' id='kv-gpus-table'>" + _th(
        ["kernel", *(f"{_esc(c['name'])}<br><span class='sub'>{_esc(c['key'])}.json, "
                     f"{_esc(c['sm'])}</span>" for c in g["columns"])]) + "<tbody>")
    for row in g["rows"]:
        label = f" &middot; {_esc(row['label'])}" if row["label"] else ""
        cells = []
        for col in g["columns"]:
            c = row["cells"].get(col["key"])
            if c is None:
                cells.append("<td data-sort='-1' class='none'>&ndash;</td>")
                continue
            w = 90 * min(c["frac"], top) / top
            moved = (f"<br><span class='sub'>stored as {_esc(c['id'])}</span>"
                     if c["id"] != row["nodeid"] else "")
            us = f" &middot; {c['us']:.4g} &micro;s" if c["us"] is not None else ""
            cells.append(f"<td data-sort='{c['frac']:.6g}'><svg width='92' height='10'>"
                         f"<rect width='90' height='10' fill='#eef1f4'/><rect width='{w:.1f}'"
                         f" height='10' fill='#3f7fbf'/></svg> {c['frac']:.3f}{us}{moved}</td>")
        out.append(f"<tr><td class='id'>{_id(row['nodeid'])}{label}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    notes = [f"{_esc(k)}.json: {n} tests stored under an older node id (moved to another "
             "file; matched by folder, name and parameters)" for k, n in g["moved"].items()]
    notes += [f"{_esc(k)}.json: no fraction of peak (no GPU)" for k in g["without"]]
    if notes:
        out.append("<p class='sub'>" + "<br>".join(notes) + "</p>")
    out.append("</section>")
    return out


def sparkline(points) -> str:
    w, h, pad = 160, 28, 3
    values = [p["us"] for p in points]
    lo, hi = math.log(min(values)), math.log(max(values))
    span = hi - lo or 1.0
    xs = [pad + i * (w - 2 * pad) / max(len(values) - 1, 1) for i in range(len(values))]
    ys = [h - pad - (math.log(v) - lo) / span * (h - 2 * pad) for v in values]
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    title = "; ".join(f"{p['date']} {p['us']:.4g} us {p['commit']}".strip() for p in points)
    dots = "".join(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='2' fill='#3f7fbf'/>"
                   for x, y in zip(xs, ys, strict=True))
    return (f"<svg width='{w}' height='{h}' role='img'><title>{_esc(title)}</title>"
            f"<polyline points='{pts}' fill='none' stroke='#3f7fbf'/>{dots}</svg>")


def _trend(model) -> list[str]:
    rows, multi = model["trend"], model["multi"]
    out = ["<section id='kv-trend'><h2>Trend over saved runs <span class='count' "
           "id='kv-trend-table-count'></span></h2><p class='sub'>Median time per saved run, "
           "oldest first (log scale; hover for dates and commits). Sources: "
           + (_esc(", ".join(model["trend_sources"])) or "none") + ".</p>"]
    if model["trend_problems"]:
        out.append("<p class='sub'>Not read: " + _esc("; ".join(model["trend_problems"]))
                   + "</p>")
    if not rows:
        out.append("<p class='none'>No saved runs for this GPU: run with "
                   "<code>--benchmark-autosave</code> (pytest-benchmark keeps them per GPU "
                   "under <code>.benchmarks/</code>), or give <code>kvperf merge --trend</code>"
                   " older results JSONs.</p></section>")
        return out
    out.append("<table class='filterable' id='kv-trend-table'>" + _th(
        [*(["GPU"] if multi else []), "timed", "runs", "median time", "first &micro;s",
         "latest &micro;s", "latest / first"]) + "<tbody>")
    for r in rows:
        p = r["points"]
        ratio = p[-1]["us"] / p[0]["us"]
        out.append(f"<tr>{_gpu_cell(r, multi)}<td class='id'>{_id(r['name'])}</td>"
                   f"<td class='num'>{len(p)}</td><td>{sparkline(p)}</td>"
                   f"<td class='num'>{p[0]['us']:.4g}</td><td class='num'>{p[-1]['us']:.4g}"
                   f"</td><td class='num' data-sort='{ratio:.6g}'>{ratio:.3f}</td></tr>")
    out.append("</tbody></table></section>")
    return out


def _review(model) -> list[str]:
    if model["review"] is None:
        return []
    out = ["<section id='kv-review'><h2>Review of baseline changes <span class='count'>"
           f"({len(model['review'])})</span></h2><p class='sub'>What "
           "<code>--update-baselines</code> would change on each host: regressed, improved, "
           "invalid, unreliable (throttled) and new metrics, and tests that lost coverage."
           "</p>"]
    if not model["review"]:
        out.append("<p class='none'>Nothing to review: every compared metric is ok.</p>")
    else:
        out.append("<table class='filterable' id='kv-review-table'>" + _th(
            ["verdict", "GPU", "test", "metric", "baseline", "this run", "detail"]) + "<tbody>")
        for r in model["review"]:
            out.append(f"<tr data-status='{_esc(r['status'])}'><td>{_status(r['status'])}</td>"
                       f"<td>{_esc(r['gpu'])}</td><td class='id'>{_id(r['nodeid'])}</td>"
                       f"<td>{_esc(r['metric'])}</td><td class='num'>{_fmt(r['base'])}</td>"
                       f"<td class='num'>{_fmt(r['value'])}</td>"
                       f"<td class='why'>{_esc(r['detail'])}</td></tr>")
        out.append("</tbody></table>")
    out.append("</section>")
    return out


def render(model: dict) -> str:
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{_esc(model['title'])}</title><style>{_STYLE}</style></head><body>"]
    parts += _header(model)
    parts.append("<main>")
    for section in (_changed, _review, _failures, _tests, _gpus, _trend, _skips):
        parts += section(model)
    parts.append(f"</main><script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_page(model: dict, path: str | Path) -> Path:
    page = Path(path)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(model), encoding="utf-8")
    return page


def write(session, path: str) -> Path:
    """The plugin's report: this run, every baseline file, pytest-benchmark's saved runs;
    the machine-readable results beside the page (same name, .json)."""
    page = Path(path)
    results = page.with_suffix(".json")
    page.parent.mkdir(parents=True, exist_ok=True)
    doc = session.results_document()
    jsonfile.write(results, doc)
    run = report_model.run_from_results(doc, str(results))
    saved = trend.benchmark_storage_files(session.config)
    series, problems = trend.read_runs(saved)
    files = baselines.validate_directory(session.baseline_dir)
    model = report_model.build([run], files, series, problems,
                               [str(session.config.getoption("benchmark_storage", ""))]
                               if saved else [])
    write_page(model, page)
    return results
