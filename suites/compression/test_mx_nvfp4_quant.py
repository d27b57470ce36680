"""MXFP8 and NVFP4 quantisers (kvperf_kernels.quant.mxfp8 / .nvfp4): kernels against references
(bit-exact: element bytes, E8M0 / E4M3 block scales, global scale), references against the
formats' definitions (hand-checked values), round-trip accuracy recorded with ``kvperf``,
speed on the GPU, and the error contract.

The references follow TransformerEngine's rules (MXFP8: ``float_to_e8m0`` of amax * fl(1/448)
and ``exp2f_rcp``; NVFP4: ``reference_nvfp4.py``, 1x16 tiles, RNE, no RHT).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kvperf_kernels.formats.codecs import (
    E2M1_VALUES,
    RCP_E4M3_MAX,
    e2m1_encode_ref,
    e8m0_decode_ref,
    e8m0_encode_ref,
    encode_e2m1,
    pack_nibbles_ref,
    unpack_nibbles_ref,
)
from kvperf_kernels.quant.mxfp8 import (
    MX_BLOCK,
    dequantize_mxfp8,
    dequantize_mxfp8_ref,
    quantize_mxfp8,
    quantize_mxfp8_ref,
)
from kvperf_kernels.quant.nvfp4 import (
    NVFP4_BLOCK,
    dequantize_nvfp4,
    dequantize_nvfp4_ref,
    quantize_nvfp4,
    quantize_nvfp4_ref,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DTYPES = [BF16, FP16, FP32]
GPU = pytest.mark.gpu
# NaN/Inf/zero-scale cases make numpy warn inside Triton's CPU interpreter (not on a GPU)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

CPU_SHAPES = [(4, 2, 64), (33, 8, 128), (5, 96)]  # 96: three 32-blocks, six 16-blocks
GPU_SHAPES = [(65536, 8, 128), (16384, 1, 576)]
SHAPES = CPU_SHAPES + [pytest.param(s, marks=GPU) for s in GPU_SHAPES]

LAB_FP8_COSINE_MIN = 0.99
LAB_NVFP4_COSINE_MIN = 0.98
# Relative L2 bounds for KV-like data, from the element formats: E4M3 keeps 3 mantissa
# bits (rms relative error ~0.026, measured 0.016..0.031); E2M1 steps are 0.5/1/2 on
# 0..6, a relative half-step of up to 1/4 (rms ~0.09 measured 0.078..0.10 with the
# tensor's own global amax).
MXFP8_REL_L2_MAX = 0.035
NVFP4_REL_L2_MAX = 0.12


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


def _dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()


# ======================================================================================
# MXFP8
# ======================================================================================

@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_mxfp8_matches_reference(shape, dtype, make_kv, kvperf, checks):
    x = make_kv(shape, dtype, seed=21)
    q, e = quantize_mxfp8(x)
    q_ref, e_ref = quantize_mxfp8_ref(x)
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn
    assert e.shape == (*shape[:-1], shape[-1] // MX_BLOCK) and e.dtype == torch.uint8
    checks.same_bytes(e, e_ref, "E8M0 block scales")
    checks.same_bytes(q, q_ref, "MXFP8 elements")
    # a finite block's largest element lands in [224, 448]: the scale is a ceil power of 2
    top = (q.view(torch.uint8) & 0x7F).reshape(*e.shape, MX_BLOCK).amax(-1)
    assert ((top >= 0x76) & (top <= 0x7E)).all()

    x_hat = dequantize_mxfp8(q, e)
    checks.same_floats(x_hat, dequantize_mxfp8_ref(q, e), "MXFP8 dequantize kernel")
    m = kvperf.errors(x_hat, x.float(), prefix="mxfp8_roundtrip_")
    assert m["cosine"] >= LAB_FP8_COSINE_MIN
    assert m["rel_l2_err"] <= MXFP8_REL_L2_MAX
    checks.e4m3_error_bound(x.float(), x_hat, e8m0_decode_ref(e))


@pytest.mark.parametrize("out_dtype", [BF16, FP16], ids=_dtype_id)
def test_mxfp8_dequantize_to_16bit_matches_reference(out_dtype, make_kv, checks):
    q, e = quantize_mxfp8_ref(make_kv((6, 128), FP32, seed=22))
    out = dequantize_mxfp8(q, e, out_dtype)
    assert out.dtype == out_dtype and torch.isfinite(out).all()
    checks.same_floats(out, dequantize_mxfp8_ref(q, e, out_dtype), f"dequantize -> {out_dtype}")


def test_e8m0_encoding_of_hand_checked_values():
    """Smallest power of two >= v (ceil), TE's saturation and special codes."""
    cases = [
        (1.0, 127), (1.5, 128), (0.75, 127), (2.0**-7, 120), (2.0**-7 * 1.0001, 121),
        (2.0**127, 254), (3.0e38, 254), (float("inf"), 254), (float("nan"), 255), (0.0, 0),
        (2.0**-127, 0),  # the fp32 subnormal 0x00400000: code 0 means exactly 2^-127
        (2.0**-127 * 1.5, 1), (2.0**-126, 1), (1e-45, 0),
    ]
    v = torch.tensor([c for c, _ in cases], dtype=torch.float32)
    got = e8m0_encode_ref(v).tolist()
    assert got == [e for _, e in cases], got
    decoded = e8m0_decode_ref(torch.tensor([0, 1, 120, 127, 254, 255], dtype=torch.uint8))
    assert decoded[:5].tolist() == [2.0**-127, 2.0**-126, 2.0**-7, 1.0, 2.0**127]
    assert torch.isnan(decoded[5])


