"""Fused paged decode over MXFP8, NVFP4 and mixed K/V caches (issue 17): our Triton decode
kernel reading each format's codes and block scales in its registers.

- Each format against the float64 reference on the SAME stored bytes, dequantised by the
  quantisers' torch references: tight (the decode tolerance, ~2 ulps of the BF16 output),
  with sinks, window, GQA, split-KV, ragged batches, page sizes, D 64 / 128, an FP16 query.
- The format's drift from BF16 KV (same tokens) as its own baselined metric, bounded by what
  the format's rounding explains; controls (a lost NVFP4 global scale, MXFP8 block scales
  off by one binade) must break the bounds.
- Free slots: every slot no sequence owns holds NaN codes or NaN block scales (the
  ``PagedStore`` starts so); a length one past a sequence's tokens must turn it NaN.
- The error contract of the block-scale arguments (each error names its argument).
- Path check: ``record_launches`` shows the kernel variant specialised for the format ran;
  a dequantise-then-attend fallback (BF16 copy, or no launch at all) fails that check.
The CPU interpreter runs everything here on small shapes; the long cases need a GPU.
"""

from __future__ import annotations

import re

import pytest
import torch

from kvperf_kernels.attention.decode import (
    DecodeLaunch,
    paged_decode_attention,
    record_launches,
)
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.device import interpreted
from kvperf_kernels.testing.compare import assert_matches_reference
from kvperf_kernels.testing.format_kv import FormatKV, pack_case
from kvperf_kernels.testing.inputs import make_decode_case

LAUNCH = DecodeLaunch(block_n=16) if interpreted() else DecodeLaunch()  # several tiles on CPU
FUSED = ("mxfp8", "nvfp4", "k_fp8+v_nvfp4", "k_mxfp8+v_nvfp4")
# the kernel's format names the configuration must launch with (K, V)
VARIANT = {"bf16": ("16bit", "16bit"), "fp8_per_token": ("fp8_e4m3fn", "fp8_e4m3fn"),
           "mxfp8": ("mxfp8", "mxfp8"), "nvfp4": ("nvfp4", "nvfp4"),
           "k_fp8+v_nvfp4": ("fp8_e4m3fn", "nvfp4"), "k_mxfp8+v_nvfp4": ("mxfp8", "nvfp4")}
RAGGED, RAGGED_D128 = (1, 17, 100), (3, 70, 129)
# (lens, hq, hkv, head_dim, page_size, sinks, window_left, num_splits, q dtype)
SHAPES = {
    "d64-gqa4-hp2-sinks-split1": (RAGGED, 8, 2, 64, 16, True, -1, 1, torch.bfloat16),
    "d64-gqa8-sinks-win24-split3": (RAGGED, 16, 2, 64, 16, True, 24, 3, torch.bfloat16),
    "d64-p64-nosinks-win0-split2": (RAGGED, 8, 2, 64, 64, False, 0, 2, torch.bfloat16),
    "d128-gqa4-sinks-split2": (RAGGED_D128, 8, 2, 128, 16, True, -1, 2, torch.bfloat16),
    "d64-qfp16-sinks-split1": (RAGGED, 8, 2, 64, 16, True, -1, 1, torch.float16),
}
# drift vs BF16 KV at gpt-oss heads (rel L2 ceiling, cosine floor): ~1.6x the measured
# rel L2 (mxfp8 0.048, nvfp4 0.157, k_fp8+v_nvfp4 0.099, k_mxfp8+v_nvfp4 0.102 on the CPU)
DRIFT_BOUNDS = {"mxfp8": (0.08, 0.997), "nvfp4": (0.25, 0.97),
                "k_fp8+v_nvfp4": (0.16, 0.985), "k_mxfp8+v_nvfp4": (0.16, 0.985)}


def fused_decode(case, kv: FormatKV, *, launch=LAUNCH, **kwargs) -> torch.Tensor:
    """paged_decode_attention on the stored bytes; kwargs override cache arguments too."""
    args = {**kv.kernel_kwargs(), "block_tables": kv.block_tables, "seq_lens": kv.seq_lens,
            **kwargs}
    return paged_decode_attention(case.q, args.pop("k_cache"), args.pop("v_cache"),
                                  args.pop("block_tables"), args.pop("seq_lens"),
                                  launch=launch, **args)


def reference(case, kv: FormatKV, **kwargs) -> torch.Tensor:
    """The float64 reference on the same stored bytes, dequantised by the torch references."""
    k, v = kv.dequantized()
    return paged_decode_attention_ref(case.q, k, v, kv.block_tables, kv.seq_lens, **kwargs)


