"""The fused latent write at the speed test's shape (128K bf16 tokens, block 64, shuffled
pages), launched a few times per layout for a profiler to read, e.g. on the GPU machine:

    ncu --clock-control none -k regex:_latent_write_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy \
        python3 tests/evidence/latent_write_profile.py v32

Each layout's bytes are checked against the reference once, so a profile is of a correct
write. Options: layouts (default all three), --tokens, --launches."""

from __future__ import annotations

import argparse

import torch

from kvperf_kernels.latent.write import latent_write, latent_write_ref
from kvperf_kernels.testing.latent import make_latent_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layouts", nargs="*", default=["lab", "v32", "model1"])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args()
    for name in args.layouts:
        half = args.tokens // 2
        batch = make_latent_batch(name, [0, 0], [half, half], 64, device="cuda", seed=81)
        cache, ref = batch.new_cache(), batch.new_cache()
        for _ in range(args.launches):
            latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots,
                         cache, layout=name, block_size=64, checked=False)
        latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots,
                         ref, layout=name, block_size=64)
        torch.cuda.synchronize()
        same = torch.equal(cache, ref)
        print(f"{name}: {args.launches} launches of {args.tokens} tokens, bytes equal the "
              f"reference: {same}")
        if not same:
            raise SystemExit(f"{name}: the write's bytes differ from the reference")


if __name__ == "__main__":
    main()
