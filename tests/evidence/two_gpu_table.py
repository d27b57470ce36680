"""The two-GPU run's note in numbers, from its results JSON (`.ci/gpu-session OUT twogpu:S`):

    python tests/evidence/two_gpu_table.py RESULTS_JSON

prints each xdist worker's GPU as the workers saw it (tests/test_xdist_workers.py's probe
of `pytest -n 2`), the measured peer peak, and the transfer table of
suites/offload/test_peer_transfer.py: per test and method, µs per call, GB/s of pages and
the fraction of the peer peak. Exit 1 when the results hold neither.
"""

from __future__ import annotations

import json
import sys

PROBE = "tests/test_xdist_workers.py::test_workers_run_on_distinct_gpus"
TRANSFERS = "suites/offload/test_peer_transfer.py::"


def worker_lines(doc: dict) -> list[str]:
    info = (doc.get("tests", {}).get(PROBE) or {}).get("info") or {}
    out = []
    for w in ("gw0", "gw1"):
        if f"{w}.gpu_uuid" in info:
            out.append(f"{w}: CUDA_VISIBLE_DEVICES={info.get(f'{w}.cuda_visible_devices')} "
                       f"{info[f'{w}.gpu_uuid']}")
    return out


def transfer_rows(doc: dict) -> list[tuple[str, str, float, float, float | None]]:
    """(test, method, median µs, GB/s, fraction of the peer peak or None) per timing."""
    rows = []
    for nodeid, t in sorted(doc.get("tests", {}).items()):
        if not nodeid.startswith(TRANSFERS):
            continue
        m = {k: v["value"] for k, v in (t.get("metrics") or {}).items()}
        for key in sorted(k for k in m if k == "gbps" or k.endswith(".gbps")):
            prefix = key.removesuffix("gbps")  # "staged." or "" (an unlabelled timing)
            rows.append((nodeid.removeprefix(TRANSFERS), prefix.rstrip(".") or "copy",
                         m.get(f"{prefix}median_us"), m[key],
                         m.get(f"{prefix}frac_of_peak_bw")))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    with open(argv[0]) as f:
        doc = json.load(f)
    workers = worker_lines(doc)
    rows = transfer_rows(doc)
    print("per-worker GPUs (pytest -n 2, from inside the workers):")
    for line in workers or ["  (the probe did not run)"]:
        print(f"  {line}")
    peer = ((doc.get("peaks") or {}).get("link_gbps") or {}).get("peer")
    print(f"peer peak (cuda:0 -> cuda:1): {peer if peer is None else round(peer, 1)} GB/s")
    print("| test | method | µs | GB/s | of peer peak |")
    print("|---|---|---|---|---|")
    for test, label, us, gbps, frac in rows:
        frac_text = "" if frac is None else f"{frac:.2f}"
        us_text = "" if us is None else f"{us:.1f}"
        print(f"| {test} | {label} | {us_text} | {gbps:.1f} | {frac_text} |")
    return 0 if workers or rows else 1


if __name__ == "__main__":
    sys.exit(main())