@pytest.mark.parametrize("power", [-20, 0, 9])
def test_mxfp8_representable_block_roundtrips_exactly(power, quant_device, checks):
    """A block of E4M3 values times 2^power (amax 448 * 2^power) -> scale 2^power, exact q.

    fl(1/448) is 1/448 (1 + 4.5e-8), so fl32(448 * 2^power * fl(1/448)) is exactly
    2^power and the ceil keeps it; 1.0001 times that amax needs the next power of two.
    """
    grid = torch.tensor([c for c in range(256) if (c & 0x7F) != 0x7F], dtype=torch.uint8)
    grid = grid[torch.randperm(254, generator=torch.Generator().manual_seed(23))][:224]
    grid[::32] = 0x7E  # 448 in every block
    values = grid.view(torch.float8_e4m3fn).float()
    assert (torch.tensor(448.0) * RCP_E4M3_MAX).item() == 1.0
    x = (values * 2.0**power).reshape(-1, 32).to(quant_device)
    x_up = x * 1.0001
    for (q, e), what in ((quantize_mxfp8(x), "kernel"), (quantize_mxfp8_ref(x), "reference")):
        assert (_cpu(e) == 127 + power).all(), f"{what}: {e.flatten().tolist()}"
        checks.same_bytes(_cpu(q).flatten(), grid.view(torch.float8_e4m3fn), f"{what}: codes")
        assert torch.equal(_cpu(dequantize_mxfp8(q, e)), _cpu(x)), f"{what}: exact round trip"
    for (_, e), what in ((quantize_mxfp8(x_up), "kernel"), (quantize_mxfp8_ref(x_up), "reference")):
        top_blocks = (x_up.abs().amax(-1) > 448 * 2.0**power).cpu()
        assert (_cpu(e)[top_blocks] == 128 + power).all(), what


def test_mxfp8_ties_zero_and_subnormals(quant_device):
    """Scale 2^0 (amax 448): RNE ties, E4M3 subnormals, +-0 and an all-zero block (code 0)."""
    ties = [1.0625, 1.1875, 17.0, 19.0, 248.0, 2.0**-10, 3 * 2.0**-10, 7.5 * 2.0**-9, -0.0,
            -19.0, 2.0**-9, -(2.0**-12)]
    expect = [1.0, 1.25, 16.0, 20.0, 256.0, 0.0, 2.0**-8, 2.0**-6, -0.0, -20.0, 2.0**-9, -0.0]
    x = torch.zeros(2, 32)
    x[0, 0] = 448.0
    x[0, 1:1 + len(ties)] = torch.tensor(ties)
    for (q, e), what in ((quantize_mxfp8(x.to(quant_device)), "kernel"),
                         (quantize_mxfp8_ref(x), "reference")):
        assert _cpu(e).tolist() == [[127], [0]], what
        got = _cpu(q)[0, 1:1 + len(ties)].float()
        assert torch.equal(got, torch.tensor(expect)), f"{what}: {got.tolist()}"
        assert torch.equal(torch.signbit(got), torch.signbit(torch.tensor(expect))), what
        assert (_cpu(q)[1].view(torch.uint8) == 0).all(), f"{what}: zero block"
        x_hat = _cpu(dequantize_mxfp8(q.to(quant_device), e.to(quant_device)))
        assert (x_hat[1] == 0).all()


