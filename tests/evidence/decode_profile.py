"""The paged decode at the speed suite's shape (gpt-oss heads 64/8, d 64, page 16, batch 64,
kv 8K, sinks), launched a few times per KV variant for a profiler to read, e.g. on the GPU
machine:

    ncu --clock-control none -k regex:_paged_decode_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy \
        python3 tests/evidence/decode_profile.py fp8_tensor

Each variant's output is checked against the float64 reference on a few sequences first, so
a profile is of a correct decode. Options: variants (default bf16 fp8_tensor fp8_token),
--batch, --kv, --launches."""

from __future__ import annotations

import argparse

import torch

from kvperf_kernels.attention.decode import paged_decode_attention
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.testing.compare import assert_matches_reference
from kvperf_kernels.testing.decode_workloads import VARIANTS, build_decode_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", help=f"of {list(VARIANTS)} (default all)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--kv", type=int, default=8192)
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args()
    args.variants = args.variants or list(VARIANTS)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run (interpreter)
    data = build_decode_workload(args.batch, args.kv, device, variants=tuple(args.variants))
    q, sinks = data["q"], data["sinks"]
    rows = sorted({0, args.batch - 1})
    for name in args.variants:
        kv = data["caches"][name]
        out = torch.full_like(q, float("nan"))
        for _ in range(args.launches):
            paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens,
                                   k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks,
                                   max_seq_len=args.kv, checked=False, out=out)
        ref = paged_decode_attention_ref(q[rows], kv.k_cache, kv.v_cache, kv.block_tables[rows],
                                         kv.seq_lens[rows], k_scale=kv.k_scale,
                                         v_scale=kv.v_scale, sinks=sinks)
        assert_matches_reference(out[rows], ref, f"decode_profile {name}")
        print(f"{name}: {args.launches} launches at batch {args.batch}, kv {args.kv}; "
              f"sequences {rows} match the float64 reference")


if __name__ == "__main__":
    main()