def assert_fused_variant(records: list[dict], name: str) -> None:
    """The path check: exactly one decode launch, specialised for the configuration's K and
    V formats (a dequantise-then-attend fallback launches the 16-bit variant, or none)."""
    assert len(records) == 1, f"{name}: {len(records)} decode launches, expected 1"
    got = (records[0]["k_format"], records[0]["v_format"])
    assert got == VARIANT[name], f"{name}: the kernel ran as {got}, not {VARIANT[name]}"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("fmt", FUSED)
def test_fused_matches_reference(fmt, shape, kvperf):
    lens, hq, hkv, d, page, sinks, window, splits, q_dtype = SHAPES[shape]
    case = make_decode_case(lens, hq=hq, hkv=hkv, head_dim=d, page_size=page, q_dtype=q_dtype)
    kv = pack_case(case, fmt)
    sink = case.sinks if sinks else None
    with record_launches() as runs:
        out = fused_decode(case, kv, sinks=sink, window_left=window, num_splits=splits)
    assert_fused_variant(runs, fmt)
    ref = reference(case, kv, sinks=sink, window_left=window)
    kvperf.info("kv_format", fmt)
    m = kvperf.errors(out, ref)
    assert_matches_reference(out, ref, f"{fmt} {shape}")
    assert m["cosine"] >= 0.9999, m


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FUSED)
@pytest.mark.parametrize("lens, hq, hkv, d", [((32768, 1, 20001, 4097), 64, 8, 64),
                                              ((4000, 9000, 1), 64, 8, 128)],
                         ids=["gpt-oss-long", "d128-long"])
def test_fused_matches_reference_long(fmt, lens, hq, hkv, d, kvperf):
    """Lab-sized ragged batches with the launcher's own split and tile choices."""
    case = make_decode_case(lens, hq=hq, hkv=hkv, head_dim=d, page_size=16)
    kv = pack_case(case, fmt)
    with record_launches() as runs:
        out = fused_decode(case, kv, sinks=case.sinks, launch=DecodeLaunch())
    assert_fused_variant(runs, fmt)
    ref = reference(case, kv, sinks=case.sinks)
    kvperf.errors(out, ref)
    assert_matches_reference(out, ref, f"{fmt} long")


# Compiled launch variants a tuning run may pick (block_n, num_warps, num_stages, ids_ahead,
# lazy_rescale, decode_asm): the GPU checks above take the defaults only, and the H200's tune
# run found a 16-token NVFP4 tile wrong (ratio 61; Triton's join, now replaced there) that no
# test had compiled. decode_asm 0 (no inline PTX) and 3 (K's bytes too) are the tune sweep's
# other choices; the interpreter runs no PTX. The CPU runs the two NVFP4 tile orders (16
# tokens: nibble-major; 32: joined).
_CPU_TOO = {(16, 1, 2, 0, False, 2), (32, 1, 3, 1, True, 2)}
LAUNCH_GRID = [pytest.param(c, id="bn{}-w{}-s{}-ids{}-lazy{:d}-asm{}".format(*c),
                            marks=() if c in _CPU_TOO else pytest.mark.gpu)
               for c in [(16, 1, 2, 0, False, 2), (16, 1, 3, 1, False, 2),
                         (16, 1, 2, 1, False, 2), (16, 2, 2, 1, False, 2),
                         (32, 1, 3, 1, True, 2), (32, 1, 2, 2, False, 2),
                         (64, 2, 2, 1, False, 2), (64, 4, 2, 0, True, 2),
                         (32, 1, 3, 1, False, 0), (32, 1, 3, 1, False, 3)]]


@pytest.mark.parametrize("cfg", LAUNCH_GRID)
@pytest.mark.parametrize("fmt", FUSED)
def test_launch_variants_match_reference(fmt, cfg):
    """Launch variants, not only the defaults, on ragged lengths that end inside and at a
    tile, with a split and sinks, against the float64 reference."""
    bn, warps, stages, ahead, lazy, asm = cfg
    case = make_decode_case((1, 16, 33, 300, 1000), hq=16, hkv=2, head_dim=64, page_size=16)
    kv = pack_case(case, fmt)
    launch = DecodeLaunch(block_n=bn, num_warps=warps, num_stages=stages, ids_ahead=ahead,
                          lazy_rescale=lazy, decode_asm=asm)
    for splits in (1, 3):
        out = fused_decode(case, kv, sinks=case.sinks, num_splits=splits, launch=launch)
        ref = reference(case, kv, sinks=case.sinks)
        assert_matches_reference(out, ref, f"{fmt} {cfg} {splits} splits")


@pytest.fixture(scope="module")
def drift_case():
    """gpt-oss heads (Hq 64, Hkv 8, D 64, page 16), two sequences, sinks."""
    return make_decode_case((128, 512), hq=64, hkv=8, head_dim=64, page_size=16, seed=42)