def test_mxfp8_nan_and_inf_blocks(quant_device, checks):
    """NaN in a block -> scale 0xFF (the whole block decodes NaN); Inf -> 0xFE (TE)."""
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(24))
    x[0, 40] = float("nan")
    x[1, 70] = float("inf")
    q, e = quantize_mxfp8(x.to(quant_device))
    q_ref, e_ref = quantize_mxfp8_ref(x)
    assert _cpu(e).tolist() == _cpu(e_ref).tolist()
    assert _cpu(e)[0, 1].item() == 0xFF and _cpu(e)[1, 2].item() == 0xFE
    nan_codes = (_cpu(q).view(torch.uint8) & 0x7F) == 0x7F
    assert torch.equal(nan_codes, (q_ref.view(torch.uint8) & 0x7F) == 0x7F)
    checks.same_bytes(_cpu(q)[~nan_codes], q_ref[~nan_codes], "finite codes")
    x_hat = _cpu(dequantize_mxfp8(q, e)).reshape(2, 3, 32)
    assert torch.isnan(x_hat[0, 1]).all(), "a NaN block must decode to NaN as a whole"
    assert torch.isfinite(x_hat[0, 0]).all() and torch.isfinite(x_hat[0, 2]).all()
    assert torch.isfinite(x_hat[1, :2]).all()


@GPU
@pytest.mark.parametrize("shape", [(65536, 8, 128)], ids=_shape_id)
def test_mxfp8_speed(shape, make_kv, kv_bench, checks):
    x = make_kv(shape, BF16, seed=25)
    moved = x.numel() * 2 + x.numel() + x.numel() // MX_BLOCK  # bf16 in, e4m3 + e8m0 out
    res = kv_bench(quantize_mxfp8, x, bytes_moved=moved)
    q_ref, e_ref = quantize_mxfp8_ref(x)
    checks.same_bytes(res.value[0], q_ref, "timed MXFP8 elements")
    checks.same_bytes(res.value[1], e_ref, "timed E8M0 scales")


# ======================================================================================
# NVFP4
# ======================================================================================

def _nvfp4_both(x: torch.Tensor, global_amax, device):
    """(kernel, reference) quantisation of x: (packed, block_scale, global_scale) each."""
    return (quantize_nvfp4(x.to(device), global_amax), quantize_nvfp4_ref(x, global_amax))


def _nvfp4_error_bound(x, x_hat, block_scale, global_scale) -> float:
    """Max excess over |x - x_hat| <= max(S/4, |x|/4) + fp32 rounding, S = s * g_dec.

    E2M1 rounds |y| < 2 to steps of 0.5, [2, 4) to 1, [4, 6] to 2: half a step is at most
    max(0.25, |y| / 4). Valid when the global amax covers the data (no block scale is
    clamped at 448); checked on blocks whose E4M3 scale is normal, as its rounding then
    pushes |y| at most 2^-4 past 6, still within the bound. Returns the fraction checked.
    """
    s = block_scale.float()  # on the data's device: GPU cases are 67M elements
    ok_blocks = s >= 2.0**-6
    scale = (s * global_scale.float()).double()
    x64 = x.double().reshape(*s.shape, NVFP4_BLOCK)
    err = (x64 - x_hat.double().reshape(x64.shape)).abs()
    bound = torch.maximum(scale.unsqueeze(-1) / 4, x64.abs() / 4) * (1 + 2.0**-20) + 1e-30
    excess = (err - bound)[ok_blocks]
    assert excess.numel() == 0 or excess.max().item() <= 0.0, (
        f"NVFP4 error above the E2M1 half-step bound by {excess.max().item():.3g}"
    )
    return ok_blocks.float().mean().item()


