"""Tuning sweep for the paged decode kernel at gpt-oss shapes (a script, not a test).

Times launcher variants (tile, warps, stages, splits, heads per program, precise P.V, PTX
decode) with ``pytest_kvperf.measure`` (L2 flushed only where the working set could
sit in it, as the speed suite does) and checks every variant against the float64 reference
on a few sequences with the suite's tolerance (ratio = max err / bound; <= 1 passes).
Prints one line per variant and a summary; writes JSON lines to $OUT/tune.jsonl when OUT
is set.

    python suites/sinks/tune_decode.py [--stages base,sweep,pipe,lazy,spec,long,fmt] [--deadline S]

Stages: base = the launcher's defaults at batch 64 x kv 8192 (BF16, FP8 per-tensor, FP8
per-token); sweep = FP8/BF16 launch variants there; occ = FP8 variants with more resident
warps (register caps, smaller tiles, more splits); pipe = prefetch depth (stages, page ids
ahead) with tiles and splits; lazy = the lazy accumulator rescale; spec = the GPU cases of
test_decode_kernel.py with precise_pv off; long = defaults (and the sweep's best) at
kv 32768; longsweep (with long) = the FP8 sweep at kv 32768; fmt = the block formats
(MXFP8, NVFP4, K FP8 + V NVFP4; issue 17) at kv 32768 with tiles, stages, page ids ahead and
the lazy rescale, checked against the float64 reference on the same dequantised cache
(the fused speed test's tolerance). ``--smoke`` runs tiny
shapes on the CPU interpreter (checks the script only).

Findings on the H100 (2026-11, Triton 3.6), batch 64, kv 8192, FP8 per-tensor, us:
the kernel before this round 408 (BF16 KV 397); float16 decode alone 398; + V decoded
in PTX (no 8-bit operand gathers from shared memory) 277; + heads fastest in the grid 221;
+ two KV heads per program (128-byte rows) 215; + one-warp programs of 32 tokens, 4 splits
(one wave of ~8 resident programs per SM) 205 (0.87 of copy bandwidth). precise_pv costs
2 % there (209); BF16 KV with two heads per program 368. At kv 32768 (longsweep) the
defaults take 760 us (0.94); the best of 15 variants 754 (3 stages instead of 2), BF16 1437.

Findings on the H200 (2026-12-02, Triton 3.6, copy peak measured 4227 GB/s; fractions
below are of that): the same defaults give BF16 268 us (0.95) and FP8 per-tensor 177 us
(0.72) at kv 8192, BF16 1023 us (0.99) and FP8 665 us (0.77) at kv 32768. The best of the
15-variant FP8 sweep at 8192 is 169 us (0.75: 4 splits, 3 stages), which at 32768 is
slower than the defaults (685 us). BF16 scales with the 1.4x bandwidth; FP8 does not, so
FP8 is not HBM-bound there. Inferred (no counters read): with the H100's SMs and clocks the
per-byte work (E4M3 decode, softmax over 8 query heads per KV byte) is the limit, so 0.85
on the H200 needs fewer instructions per byte rather than other launch parameters.

H200, 2026-12-03 (pipe stage): the page ids had sat in each tile's K/V address chain, where
Triton's pipeliner spent a stage on them, so every loop wait drained the copies in flight
(offline sm90: DEPBAR.LE 0 at 3 stages). With ids_ahead, at kv 8192 / 32768, us: FP8
per-tensor in the tile 179.8 / 663.7, a tile ahead at 2 stages 168.8 / 633.7 (0.758 /
0.807; the new default), in the tile at 3 stages 168.3 / 640.7, two ahead 201.0; 16-token
tiles a tile ahead at 4 stages 178.4. FP8 per-token: 202.5 / 763.5 in the tile, 201.8 /
796.9 a tile ahead. BF16: 261.2 / 1006.8 in the tile (64-token tiles), 253.2 / 1019.2 a tile
ahead with 32-token tiles at 3 stages, two ahead 376.6. Still short of 0.85 for FP8.
The FP8 loop's SASS (a 32-token tile, sm90; the H200's ptxas and Triton 3.9's offline) holds
~900 / 735 instructions, of them 136 F2FP (the E4M3 converts), 64 HMMA, 104-116 IMAD.MOV
that rebuild q's MMA operand quads inside the loop (q is loop invariant; under register
pressure ptxas re-forms them per tile) and ~100 of 64-bit address arithmetic for the 16
cp.async copies: the next lead for fewer instructions per byte.
H200, 2026-12-03 (lazy and fmt stages), us at kv 8192 / 32768: the lazy rescale gave BF16
263.5 / 1024.7 (eager 270.5 / 1030.8), FP8 per-token 191.4 / 747.3 (202.5 / 773.6), FP8
per-tensor 173.3 at 8192 (170.5: slower); at 32768, MXFP8 1236.9 (1283.3), NVFP4 1737.7
(1615.3: slower), K FP8 + V NVFP4 1184.3 (1199.6). Now the default where it gained. No
block-format variant beat the defaults (MXFP8 1267.6, NVFP4 1547.8, K FP8 + V NVFP4 1130.8);
16-token NVFP4 tiles came out wrong (ratio 61, a Triton miscompile of the nibble join, since
replaced there).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

if not torch.cuda.is_available():  # the CPU smoke run: Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
from kvperf_kernels.attention.decode import (  # noqa: E402
    DecodeLaunch,
    paged_decode_attention,
)
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref  # noqa: E402
from kvperf_kernels.testing.compare import (  # noqa: E402
    DECODE_TOLERANCES,
    assert_matches_reference,
)
from kvperf_kernels.testing.decode_specs import GPU_SPECS  # noqa: E402
from kvperf_kernels.testing.decode_workloads import (  # noqa: E402
    HKV,
    HQ,
    PAGE,
    SMALL_WORKING_SET,
    D,
    build_decode_workload,
    decode_bytes_moved,
)
from kvperf_kernels.testing.format_kv import build_format_workload, spot_reference  # noqa: E402
from kvperf_kernels.testing.inputs import make_decode_case  # noqa: E402
from pytest_kvperf import get_peaks, measure  # noqa: E402

LAUNCH_KEYS = ("block_n", "num_warps", "num_stages", "ids_ahead", "lazy_rescale", "precise_pv",
               "decode_asm", "max_tile_cols", "maxnreg")
CFG_KEYS = ("num_splits", *LAUNCH_KEYS)
T0 = time.time()
OUT = os.environ.get("OUT")
ROWS = {2: [0, 1], 64: [0, 21, 42, 63]}
results: list[dict] = []


def copy_gbps() -> float:
    """The measured copy bandwidth (plugin's peaks cache); 1.0 on the CPU smoke run."""
    peaks = get_peaks()
    return peaks.copy_gbps if peaks is not None else 1.0


def log(rec: dict) -> None:
    results.append(rec)
    if OUT:
        with open(os.path.join(OUT, "tune.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


def tolerance_ratio(got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> float:
    """max |got - ref| / (atol + rtol |ref|): <= 1 passes; inf where got is not finite."""
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float(((got - ref).abs() / (atol + rtol * ref.abs())).max())


def accuracy_ratio(out, q, kv, sinks, rows) -> float:
    ref = paged_decode_attention_ref(
        q[rows], kv.k_cache, kv.v_cache, kv.block_tables[rows], kv.seq_lens[rows],
        k_scale=kv.k_scale, v_scale=kv.v_scale, sinks=sinks,
    )
    return tolerance_ratio(out[rows], ref, *DECODE_TOLERANCES[out.dtype])


def timed(rec: dict, setup) -> dict:
    """setup() -> (call, ratio, bytes moved): call(checked=True) once (the data checks,
    untimed), rec's ratio from ratio(), then call timed unchecked; a variant that fails to
    build, compile or run is reported in rec, not fatal. Logs and prints rec."""
    try:
        call, ratio, moved = setup()
        call(checked=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rec["ratio"] = round(ratio(), 3)
        t = measure(call, flush_l2=moved < SMALL_WORKING_SET, max_time_s=0.25, min_rounds=10)
        rec.update(us=round(t.median_us, 1), gbps=round(moved / t.median_us / 1e3, 1),
                   frac=round(moved / t.median_us / 1e3 / copy_gbps(), 3))
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    log(rec)
    print(fmt(rec), flush=True)
    return rec


def run_variant(data, variant: str, stage: str, *, num_splits=None, **launch_cfg) -> dict:
    q, sinks = data["q"], data["sinks"]
    kv = data["caches"][variant]
    batch, kv_len = q.shape[0], int(kv.seq_lens[0])
    out = torch.full_like(q, float("nan"))

    def setup():
        launch = DecodeLaunch(**launch_cfg)

        def call(checked=None):  # timed unchecked (max_seq_len given: no sync)
            paged_decode_attention(
                q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, k_scale=kv.k_scale,
                v_scale=kv.v_scale, sinks=sinks, max_seq_len=kv_len, out=out,
                num_splits=num_splits, launch=launch, checked=checked)

        return (call, lambda: accuracy_ratio(out, q, kv, sinks, ROWS[batch]),
                decode_bytes_moved(kv, q))

    return timed(dict(stage=stage, variant=variant, batch=batch, kv=kv_len,
                      num_splits=num_splits, **launch_cfg), setup)


FMT_TOL = (1e-3, 2**-7)  # test_fused_decode_speed's spot-check tolerance (BF16 output)


def run_format(data, variant: str, *, num_splits=None, **launch_cfg) -> dict:
    """run_variant for a block-format cache (kvperf_kernels.testing.format_kv.FormatKV),
    checked against the float64 reference on the same dequantised cache."""
    q, sinks = data["q"], data["sinks"]
    kv = data["caches"][variant]
    batch, kv_len = q.shape[0], int(kv.seq_lens[0])
    out = torch.full_like(q, float("nan"))

    def setup():
        launch = DecodeLaunch(**launch_cfg)
        kw = kv.kernel_kwargs()
        caches = (kw.pop("k_cache"), kw.pop("v_cache"), kv.block_tables, kv.seq_lens)

        def call(checked=None):
            paged_decode_attention(q, *caches, sinks=sinks, max_seq_len=kv_len, out=out,
                                   num_splits=num_splits, launch=launch, checked=checked,
                                   **kw)

        rows = ROWS[batch]
        return (call,
                lambda: tolerance_ratio(out[rows], spot_reference(kv, q, rows, sinks=sinks),
                                        *FMT_TOL),
                kv.bytes_read() + 2 * q.numel() * q.element_size())

    return timed(dict(stage="fmt", variant=variant, batch=batch, kv=kv_len,
                      num_splits=num_splits, **launch_cfg), setup)


def fmt(r: dict) -> str:
    cfg = " ".join(f"{k}={r[k]}" for k in CFG_KEYS if r.get(k) is not None)
    head = f"{r['stage']:>5} {r['variant']:>10} kv{r['kv']:<6} {cfg:<62}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    return (f"{head} {r['us']:8.1f} us {r['gbps']:7.1f} GB/s {r['frac']:.3f} "
            f"ratio {r['ratio']:.3f}")


def best(stage_prefix: str, variant: str, n: int = 3) -> list[dict]:
    rs = [r for r in results if r["stage"].startswith(stage_prefix)
          and r.get("variant") == variant and "us" in r and r["ratio"] <= 1.0]
    return sorted(rs, key=lambda r: r["us"])[:n]


def cfg_of(r: dict) -> dict:
    return {k: r[k] for k in CFG_KEYS if r.get(k) is not None}


# (block_n, num_warps, num_stages, num_splits, tile_cols); tile_cols 64: one KV head per
# program at D 64, 128: two.
SWEEP_FP8 = [
    (128, 2, 2, 1, 64), (256, 4, 2, 1, 64), (32, 1, 2, 2, 64),
    (64, 4, 2, 2, 128), (128, 4, 2, 1, 128), (64, 2, 2, 2, 128), (128, 8, 2, 1, 128),
    (32, 1, 2, 2, 128), (32, 1, 2, 4, 128), (32, 1, 3, 4, 128), (16, 1, 2, 8, 128),
    (64, 1, 2, 4, 128), (64, 4, 3, 2, 128),
]
SWEEP_BF16 = [(64, 4, 2, 1, 64), (64, 4, 2, 2, 128), (128, 8, 2, 1, 128), (32, 1, 2, 4, 128)]
# stage occ: more resident warps than the FP8 default's 8 per SM (ncu on the H200: 189
# registers, 2 warps per scheduler, 0.36 instructions issued per cycle, DRAM 64 %); a cap
# on registers (maxnreg), smaller tiles, fewer stages (shared memory) and more splits;
# (block_n, num_warps, num_stages, num_splits, maxnreg)
SWEEP_OCC = [
    (32, 1, 2, 8, 128), (32, 1, 1, 8, 128), (32, 1, 2, 8, 168), (16, 1, 2, 8, 128),
    (16, 1, 3, 8, 128), (16, 1, 2, 16, None), (16, 1, 2, 8, None), (64, 4, 2, 4, None),
    (64, 4, 3, 4, None), (32, 2, 2, 4, 128), (32, 1, 3, 8, 128),
]


# stage pipe: prefetch depth. With the page ids in a tile's own K/V address chain (ids_ahead
# 0) Triton's pipeliner spends a stage on them: 3 stages copy K/V one tile ahead, as 2 do.
# (block_n, num_warps, num_stages, num_splits, ids_ahead). Shared memory: 3 stages of
# 32-token FP8 tiles take 28 KB a program (7, not 8, resident per SM).
SWEEP_PIPE = [
    (32, 1, 2, 4, 0), (32, 1, 3, 4, 0), (32, 1, 2, 4, 2), (32, 1, 3, 4, 2), (32, 1, 2, 4, 1),
    (16, 1, 4, 8, 1), (16, 1, 3, 8, 0), (32, 1, 3, 3, 0), (64, 4, 3, 2, 0),
]
SWEEP_PIPE_BF16 = [(64, 4, 2, None, 0), (32, 4, 3, None, 1), (32, 2, 3, None, 1),
                   (32, 4, 4, None, 1), (32, 4, 3, None, 2), (32, 4, 2, None, 2)]


# stage lazy: FlashAttention-4's lazy rescale (DecodeLaunch.lazy_rescale; offline for sm90 the
# FP8 loop's path without the rescale is ~646 instructions against 737, 228 registers against
# 255); (block_n, num_warps, num_stages, num_splits, lazy_rescale)
SWEEP_LAZY = [(32, 1, 2, 4, False), (32, 1, 2, 4, True), (32, 1, 3, 4, True),
              (16, 1, 3, 8, True), (64, 1, 2, 2, True)]
SWEEP_LAZY_BF16 = [(64, 4, 2, None, False), (64, 4, 2, None, True), (32, 4, 3, None, True)]


# stage fmt: the block formats at kv 32768 (their defaults: FP8's 32-token one-warp tiles,
# page ids in the tile); (block_n, num_warps, num_stages, num_splits, ids_ahead, lazy,
# decode_asm: None the default, V's bytes in inline PTX; 3 K's too, 0 neither)
FMT_VARIANTS = ("mxfp8", "nvfp4", "k_fp8+v_nvfp4")
SWEEP_FMT = [(None, None, None, None, None, False, None), (None, None, None, None, None, False, 3),
             (None, None, None, None, None, False, 0), (32, 1, 2, None, 1, False, None),
             (32, 1, 3, None, 1, False, None), (32, 1, 2, None, 1, True, None),
             (64, 2, 2, None, 1, False, None), (64, 4, 2, None, 0, False, None),
             (16, 1, 3, None, 1, False, None)]


def format_stage(batch: int, kv_len: int, dev: str, time_left) -> None:
    data = build_format_workload(batch, kv_len, HQ, HKV, D, page_size=PAGE, device=dev,
                                 configs=FMT_VARIANTS)
    for variant in FMT_VARIANTS:
        for bn, w, st, sp, ahead, lazy, asm in SWEEP_FMT:
            if time_left() < 20:
                return
            cfg = dict(block_n=bn, num_warps=w, num_stages=st, ids_ahead=ahead, decode_asm=asm)
            run_format(data, variant, num_splits=sp, lazy_rescale=lazy,
                       **{k: v for k, v in cfg.items() if v is not None})


def run_configs(data, variant: str, stage: str, configs, last: str, time_left,
                reserve_s: float, **fixed) -> None:
    """One run_variant per (block_n, num_warps, num_stages, num_splits, <last>) config
    while more than reserve_s seconds are left."""
    for bn, w, st, sp, extra in configs:
        if time_left() < reserve_s:
            break
        run_variant(data, variant, stage, block_n=bn, num_warps=w, num_stages=st,
                    num_splits=sp, **{last: extra}, **fixed)


def sweep(data, time_left) -> None:
    run_configs(data, "fp8_tensor", "sweep", SWEEP_FP8, "max_tile_cols", time_left, 120,
                precise_pv=False)
    for r in best("sweep", "fp8_tensor", 2):
        run_variant(data, "fp8_tensor", "sweep", **{**cfg_of(r), "precise_pv": True})
        run_variant(data, "fp8_token", "sweep", **cfg_of(r))
    run_configs(data, "bf16", "sweep", SWEEP_BF16, "max_tile_cols", time_left, 0)


def fp8_stage(data, stage: str, configs, last: str, time_left, bf16_configs=()) -> None:
    """FP8 per-tensor configs (precise_pv off), the best two again with per-token scales,
    then BF16 configs: one tuning stage whose configs vary ``last``."""
    run_configs(data, "fp8_tensor", stage, configs, last, time_left, 30, precise_pv=False)
    for r in best(stage, "fp8_tensor", 2):
        run_variant(data, "fp8_token", stage, **cfg_of(r))
    run_configs(data, "bf16", stage, bf16_configs, last, time_left, 20)


def gpu_spec_accuracy(precise: bool) -> None:
    """The GPU cases of test_decode_kernel.py with precise_pv set (the tests use defaults)."""
    for spec in GPU_SPECS:
        case = make_decode_case(spec.lens, hq=spec.hq, hkv=spec.hkv, head_dim=spec.head_dim,
                                page_size=spec.page_size, q_dtype=spec.q_dtype)
        kv = case.pack(spec.kv_dtype, spec.granularity)
        sinks = case.sinks if spec.sinks else None
        out = paged_decode_attention(
            case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, k_scale=kv.k_scale,
            v_scale=kv.v_scale, sinks=sinks, window_left=spec.window_left,
            num_splits=spec.num_splits, launch=DecodeLaunch(precise_pv=precise))
        ref = paged_decode_attention_ref(
            case.q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, k_scale=kv.k_scale,
            v_scale=kv.v_scale, sinks=sinks, window_left=spec.window_left)
        atol, rtol = DECODE_TOLERANCES[out.dtype]
        ratio = float(((out.double() - ref).abs() / (atol + rtol * ref.abs())).max())
        try:
            assert_matches_reference(out, ref, spec.id)
            verdict = "pass"
        except AssertionError as e:
            verdict = f"FAIL {str(e)[:120]}"
        log(dict(stage="spec", spec=spec.id, precise_pv=precise, ratio=round(ratio, 3),
                 verdict=verdict))
        print(f"spec precise_pv={precise} {spec.id}: ratio {ratio:.3f} {verdict}", flush=True)


def free_device_memory() -> None:  # one workload's caches gone before the next is built
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds for the sweep")
    ap.add_argument("--stages", default="base,long")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter check)")
    args = ap.parse_args()
    stages = args.stages.split(",")

    def time_left():
        return args.deadline - (time.time() - T0)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    batch, short, long_ = (64, 8192, 32768) if not args.smoke else (2, 64, 128)
    variants = ("bf16", "fp8_tensor", "fp8_token")
    data = build_decode_workload(batch, short, dev)
    if "base" in stages:
        for v in variants:
            run_variant(data, v, "base")
    if "sweep" in stages:
        sweep(data, time_left)
    if "occ" in stages:
        fp8_stage(data, "occ", SWEEP_OCC, "maxnreg", time_left)
    if "pipe" in stages:
        fp8_stage(data, "pipe", SWEEP_PIPE, "ids_ahead", time_left, SWEEP_PIPE_BF16)
    if "lazy" in stages:
        fp8_stage(data, "lazy", SWEEP_LAZY, "lazy_rescale", time_left, SWEEP_LAZY_BF16)
    if "spec" in stages and not args.smoke:
        gpu_spec_accuracy(precise=False)
    del data
    free_device_memory()
    if "long" in stages:
        data = build_decode_workload(batch, long_, dev)
        for v in variants:
            run_variant(data, v, "long")
        for v in variants:
            for r in (best("sweep", v, 1) + best("occ", v, 1) + best("pipe", v, 2)
                      + best("lazy", v, 1)):
                run_variant(data, v, "long", **cfg_of(r))
        if "longsweep" in stages:  # the FP8 sweep again at the long context
            for bn, w, st, sp, cols in SWEEP_FP8 + [(32, 1, 2, 8, 128), (64, 2, 2, 8, 128)]:
                if time_left() < 20:
                    break
                run_variant(data, "fp8_tensor", "long", block_n=bn, num_warps=w,
                            num_stages=st, num_splits=sp, max_tile_cols=cols, precise_pv=False)
        del data
        free_device_memory()
    if "fmt" in stages:
        format_stage(batch, long_, dev, time_left)
        variants = (*variants, *FMT_VARIANTS)

    print("\n=== summary: best passing variant per KV dtype and length ===")
    for kv_len in (short, long_):
        for v in variants:
            rs = [r for r in results if r.get("variant") == v and r.get("kv") == kv_len
                  and "us" in r and r["ratio"] <= 1.0]
            if rs:
                print(fmt(min(rs, key=lambda r: r["us"])))
    print(f"total {time.time() - T0:.0f}s")


if __name__ == "__main__":
    main()