@pytest.fixture(scope="module")
def bf16_out(drift_case):
    return fused_decode(drift_case, pack_case(drift_case, "bf16"), sinks=drift_case.sinks,
                        launch=DecodeLaunch())


@pytest.mark.parametrize("fmt", FUSED)
def test_format_drift_vs_bf16(fmt, drift_case, bf16_out, kvperf):
    """The format's rounding, as a baselined metric: its output vs BF16 KV's on the same
    tokens (and, tightly, vs the reference on its own bytes, so the drift is the format's)."""
    kv = pack_case(drift_case, fmt)
    out = fused_decode(drift_case, kv, sinks=drift_case.sinks, launch=DecodeLaunch())
    assert_matches_reference(out, reference(drift_case, kv, sinks=drift_case.sinks),
                             f"{fmt} vs reference")
    drift = kvperf.errors(out, bf16_out, prefix=f"{fmt}_vs_bf16_")
    max_rel_l2, min_cosine = DRIFT_BOUNDS[fmt]
    assert drift["rel_l2_err"] <= max_rel_l2, (fmt, drift)
    assert drift["cosine"] >= min_cosine, (fmt, drift)
    kvperf.info("bytes_per_token_vs_bf16",
                round(kv.k_store.bytes_per_token() + kv.v_store.bytes_per_token(), 1) / (
                    2 * 8 * 64 * 2))


def _lost_global_scale(kv):
    return {"v_scale": 1.0}


def _block_scales_one_binade_up(kv):
    e = kv.v_store.tensors["scale_e8m0"].to(torch.int32)
    return {"v_block_scale": (e + 1).clamp(max=254).to(torch.uint8)}


@pytest.mark.parametrize("fmt, fault", [("nvfp4", _lost_global_scale),
                                        ("mxfp8", _block_scales_one_binade_up)],
                         ids=["nvfp4-lost-global-scale", "mxfp8-block-scales-x2"])
def test_drift_bounds_catch_misapplied_scales(fmt, fault, drift_case, bf16_out):
    """Control: the drift bounds above fail for a kernel that drops or misreads scales."""
    kv = pack_case(drift_case, fmt)
    out = fused_decode(drift_case, kv, sinks=drift_case.sinks, launch=DecodeLaunch(),
                       **fault(kv))
    err = (out.double() - bf16_out.double()).norm() / bf16_out.double().norm()
    assert err.item() > DRIFT_BOUNDS[fmt][0], f"{fmt}: faulty scales drift only {err.item()}"


@pytest.mark.parametrize("fmt", FUSED)
def test_reading_a_free_slot_shows(fmt):
    """The free slots are poisoned for every format (NaN codes, or NaN block scales under
    NVFP4's NaN-less codes): one token past each sequence turns all its outputs NaN."""
    case = make_decode_case((5, 17), hq=4, hkv=2, head_dim=64, page_size=16)
    kv = pack_case(case, fmt)
    good = fused_decode(case, kv, sinks=case.sinks)
    assert torch.isfinite(good).all()
    too_long = fused_decode(case, kv, sinks=case.sinks, seq_lens=kv.seq_lens + 1,
                            checked=False, max_seq_len=18)
    assert torch.isnan(too_long.float()).flatten(1).all(dim=1).all(), (
        f"{fmt}: a read past seq_len was not NaN: the poisoning is not effective")


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_checked_mode_rejects_nan_block_scales(fmt):
    """checked=True: a NaN block scale in a slot a sequence owns is a ValueError naming the
    argument; the same NaN in a free slot is not (free slots are NaN by design)."""
    case = make_decode_case((5, 17), hq=4, hkv=2, head_dim=64, page_size=16)
    kv = pack_case(case, fmt)
    name = "scale_e8m0" if fmt == "mxfp8" else "block_scale"
    block = kv.k_store.tensors[name].clone()
    page = int(kv.block_tables[1, 0])
    block.view(torch.uint8)[page, 3, 1, 0] = 0xFF if fmt == "mxfp8" else 0x7F
    with pytest.raises(ValueError, match="k_block_scale: 1 block scales"):
        fused_decode(case, kv, k_block_scale=block, checked=True)
    fused_decode(case, kv, checked=True)  # the untouched cache (NaN free slots) passes


def _nvfp4_inputs(case):
    kv = pack_case(case, "k_fp8+v_nvfp4")
    return kv, kv.kernel_kwargs()