@pytest.mark.parametrize("calibrated", [False, True], ids=["own_amax", "calibrated_2x"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_nvfp4_matches_reference(shape, dtype, calibrated, make_kv, kvperf, checks):
    """Own amax (None) and a calibrated global amax twice the data's (headroom)."""
    x = make_kv(shape, dtype, seed=26)
    global_amax = 2 * x.float().abs().max().item() if calibrated else None
    packed, s, g = quantize_nvfp4(x, global_amax)
    packed_ref, s_ref, g_ref = quantize_nvfp4_ref(x, global_amax)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and packed.dtype == torch.uint8
    assert s.shape == (*shape[:-1], shape[-1] // NVFP4_BLOCK) and s.dtype == torch.float8_e4m3fn
    assert g.shape == (1,) and g.dtype == torch.float32 and torch.isfinite(g).all()
    checks.same_floats(g, g_ref, "global (decode) scale")
    checks.same_bytes(s, s_ref, "E4M3 block scales")
    checks.same_bytes(packed, packed_ref, "packed E2M1")
    amax = x.float().abs().max().item() * (2 if calibrated else 1)
    assert g.item() == pytest.approx(amax / 2688.0, rel=2**-22)  # decode = amax / (448 * 6)

    x_hat = dequantize_nvfp4(packed, s, g)
    checks.same_floats(x_hat, dequantize_nvfp4_ref(packed, s, g), "NVFP4 dequantize kernel")
    m = kvperf.errors(x_hat, x.float(), prefix="nvfp4_roundtrip_")
    assert m["cosine"] >= LAB_NVFP4_COSINE_MIN
    assert m["rel_l2_err"] <= NVFP4_REL_L2_MAX * (1.25 if calibrated else 1.0)
    checked = _nvfp4_error_bound(x.float(), x_hat, s, g)
    assert checked >= 0.99, f"only {checked:.1%} of blocks have a normal E4M3 scale"


@pytest.mark.parametrize("out_dtype", [BF16, FP16], ids=_dtype_id)
def test_nvfp4_dequantize_to_16bit_matches_reference(out_dtype, make_kv, checks):
    packed, s, g = quantize_nvfp4_ref(make_kv((6, 128), FP32, seed=27))
    out = dequantize_nvfp4(packed, s, g, out_dtype)
    assert out.dtype == out_dtype and out.shape == (6, 128) and torch.isfinite(out).all()
    checks.same_floats(out, dequantize_nvfp4_ref(packed, s, g, out_dtype), f"-> {out_dtype}")


def test_nvfp4_global_amax_forms_agree(make_kv, quant_device, checks):
    """None, the exact amax as a float, and as a float32 tensor give the same bytes."""
    x = make_kv((8, 64), BF16, seed=28)
    amax = x.float().abs().max()
    base = quantize_nvfp4(x)
    for ga in (amax.item(), amax.reshape(1).to(quant_device)):
        for got, want, what in zip(quantize_nvfp4(x, ga), base, ("packed", "scales", "g"),
                                   strict=True):
            checks.same_bytes(got, want, f"global_amax={type(ga).__name__}: {what}")


@pytest.mark.parametrize("global_amax", [1e-40, 2.0**-149, 1e-30, 1e30, 3.4e38])
def test_nvfp4_extreme_global_amax_matches_reference(global_amax, make_kv, checks):
    """The kernel's own global-scale arithmetic (g_enc = min(2688 / amax, FLT_MAX), then
    1 / g_enc) equals the reference's where it overflows (subnormal amax -> FLT_MAX, kept
    subnormal: no flush to zero) and where g_dec is tiny or huge."""
    x = make_kv((4, 64), FP32, seed=29)
    x = x / x.abs().max() * global_amax / 2
    got = quantize_nvfp4(x, global_amax)
    want = quantize_nvfp4_ref(x.cpu(), global_amax)
    for a, b, what in zip(got, want, ("packed", "block scales", "global scale"), strict=True):
        checks.same_bytes(a.cpu(), b, f"global_amax={global_amax:g}: {what}")


def test_e2m1_grid_roundtrips_exactly(quant_device, checks):
    """global amax 2688 -> g_enc = 1; a block with amax 6 -> block scale 1.0: the 15
    distinct E2M1 values are their own codes (+ a duplicate 6 pinning the amax)."""
    codes = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 7], dtype=torch.uint8)
    x = torch.tensor([E2M1_VALUES[c & 7] * (-1 if c & 8 else 1) for c in codes.tolist()])
    x = x.reshape(1, 16)
    for (packed, s, g), what in zip(_nvfp4_both(x, 2688.0, quant_device), ("kernel", "ref"),
                                    strict=True):
        assert _cpu(g).item() == 1.0 and _cpu(s).float().item() == 1.0, what
        checks.same_bytes(_cpu(packed), pack_nibbles_ref(codes.reshape(1, 16)), f"{what} codes")
        x_hat = _cpu(dequantize_nvfp4(packed.to(quant_device), s.to(quant_device),
                                      g.to(quant_device)))
        assert torch.equal(x_hat, x), f"{what}: exact round trip"


def test_e2m1_ties_to_even_and_signs(quant_device):
    """Block scale 1: midpoints go to the even code; -0.0 -> +0 and tiny negatives -> -0
    (TE's table); the even element sits in the low nibble."""
    #            value  -> expected code
    cases = [(6.0, 7), (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6),
             (5.0, 6), (-0.25, 8), (-5.0, 14), (-0.0, 0), (-0.1, 8), (0.3, 1), (2.6, 5),
             (5.1, 7), (-1.74, 11)]
    x = torch.tensor([[v for v, _ in cases]])
    expected = torch.tensor([[c for _, c in cases]], dtype=torch.uint8)
    assert torch.equal(e2m1_encode_ref(x), expected)
    for (packed, s, _), what in zip(_nvfp4_both(x, 2688.0, quant_device), ("kernel", "ref"),
                                    strict=True):
        assert _cpu(s).float().item() == 1.0
        got = unpack_nibbles_ref(_cpu(packed))
        assert torch.equal(got, expected), f"{what}: {got.tolist()} != {expected.tolist()}"
        assert _cpu(packed)[0, 0].item() == 0x07  # element 0 (code 7) low, element 1 (0) high


@triton.jit
def _encode_e2m1_kernel(y_ptr, code_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(code_ptr + offs, encode_e2m1(tl.load(y_ptr + offs, mask=ok, other=0.0)), mask=ok)


def test_e2m1_encoder_on_dense_values(quant_device):
    """The quantiser's arithmetic E2M1 encoder against the nearest-value reference of the
    value clamped to +-6: every fp32 within 4096 ulps of each tie point and grid value
    (both signs), 2^18 random values in [-8, 8], zeros, subnormals, huge values, Inf, NaN."""
    points = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, *E2M1_VALUES]
    near = torch.tensor(points).view(torch.int32)[:, None] + torch.arange(-4096, 4097)
    near = near.flatten().view(torch.float32)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 6.0, -6.0, 3.4e38,
                            -3.4e38, float("inf"), -float("inf"), float("nan"), -float("nan")])
    rand = (torch.rand(1 << 18, generator=torch.Generator().manual_seed(40)) * 16 - 8)
    y = torch.cat([near, -near, special, rand])
    codes = torch.empty(y.numel(), dtype=torch.int32, device=quant_device)
    block = 4096
    _encode_e2m1_kernel[(triton.cdiv(y.numel(), block),)](y.to(quant_device), codes,
                                                           y.numel(), BLOCK=block)
    expected = e2m1_encode_ref(y.clamp(-6.0, 6.0)).to(torch.int32)  # clamp keeps NaN
    differ = (_cpu(codes) != expected).nonzero().flatten()
    assert not differ.numel(), (
        f"{differ.numel()} of {y.numel()} values encode wrongly, e.g. "
        f"{y[differ[:5]].tolist()} -> {_cpu(codes)[differ[:5]].tolist()}, "
        f"expected {expected[differ[:5]].tolist()}")


