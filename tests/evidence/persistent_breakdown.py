"""Where the persistent decode's time goes against the batched kernel's (issue 13: >= 0.97x
batched on uniform batches), at the variants speed test's workloads (gpt-oss heads 64/8,
d 64, page 16, BF16 KV, sinks): per launch configuration the end-to-end median
(``pytest_kvperf.measure``, as kv_bench times it) and each kernel's device time from
torch.profiler (the fills before the kernel, the kernel, the merge). Every configuration's
output is checked against the float64 reference on its first, longest and last sequence
first, so a fast wrong one shows as FAIL.

    python3 tests/evidence/persistent_breakdown.py [--workloads uniform_64x1k,...] [--out F]

On the CPU it runs one tiny workload in the interpreter (a smoke run of the script).

H200, 2026-12-03 (us: end to end; kernel + merge + fills): uniform 64 x 1K batched 46.1
(38.4 + 3.9), persistent 59.3 (41.6 + 10.1 + 1.5), its static schedule 57.3 (39.6 + 10.2);
64 x 4K batched 137.9 (129.7 + 3.8), persistent 166.5 (148.7 + 11.1); 8 x 8K 44.4 against
52.1; skewed 546.8 against 63.9 (44.0 + 11.7). Two KV heads per item, 2 stages, 512- or
2048-token chunks: no faster. So on uniform batches the merge costs 6 us more than the
batched one's and the token loop 8-15 % more. Partials by (sequence, chunk), the merge
waiting on its sequence's length only: merge 9.5-9.9 (from 10.1-11.1)."""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from kvperf_kernels.attention.decode import paged_decode_attention  # noqa: E402
from kvperf_kernels.attention.persistent_decode import persistent_decode_attention  # noqa: E402
from kvperf_kernels.testing.compare import assert_matches_reference  # noqa: E402
from kvperf_kernels.testing.decode_variants import SPEED_WORKLOADS, speed_case  # noqa: E402
from pytest_kvperf import measure  # noqa: E402

P = persistent_decode_attention
CONFIGS = {
    "batched": paged_decode_attention,
    "persistent": P,
    "static": functools.partial(P, schedule="static"),
    "hp2_s2_c512": functools.partial(P, max_tile_cols=128, num_stages=2, chunk_tokens=512),
    "hp2_s2_c1024": functools.partial(P, max_tile_cols=128, num_stages=2),
    "hp2_s3_c512": functools.partial(P, max_tile_cols=128, chunk_tokens=512),
    "hp1_s2_c1024": functools.partial(P, num_stages=2),
    "hp1_s3_c512": functools.partial(P, chunk_tokens=512),
    "hp1_s3_c2048": functools.partial(P, chunk_tokens=2048),
    "hp1_s3_c4096": functools.partial(P, chunk_tokens=4096),
    "uncapped": functools.partial(P, maxnreg=0),
    "hp2_s2_r168": functools.partial(P, max_tile_cols=128, num_stages=2, maxnreg=168),
}


def kernel_times(call, reps: int = 5) -> dict[str, float]:
    """Mean device us per call of each kernel name (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    sums = collections.Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            sums[e.name[:40]] += e.device_time / reps
    return {k: round(v, 1) for k, v in sums.most_common(6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=",".join(SPEED_WORKLOADS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=None, help="JSON lines of the results")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    workloads = ({w: SPEED_WORKLOADS[w] for w in args.workloads.split(",")} if gpu
                 else {"smoke": [100, 17]})
    for wname, lens in workloads.items():
        q, sinks, kv, rows, ref = speed_case(lens)
        for cname in args.configs.split(","):
            fn = CONFIGS[cname]
            out = torch.full_like(q, float("nan"))
            call = functools.partial(fn, q, kv.k_cache, kv.v_cache, kv.block_tables,
                                     kv.seq_lens, sinks=sinks, max_seq_len=max(lens), out=out)
            rec = dict(workload=wname, config=cname)
            try:
                call()
                assert_matches_reference(out[rows], ref, f"{cname} {wname}")
                rec["check"] = "pass"
            except AssertionError as e:
                rec["check"] = f"FAIL {str(e)[:100]}"
            if gpu:
                rec["median_us"] = round(measure(call, max_time_s=0.3).median_us, 1)
                rec["kernels_us"] = kernel_times(call)
            print(json.dumps(rec), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