def _half(t):
    return t[..., : t.shape[-1] // 2]


# (configuration, override of the cache arguments, exception, pattern naming the argument)
BAD_INPUTS = [
    ("mxfp8", lambda kw: {"k_block_scale": kw["k_block_scale"].float()}, TypeError,
     "k_block_scale must be uint8"),
    ("mxfp8", lambda kw: {"v_block_scale": _half(kw["v_block_scale"])}, ValueError,
     r"v_block_scale must be \[num_pages, page_size, Hkv, D/32\]"),
    ("mxfp8", lambda kw: {"k_block_scale": kw["k_block_scale"].view(torch.float8_e4m3fn)},
     TypeError, "k_block_scale: float8_e4m3fn block scales are NVFP4's"),
    ("mxfp8", lambda kw: {"k_scale": torch.ones(kw["k_cache"].shape[:3],
                                                   device=kw["k_cache"].device)}, ValueError,
     "k_scale with MXFP8"),
    ("mxfp8", lambda kw: {"v_block_scale": kw["v_block_scale"].transpose(2, 3).contiguous()
                          .transpose(2, 3)}, ValueError, "v_block_scale must be contiguous"),
    ("nvfp4", lambda kw: {"k_block_scale": kw["k_block_scale"].view(torch.uint8)}, TypeError,
     "k_block_scale: uint8 .E8M0. block scales are MXFP8's"),
    ("nvfp4", lambda kw: {"v_block_scale": None}, NotImplementedError,
     "v_cache: KV cache dtype torch.uint8 is not supported"),
    ("k_fp8+v_nvfp4", lambda kw: {"v_cache": kw["v_cache"].repeat(1, 1, 1, 2)}, ValueError,
     "v_cache: NVFP4 packs two elements a byte"),
    ("nvfp4", lambda kw: {"v_block_scale": _half(kw["v_block_scale"])}, ValueError,
     r"v_block_scale must be \[num_pages, page_size, Hkv, D/16\]"),
    ("nvfp4", lambda kw: {"v_scale": torch.full((1,), float("nan"),
                                                    device=kw["v_cache"].device)},
     ValueError, "v_scale: 1 scales"),
    ("nvfp4", lambda kw: {"k_scale": -1.0}, ValueError, "k_scale"),
    ("k_fp8+v_nvfp4", lambda kw: {"v_cache": kw["v_cache"][:, :, :1]}, ValueError,
     "k_cache .* != v_cache"),
    ("k_fp8+v_nvfp4", lambda kw: {"k_cache": kw["k_cache"].to(torch.bfloat16),
                                  "k_scale": None}, TypeError, "k_cache dtype"),
]


@pytest.mark.parametrize("fmt, override, exc, pattern", BAD_INPUTS,
                         ids=[f"{b[0]}-{b[3][:28]}" for b in BAD_INPUTS])
def test_bad_block_format_inputs_raise_naming_the_argument(fmt, override, exc, pattern):
    case = make_decode_case((5, 17), hq=4, hkv=2, head_dim=64, page_size=16)
    kv = pack_case(case, fmt)
    with pytest.raises(exc, match=pattern):
        fused_decode(case, kv, checked=True, **override(kv.kernel_kwargs()))


@pytest.mark.parametrize("fmt", FUSED)
def test_empty_batch_gives_empty_output(fmt):
    case = make_decode_case((5,), hq=4, hkv=2, head_dim=64, page_size=16)
    kv = pack_case(case, fmt)
    case.q = case.q[:0]
    with record_launches() as runs:
        out = fused_decode(case, kv, block_tables=kv.block_tables[:0],
                           seq_lens=kv.seq_lens[:0])
    assert out.shape == (0, 4, 64) and not runs


def _dequantise_then_attend(case, kv: FormatKV) -> torch.Tensor:
    """The unfused path the check must catch: the pages decoded to BF16, then attended."""
    k, v = kv.dequantized(torch.bfloat16)
    return paged_decode_attention(case.q, k, v, kv.block_tables, kv.seq_lens,
                                  sinks=case.sinks, launch=LAUNCH)


def _torch_fallback(case, kv: FormatKV) -> torch.Tensor:
    """Another fallback: no kernel at all, the reference's own arithmetic."""
    return reference(case, kv, sinks=case.sinks).to(case.q.dtype)


@pytest.mark.parametrize("fallback", [_dequantise_then_attend, _torch_fallback],
                         ids=["dequantise-then-attend", "torch-fallback"])
@pytest.mark.parametrize("fmt", FUSED)
def test_path_check_catches_fallbacks(fmt, fallback):
    """Negative control of assert_fused_variant: both fallbacks give (nearly) the right
    numbers, so only the path check can tell them from the fused kernel, and it does."""
    case = make_decode_case((9, 40), hq=8, hkv=2, head_dim=64, page_size=16)
    kv = pack_case(case, fmt)
    with record_launches() as runs:
        out = fallback(case, kv)
    torch.testing.assert_close(out.double(), reference(case, kv, sinks=case.sinks),
                               atol=2e-2, rtol=2e-2)  # numbers alone would pass
    with pytest.raises(AssertionError, match=re.escape(f"{fmt}: ")):
        assert_fused_variant(runs, fmt)