def test_nvfp4_block_scale_saturation_and_subnormal(quant_device):
    """g_enc = 1: block amax 3000 needs scale 500 -> saturates at 448 and its elements clamp
    to +-6; block amax 6 * 2^-8 gets the E4M3 subnormal scale 2^-8 (code 2)."""
    x = torch.zeros(1, 48)
    x[0, :4] = torch.tensor([3000.0, -2688.0, 448.0, 100.0])
    x[0, 16:20] = torch.tensor([6 * 2.0**-8, 2.0**-8, -3 * 2.0**-8, 0.0])
    x[0, 32] = 1.0  # the zero-ish third block: amax 1 -> scale fl(1/6) -> e4m3 0.171875
    for (packed, s, g), what in zip(_nvfp4_both(x, 2688.0, quant_device), ("kernel", "ref"),
                                    strict=True):
        codes = unpack_nibbles_ref(_cpu(packed))[0]
        s_bytes = _cpu(s).view(torch.uint8)[0].tolist()
        assert s_bytes[0] == 0x7E, f"{what}: saturated scale is 448"
        assert codes[:4].tolist() == [7, 15, 2, 0], f"{what}: {codes[:4].tolist()}"
        assert s_bytes[1] == 0x02, f"{what}: subnormal block scale 2^-8"
        assert codes[16:20].tolist() == [7, 2, 13, 0], f"{what}: {codes[16:20].tolist()}"
        x_hat = _cpu(dequantize_nvfp4(packed.to(quant_device), s.to(quant_device),
                                      g.to(quant_device)))
        assert x_hat[0, 0].item() == 6 * 448.0  # the clamp's cost, visible
        assert x_hat[0, 16:20].tolist() == [6 * 2.0**-8, 2.0**-8, -3 * 2.0**-8, 0.0]
        assert x_hat[0, 32].item() == pytest.approx(1.0, rel=0.25)


