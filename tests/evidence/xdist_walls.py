"""Evidence that `pytest -n 2` on two GPUs keeps everything a serial run has, and is faster.

    python tests/evidence/xdist_walls.py N1_DIR N2_DIR --baselines N2_BASELINES --out F.json

N1_DIR and N2_DIR are two `.ci/gpu-suite` runs of one selection (`-n 1`, then `-n 2`, both
with `-v` so that each test's worker is in the log, and KVPERF_WALL_FILE=DIR/wall), the
second with `--update-baselines` into N2_BASELINES, a copy of the first run's baselines.
Checked (each failure is named, exit 1):

1. both runs ended (exit 0 or 1, no test interrupted) with the same tests and outcomes;
2. the -n 2 wall is >= --min-speedup (1.8) times shorter than the -n 1 wall (the pytest
   command's own, from the wall files);
3. -n 2 ran two workers on two distinct GPUs (the workers' own UUIDs, results JSON);
4. one benchmark JSON with every benchmark of the serial run, no more, no fewer;
5. one baseline write with every measured test: N2_BASELINES holds each measured test's
   metrics as the -n 2 run measured them (whichever worker ran it);
6. every speed metric of -n 2, per worker, is `ok` against the -n 1 run (the noise-aware
   verdict); `unreliable` (a throttled GPU) is listed, not counted against.

Prints the walls, the workers' GPUs and the verdicts per worker; writes them to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MIN_SPEEDUP = 1.8
_WORKER_LINE = re.compile(r"^\[(gw\d+)\] \[\s*\d+%\] (?:PASSED|FAILED|SKIPPED|ERROR|XFAIL|"
                          r"XPASS) (\S.*?)\s*$")  # (a parameter id may hold spaces)
_UPDATE_LINE = re.compile(r"^\s*(\S+\.json): (\d+ entries written|unchanged)")


@dataclass
class Run:
    name: str
    results: dict
    benchmarks: list[dict]
    log: str
    wall_s: float | None
    rc: int | None
    problems: list[str] = field(default_factory=list)

    @property
    def tests(self) -> dict[str, dict]:
        return self.results.get("tests", {})

    def outcomes(self) -> dict[str, str]:
        return {k: v["outcome"] for k, v in self.tests.items()}

    def measured(self) -> set[str]:
        return {k for k, v in self.tests.items() if v["outcome"] == "passed" and v["metrics"]}

    def workers_of_tests(self) -> dict[str, str]:
        """node id -> xdist worker, from pytest -v lines ('[gw1] [ 50%] PASSED ...')."""
        out = {}
        for line in self.log.splitlines():
            m = _WORKER_LINE.match(line)
            if m:
                out[m.group(2)] = m.group(1)
        return out


def _read_json(path: Path, problems: list[str], what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{what}: cannot read {path}: {exc}")
        return None


def load_run(directory: str | Path, name: str) -> Run:
    d = Path(directory)
    problems: list[str] = []
    results = _read_json(d / "results.json", problems, name) or {}
    bench_path = d / "benchmark.json"  # pytest-benchmark leaves it empty when none ran
    empty = not bench_path.exists() or not bench_path.read_bytes().strip()
    bench = {} if empty else _read_json(bench_path, problems, name) or {}
    try:
        log = (d / "pytest.log").read_text(errors="replace")
    except OSError:
        log = ""
        problems.append(f"{name}: no pytest.log in {d}")
    wall_s = rc = None
    try:
        t0, t1, code = (d / "wall").read_text().split()
        wall_s, rc = float(t1) - float(t0), int(code)
    except (OSError, ValueError):
        problems.append(f"{name}: no wall file in {d} (KVPERF_WALL_FILE)")
    return Run(name, results, bench.get("benchmarks", []), log, wall_s, rc, problems)


def _same_metrics(entry: dict, metrics: dict) -> bool:
    stored = entry.get("metrics", {})
    if set(stored) != set(metrics):
        return False
    return all(math.isclose(stored[k]["value"], metrics[k]["value"], rel_tol=1e-12,
                            abs_tol=0.0) for k in metrics)


def check(serial: Run, parallel: Run, written: dict | None, *,
          min_speedup: float = MIN_SPEEDUP) -> tuple[dict, list[str]]:
    """(facts, problems) of the two runs; no problems: the evidence holds."""
    problems = serial.problems + parallel.problems
    facts: dict = {"walls_s": {serial.name: serial.wall_s, parallel.name: parallel.wall_s}}
    for run in (serial, parallel):
        if run.rc not in (0, 1, None):
            problems.append(f"{run.name}: pytest exited {run.rc}")
        bad = sorted(k for k, o in run.outcomes().items()
                     if o in ("interrupted", "failed", "error"))
        if bad:
            problems.append(f"{run.name}: {len(bad)} tests failed or did not finish: "
                            f"{bad[:5]}")
    # 1. the same tests, the same outcomes
    a, b = serial.outcomes(), parallel.outcomes()
    if not a:
        problems.append(f"{serial.name}: no tests in its results JSON")
    lost, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    for words, ids in (("lost", lost), ("extra", extra), ("with another outcome", differ)):
        if ids:
            problems.append(f"{parallel.name}: {len(ids)} tests {words}: {ids[:5]}")
    facts["tests"] = len(a)
    # 2. the wall
    if serial.wall_s and parallel.wall_s:
        speedup = serial.wall_s / parallel.wall_s
        facts["speedup"] = round(speedup, 3)
        if speedup < min_speedup:
            problems.append(f"{parallel.name} is {speedup:.2f}x faster than {serial.name} "
                            f"({serial.wall_s:.1f} s -> {parallel.wall_s:.1f} s); the goal "
                            f"is >= {min_speedup}x")
    # 3. one GPU per worker
    workers = parallel.results.get("workers") or {}
    facts["workers"] = {w: {k: r.get(k) for k in ("cuda_visible_devices", "gpu_uuid",
                                                   "gpu_name", "shared")}
                        for w, r in sorted(workers.items())}
    uuids = [r.get("gpu_uuid") for r in workers.values()]
    if len(workers) != 2 or None in uuids or len(set(uuids)) != 2:
        problems.append(f"{parallel.name}: wanted two workers on two distinct GPUs, found "
                        f"{facts['workers']}")
    if any(r.get("shared") for r in workers.values()):
        problems.append(f"{parallel.name}: GPUs shared (--kvperf-share-gpus): speed not "
                        "compared")
    # 4. every benchmark in one JSON
    names_a = Counter(x["fullname"] for x in serial.benchmarks)
    names_b = Counter(x["fullname"] for x in parallel.benchmarks)
    facts["benchmarks"] = {serial.name: sum(names_a.values()),
                           parallel.name: sum(names_b.values())}
    if names_a != names_b:
        gone, more = sorted(names_a - names_b), sorted(names_b - names_a)
        problems.append(f"{parallel.name}'s benchmark JSON differs: {len(gone)} missing "
                        f"{gone[:3]}, {len(more)} extra {more[:3]}")
    # 5. one baseline write, every measured test in it
    updates = [m.group(0).strip() for m in map(_UPDATE_LINE.match, parallel.log.splitlines())
               if m]
    facts["baseline_writes"] = updates
    if len(updates) != 1:
        problems.append(f"{parallel.name}: wanted one baseline update, the log has "
                        f"{len(updates)}: {updates}")
    entries = (written or {}).get("entries", {})
    missing = sorted(k for k in parallel.measured()
                     if k not in entries or not _same_metrics(entries[k],
                                                              parallel.tests[k]["metrics"]))
    if written is None:
        problems.append(f"{parallel.name}: no baseline file written")
    elif missing:
        problems.append(f"{parallel.name}: {len(missing)} measured tests not written as "
                        f"measured: {missing[:5]}")
    unmeasured = sorted(serial.measured() - parallel.measured())
    if unmeasured:
        problems.append(f"{parallel.name}: {len(unmeasured)} tests measured by "
                        f"{serial.name} but not here: {unmeasured[:5]}")
    facts["measured"] = len(parallel.measured())
    # 6. speed per worker within the verdict's noise of the serial run
    where = parallel.workers_of_tests()
    per_worker: dict[str, Counter] = {}
    off = []
    for nodeid, t in sorted(parallel.tests.items()):
        for c in t.get("changes", []):
            if c.get("kind") != "speed":
                continue
            worker = where.get(nodeid, "unknown worker")
            per_worker.setdefault(worker, Counter())[c["status"]] += 1
            if c["status"] not in ("ok", "unreliable"):
                off.append(f"{worker} {nodeid} {c['name']}: {c['status']} "
                           f"({c.get('base')} -> {c.get('value')})")
    facts["speed_verdicts_per_worker"] = {w: dict(c) for w, c in sorted(per_worker.items())}
    if not per_worker:
        problems.append(f"{parallel.name}: no speed metric compared with {serial.name}")
    if sorted(per_worker) != ["gw0", "gw1"]:
        problems.append(f"{parallel.name}: speed verdicts from workers {sorted(per_worker)} "
                        "(wanted gw0 and gw1: run with -v)")
    if off:
        problems.append(f"{parallel.name}: {len(off)} speed metrics beyond the noise of "
                        f"{serial.name}: {off[:5]}")
    facts["speed_off"] = off
    return facts, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("serial", help="the -n 1 run's .ci/gpu-suite OUTDIR")
    ap.add_argument("parallel", help="the -n 2 run's .ci/gpu-suite OUTDIR")
    ap.add_argument("--baselines", required=True, help="where the -n 2 run wrote baselines")
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-speedup", type=float, default=MIN_SPEEDUP)
    args = ap.parse_args(argv)
    serial, parallel = load_run(args.serial, "-n 1"), load_run(args.parallel, "-n 2")
    key = (parallel.results.get("hardware") or {}).get("key", "")
    written = None
    path = Path(args.baselines) / f"{key}.json"
    if key and path.exists():
        written = json.loads(path.read_text())
    facts, problems = check(serial, parallel, written, min_speedup=args.min_speedup)
    doc = {"facts": facts, "problems": problems, "ok": not problems}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    walls = facts["walls_s"]
    print(f"walls: -n 1 {walls['-n 1']} s, -n 2 {walls['-n 2']} s, "
          f"speedup {facts.get('speedup')}")
    for w, r in facts.get("workers", {}).items():
        print(f"  {w}: CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']} {r['gpu_uuid']} "
              f"{r['gpu_name']}")
    print(f"tests {facts['tests']}, measured {facts['measured']}, benchmarks "
          f"{facts['benchmarks']}, baseline writes {facts['baseline_writes']}")
    print(f"speed verdicts per worker: {facts['speed_verdicts_per_worker']}")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