def test_nvfp4_all_zero_tensor(quant_device):
    """global amax 0 -> g_enc = 1 (not Inf): zero scales, zero codes, exact zeros back."""
    x = torch.zeros(2, 32)
    for (packed, s, g), what in zip(_nvfp4_both(x, None, quant_device), ("kernel", "ref"),
                                    strict=True):
        assert _cpu(g).item() == 1.0, what
        assert (_cpu(packed) == 0).all() and (_cpu(s).float() == 0).all(), what
        x_hat = dequantize_nvfp4(packed.to(quant_device), s.to(quant_device), g.to(quant_device))
        assert (_cpu(x_hat) == 0).all() and torch.isfinite(x_hat).all()


def test_nvfp4_nan_poisons_its_block(quant_device, checks):
    """With a calibrated global amax, a NaN makes only its block's E4M3 scale NaN; with the
    tensor's own amax the global scale is NaN too (every block depends on it)."""
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(29))
    x[1, 20] = float("nan")
    packed, s, g = quantize_nvfp4(x.to(quant_device), 8.0)
    packed_ref, s_ref, g_ref = quantize_nvfp4_ref(x, 8.0)
    checks.same_bytes(_cpu(packed), packed_ref, "packed")
    checks.same_bytes(_cpu(s), s_ref, "block scales")
    nan_scale = torch.isnan(_cpu(s).float())
    assert nan_scale.tolist() == [[False] * 4, [False, True, False, False]]
    x_hat = _cpu(dequantize_nvfp4(packed, s, g)).reshape(2, 4, 16)
    assert torch.isnan(x_hat[1, 1]).all() and torch.isfinite(x_hat[0]).all()
    assert torch.isfinite(x_hat[1, [0, 2, 3]]).all()
    _, _, g_own = quantize_nvfp4(x.to(quant_device))
    assert torch.isnan(g_own).all()


@GPU
@pytest.mark.parametrize("shape", [(65536, 8, 128)], ids=_shape_id)
def test_nvfp4_speed(shape, make_kv, kv_bench, checks):
    x = make_kv(shape, BF16, seed=30)
    # calibrated and already on the device, as an engine keeps it: one launch, no host copy
    amax = x.float().abs().amax().reshape(1)
    moved = x.numel() * 2 + x.numel() // 2 + x.numel() // NVFP4_BLOCK  # in, nibbles, scales
    res = kv_bench(quantize_nvfp4, x, amax, bytes_moved=moved)
    packed_ref, s_ref, _ = quantize_nvfp4_ref(x, amax)
    checks.same_bytes(res.value[0], packed_ref, "timed packed E2M1")
    checks.same_bytes(res.value[1], s_ref, "timed block scales")


# ======================================================================================
# Both: the GPU's conversions vs the integer encoders, and the error contract
# ======================================================================================

@GPU
@pytest.mark.fp8
def test_hardware_cast_equals_integer_encoder(make_kv, quant_device, checks):
    """Tokens spread over 2^-30 .. 2^30: every E8M0 / E4M3 scale range, subnormals included."""
    spread = torch.randint(-30, 30, (4096, 8, 1), generator=torch.Generator().manual_seed(32))
    x = make_kv((4096, 8, 128), FP32, seed=31) * torch.exp2(spread.float()).to(quant_device)
    for hw, ints, what in (
        (quantize_mxfp8(x, hw_cast=True), quantize_mxfp8(x, hw_cast=False), "MXFP8"),
        (quantize_nvfp4(x, hw_cast=True), quantize_nvfp4(x, hw_cast=False), "NVFP4"),
    ):
        for a, b in zip(hw, ints, strict=True):
            checks.same_bytes(a, b, f"{what}: hardware vs integer encode")


QUANTISERS = {"mxfp8": (quantize_mxfp8, MX_BLOCK), "nvfp4": (quantize_nvfp4, NVFP4_BLOCK)}


@pytest.mark.parametrize("name", list(QUANTISERS))
def test_rejects_bad_input(name, quant_device):
    quant, block = QUANTISERS[name]
    good = torch.randn(64, 64, device=quant_device)
    bad_block = f"last dim 40 is not a multiple of the block size {block}"
    with pytest.raises(ValueError, match=bad_block):
        quant(torch.randn(4, 40, device=quant_device))
    with pytest.raises(TypeError, match="float64"):
        quant(good.double())
    with pytest.raises(TypeError, match="torch.Tensor"):
        quant(good.tolist())
    with pytest.raises(ValueError, match="contiguous"):
        quant(good.t())
    with pytest.raises(ValueError, match="0-dim"):
        quant(torch.tensor(1.0, device=quant_device))


def test_nvfp4_rejects_bad_global_amax(quant_device):
    x = torch.randn(4, 32, device=quant_device)
    with pytest.raises(ValueError, match="global_amax must be >= 0, got -1.0"):
        quantize_nvfp4(x, -1.0)
    with pytest.raises(ValueError, match="global_amax must be >= 0, got nan"):
        quantize_nvfp4(x, float("nan"))
    with pytest.raises(TypeError, match="global_amax: expected None, a float or a tensor"):
        quantize_nvfp4(x, "7")
    with pytest.raises(ValueError, match="one element, got torch.float16"):
        quantize_nvfp4(x, torch.ones(1, dtype=torch.float16, device=quant_device))


def test_dequantize_rejects_mismatched_parts(quant_device):
    x = torch.randn(4, 128, device=quant_device)
    q, e = quantize_mxfp8(x)
    with pytest.raises(ValueError, match=r"scale_e8m0 shape \(4, 3\) does not match"):
        dequantize_mxfp8(q, e[:, :3].contiguous())
    with pytest.raises(TypeError, match="uint8 tensor of E8M0 codes, got torch.float32"):
        dequantize_mxfp8(q, e.float())
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize_mxfp8(q.view(torch.uint8), e)
    packed, s, g = quantize_nvfp4(x)
    with pytest.raises(ValueError, match=r"block_scale shape \(4, 2\) does not match"):
        dequantize_nvfp4(packed, s[:, :2].contiguous(), g)
    with pytest.raises(TypeError, match="global_scale: expected a float32 tensor"):
        dequantize_nvfp4(packed, s, 0.5)
    with pytest.raises(TypeError, match="output dtype torch.int32"):
        dequantize_nvfp4(packed, s, g, torch.int32)
    with pytest.raises(ValueError, match="packed must be contiguous"):
        dequantize_nvfp4(torch.zeros(32, 4, dtype=torch.uint8, device=quant_device).t(),
                         torch.zeros(4, 4, dtype=torch.float8_e4m3fn, device=quant_device), g)
