"""MXFP8 (E4M3 + E8M0 per 32) and NVFP4 (E2M1 + E4M3 per 16 + fp32 per tensor) quantisers.

What is checked, and against what:
- the bit-level rules (E8M0 ceil encoding, E2M1 nearest-even encoding, nibble packing)
  against hand-checked tables and against TE's threshold formulation of E2M1;
- kernel vs torch reference: byte-exact values, scales and global scale, on the GPU and in
  the CPU interpreter alike (on an FP8 GPU both the hardware cast and the integer encoder);
- reference vs format definition: exact roundtrip of representable blocks, ceil property of
  E8M0 scales, ties to even and saturation at +-6 for E2M1, zero blocks, NaN handling;
- dequantise(quantise(x)) per-element error within the format's half-step bound, cosine
  >= 0.99 (MXFP8) / >= 0.98 (NVFP4, the lab's bar), recorded with kvperf;
- the error contract.
"""

from __future__ import annotations

import math

import pytest
import torch
from kvperf_kernels import mxfp8 as mx
from kvperf_kernels import nvfp4 as nv
from kvperf_kernels._device import default_device
from kvperf_kernels.fp_formats import (
    E2M1_VALUES,
    FP32_MAX,
    e2m1_decode_ref,
    e2m1_encode_ref,
    e8m0_decode_ref,
    e8m0_encode_ref,
    pack_nibbles_ref,
    unpack_nibbles_ref,
)

# numpy (behind Triton's CPU interpreter) warns about the IEEE operations the kernels do on
# purpose (1/0 -> inf for zero blocks, inf * 0); the GPU computes the same silently.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning"
)

DEVICE = default_device()
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
E4M3 = torch.float8_e4m3fn
ENCODERS = [
    pytest.param(None, id="default"),
    pytest.param(False, id="int-encoder", marks=pytest.mark.gpu),
]
SHAPES = [
    pytest.param((4, 2, 64), id="4x2x64"),
    pytest.param((33, 8, 128), id="33x8x128"),
    pytest.param((4096, 8, 128), id="4096x8x128", marks=pytest.mark.gpu),
]


def _e8m0_ceil_bounds_hold(amax_times_rcp: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """2^(e-128) < s <= 2^(e-127) for s = amax * fp32(1/448) (normal range, per block)."""
    e = code.to(torch.float64) - 127
    s = amax_times_rcp.double()
    return (s <= torch.pow(2.0, e)) & (s > torch.pow(2.0, e - 1))


# --------------------------------------------------------------------------------------
# Bit-level rules
# --------------------------------------------------------------------------------------

E8M0_TABLE = [  # (value, code): smallest power of two >= value, code = exponent + 127
    (1.0, 127),
    (1.5, 128),
    (2.0, 128),
    (2.0 + 2.0**-22, 129),
    (0.75, 127),
    (0.5, 126),
    (2.0**-126, 1),
    (1.5 * 2.0**-127, 1),  # fp32 subnormal above 2^-127: rounds up to 2^-126
    (2.0**-127, 0),  # exactly the smallest E8M0 value
    (2.0**-130, 0),  # below it: clamps to the smallest code
    (0.0, 0),
    (2.0**127, 254),
    (3.0e38, 254),  # above 2^127: saturates (no 2^128)
    (math.inf, 254),  # TE: +Inf saturates
    (math.nan, 255),  # the E8M0 NaN
]


def test_e8m0_encoding_hand_checked():
    v = torch.tensor([x for x, _ in E8M0_TABLE], dtype=torch.float32)
    assert e8m0_encode_ref(v).tolist() == [c for _, c in E8M0_TABLE]
    decoded = e8m0_decode_ref(torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8))
    assert decoded[:-1].tolist() == [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127]
    assert math.isnan(decoded[-1].item())


E2M1_TABLE = [  # (input, code): midpoints tie to the even code (TE's thresholds)
    (0.0, 0), (0.25, 0), (0.2500001, 1), (0.5, 1), (0.75, 2), (1.0, 2), (1.25, 2),
    (1.2500001, 3), (1.5, 3), (1.75, 4), (2.5, 4), (2.5000002, 5), (3.0, 5), (3.5, 6),
    (5.0, 6), (5.0000005, 7), (6.0, 7),
    (-0.1, 8), (-0.75, 10), (-1.75, 12), (-3.5, 14), (-5.0, 14), (-6.0, 15),
    (-0.0, 0),  # TE: -0.0 is not < 0, so it encodes as +0
    (math.nan, 0),  # E2M1 has no NaN; TE's table leaves it at 0
]


def test_e2m1_encoding_hand_checked():
    y = torch.tensor([v for v, _ in E2M1_TABLE], dtype=torch.float32)
    assert e2m1_encode_ref(y).tolist() == [c for _, c in E2M1_TABLE]
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode_ref(codes)
    assert values.tolist() == list(E2M1_VALUES) + [-v for v in E2M1_VALUES]
    assert torch.signbit(values[8]).item()  # code 8 is -0.0


def test_e2m1_encoding_matches_te_thresholds():
    """Nearest-with-ties-to-even (the reference) equals TE's threshold table everywhere:
    a dense grid plus every midpoint and its fp32 neighbours."""
    grid = torch.linspace(-6.0, 6.0, 24001)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    mids = torch.cat([mids, -mids])
    near = torch.cat([mids, torch.nextafter(mids, mids * 2), torch.nextafter(mids, mids * 0)])
    y = torch.cat([grid, near])
    a = y.abs()
    te = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
          + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int()) | ((y < 0).int() << 3)
    assert torch.equal(e2m1_encode_ref(y).int(), te)


def test_nibble_packing_order():
    """Element 2k in the low nibble, 2k+1 in the high nibble; unpack inverts pack."""
    codes = torch.tensor([[0x2, 0xF, 0x7, 0x8]], dtype=torch.uint8)
    packed = pack_nibbles_ref(codes)
    assert packed.tolist() == [[0xF2, 0x87]]
    assert torch.equal(unpack_nibbles_ref(packed), codes)


# --------------------------------------------------------------------------------------
# MXFP8
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw_cast", ENCODERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_mxfp8_kernel_matches_reference(shape, dtype, hw_cast, kv_data, assert_same_codes):
    x = kv_data(shape, dtype, seed=21)
    x.view(-1, 32)[::7] *= 2.0**-20  # some blocks far below the rest: small scale codes
    q_out = torch.full(shape, 0x7F, dtype=torch.uint8, device=DEVICE).view(E4M3)
    s_out = torch.full(shape[:-1] + (shape[-1] // 32,), 0xFF, dtype=torch.uint8, device=DEVICE)
    q, scale = mx.quantize_mxfp8(x, out=q_out, scale_out=s_out, hw_cast=hw_cast)
    q_ref, scale_ref = mx.quantize_mxfp8_ref(x)
    assert q.data_ptr() == q_out.data_ptr() and scale.data_ptr() == s_out.data_ptr()
    assert_same_codes(scale, scale_ref, "E8M0 scales", nan_mask=None)
    assert_same_codes(q, q_ref, "MXFP8 values")
    assert (scale != 0xFF).all() and torch.isfinite(q.float()).all()
    for out_dtype in DTYPES:
        got = mx.dequantize_mxfp8(q, scale, out_dtype, hw_cast=hw_cast)
        torch.testing.assert_close(got, mx.dequantize_mxfp8_ref(q_ref, scale_ref, out_dtype),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_mxfp8_scale_is_the_ceil_power_of_two(impl, kv_data):
    """Every block's 2^(e-127) is the smallest power of two >= amax * fp32(1/448), so
    |x| * 2^-(e-127) <= 448: saturation never clips more than the reciprocal's rounding."""
    x = kv_data((64, 256), torch.float32, seed=22)
    x = x * torch.pow(2.0, torch.randint(-30, 30, (64, 1), generator=torch.Generator()
                                         .manual_seed(23)).float()).to(DEVICE)
    q, code = (mx.quantize_mxfp8 if impl == "kernel" else mx.quantize_mxfp8_ref)(x)
    amax = x.view(64, 8, 32).abs().amax(-1)
    s = amax * torch.tensor(1 / 448, dtype=torch.float32)
    assert _e8m0_ceil_bounds_hold(s, code).all()
    # the block max maps into [224, 448] in E4M3 units: the top binade is used
    top = q.float().view(64, 8, 32).abs().amax(-1)
    assert ((top >= 224) & (top <= 448)).all()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_mxfp8_representable_blocks_roundtrip_exactly(impl):
    """Blocks of E4M3 values times 2^k with amax 448 * 2^k (scale code 127 + k), and blocks
    whose amax (288) is not 448 (scale 2^0): q and dequant are exact."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    v = codes.view(E4M3).float()
    v = v[torch.isfinite(v) & (v.abs() <= 288)]
    g = torch.Generator().manual_seed(24)
    blocks = v[torch.randint(0, v.numel(), (8, 32), generator=g)]
    blocks[:4, 5] = 448.0
    blocks[4:, 5] = 288.0
    k = torch.tensor([-20, -3, 0, 9, -20, -3, 0, 9], dtype=torch.float32)
    x = (blocks * torch.pow(2.0, k)[:, None]).reshape(2, 128).to(DEVICE)
    q, code = (mx.quantize_mxfp8 if impl == "kernel" else mx.quantize_mxfp8_ref)(x)
    assert code.flatten().tolist() == [107, 124, 127, 136, 107, 124, 127, 136]
    torch.testing.assert_close(mx.dequantize_mxfp8(q, code), x, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_mxfp8_zero_and_nan_blocks(impl, kv_data):
    """A zero block gets code 0x00 and dequantises to (signed) zeros; a NaN block gets the
    E8M0 NaN 0xFF and dequantises to NaN; the other blocks are untouched."""
    x = kv_data((2, 128), torch.float32, seed=25)
    x[0, :32] = 0.0
    x[0, 1:32:2] = -0.0
    x[1, 70] = math.nan
    q, code = (mx.quantize_mxfp8 if impl == "kernel" else mx.quantize_mxfp8_ref)(x)
    assert code[0, 0].item() == 0x00 and code[1, 2].item() == 0xFF
    x_hat = mx.dequantize_mxfp8(q, code)
    assert (x_hat[0, :32] == 0).all()
    assert torch.equal(torch.signbit(x_hat[0, :32]), torch.signbit(x[0, :32]))
    assert torch.isnan(x_hat[1, 64:96]).all()
    assert torch.isnan(q.float()[1, 64:96]).all()  # the block's values are poisoned too
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1, 2] = False
    keep = keep.repeat_interleave(32, dim=1).to(DEVICE)
    assert torch.isfinite(x_hat[keep]).all()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_mxfp8_extreme_block_scales(impl, assert_same_codes):
    """fp32 blocks at the ends of the E8M0 range: s = amax * fp32(1/448) at or below 2^-127
    (an fp32 subnormal) clamps to code 0, just above it rounds up to code 1, huge amax
    saturates below 0xFF; the kernel agrees with the reference on every one."""
    amax = torch.tensor([
        448 * 2.0**-127,  # s = 2^-127 exactly (fp32 subnormal 0x00400000): code 0
        448 * 1.5 * 2.0**-128,  # s = 0.75 * 2^-127: still <= 2^-127, code 0
        448 * 1.5 * 2.0**-127,  # s = 1.5 * 2^-127: code 1 (2^-126)
        448 * 2.0**-140,  # deep subnormal s: code 0
        448 * 2.0**-126,  # s = 2^-126: code 1
        3.0e38,  # s ~ 2^119.0: code 247
    ], dtype=torch.float32)
    g = torch.Generator().manual_seed(27)
    blocks = (torch.rand(amax.numel(), 32, generator=g) * 2 - 1) * amax[:, None]
    blocks[:, 9] = amax
    x = blocks.reshape(2, 96).to(DEVICE)
    q, code = (mx.quantize_mxfp8 if impl == "kernel" else mx.quantize_mxfp8_ref)(x)
    assert code.flatten().tolist() == [0, 0, 1, 0, 1, 247]
    q_ref, code_ref = mx.quantize_mxfp8_ref(x)
    assert_same_codes(q, q_ref, "MXFP8 values of extreme blocks")
    x_hat = mx.dequantize_mxfp8(q, code)
    assert torch.isfinite(x_hat).all()
    scale = e8m0_decode_ref(code).double().repeat_interleave(32, dim=-1)
    xa = x.double().abs()
    bound = torch.maximum(xa * 2.0**-4, scale * 2.0**-10) + xa * 2.0**-20 + 2.0**-149
    assert ((x_hat.double() - x.double()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mxfp8_roundtrip_error(dtype, kv_data, kvperf):
    x = kv_data((33, 8, 128), dtype, seed=26)
    q, code = mx.quantize_mxfp8(x)
    x_hat = mx.dequantize_mxfp8(q, code)
    scale = e8m0_decode_ref(code).double().repeat_interleave(32, dim=-1)
    xa = x.double().abs()
    # half an E4M3 step (normal / subnormal), plus a few fp32 roundings
    bound = torch.maximum(xa * 2.0**-4, scale * 2.0**-10) + xa * 2.0**-20
    worst = ((x_hat.double() - x.double()).abs() / bound).max().item()
    assert worst <= 1.0, f"an element exceeds E4M3's half-step bound by x{worst:.3f}"
    m = kvperf.errors(x_hat, x.float(), prefix="mxfp8_roundtrip_")
    assert m["cosine"] >= 0.99, f"cosine {m['cosine']:.5f} < 0.99"
    assert m["rel_l2_err"] <= 0.05


# --------------------------------------------------------------------------------------
# NVFP4
# --------------------------------------------------------------------------------------

TE_GLOBAL_AMAX = 448.0 * 6.0  # global_enc = 1: block scales and values are read directly


@pytest.mark.parametrize("given_amax", [False, True], ids=["tensor_amax", "given_amax"])
@pytest.mark.parametrize("hw_cast", ENCODERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_kernel_matches_reference(shape, dtype, hw_cast, given_amax, kv_data,
                                        assert_same_codes):
    x = kv_data(shape, dtype, seed=31)
    x.view(-1, 16)[::5] *= 2.0**-12  # blocks whose E4M3 scale lands in the subnormals
    amax = torch.tensor([3.0], device=DEVICE) if given_amax else None  # < max|x|: saturates
    packed_out = torch.full(shape[:-1] + (shape[-1] // 2,), 0xAB, dtype=torch.uint8,
                            device=DEVICE)
    s_out = torch.full(shape[:-1] + (shape[-1] // 16,), 0x7F, dtype=torch.uint8,
                       device=DEVICE).view(E4M3)
    packed, bscale, gscale = nv.quantize_nvfp4(x, amax, out=packed_out, scale_out=s_out,
                                               hw_cast=hw_cast)
    p_ref, b_ref, g_ref = nv.quantize_nvfp4_ref(x, amax)
    assert packed.data_ptr() == packed_out.data_ptr() and bscale.data_ptr() == s_out.data_ptr()
    torch.testing.assert_close(gscale, g_ref, rtol=0, atol=0)
    assert_same_codes(bscale, b_ref, "E4M3 block scales")
    assert_same_codes(packed, p_ref, "packed E2M1", nan_mask=None)
    assert torch.isfinite(bscale.float()).all()
    for out_dtype in DTYPES:
        got = nv.dequantize_nvfp4(packed, bscale, gscale, out_dtype, hw_cast=hw_cast)
        ref = nv.dequantize_nvfp4_ref(p_ref, b_ref, g_ref, out_dtype)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_nvfp4_global_scales_hand_checked():
    """global_enc = 2688 / amax (min FP32_MAX; 0 -> 1); the returned scale is 1 / global_enc."""
    amax = torch.tensor([2688.0, 1.0, 0.0, math.inf, 5376.0])
    enc, dec = nv.nvfp4_global_scales_ref(amax)
    assert enc.tolist() == [1.0, 2688.0, FP32_MAX, 1.0, 0.5]
    assert dec.tolist()[:2] == [1.0, float(torch.tensor(1 / 2688, dtype=torch.float32))]
    x = torch.ones(2, 16, device=DEVICE)
    for given, expected in ((2688.0, 1.0), (5376.0, 2.0), (None, 1 / 2688), (math.inf, 1.0)):
        _, _, gscale = nv.quantize_nvfp4(x, given)
        assert gscale.item() == pytest.approx(expected, rel=2**-23), given


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nvfp4_representable_blocks_roundtrip_exactly(impl):
    """With global_enc = 1, blocks of E2M1 values times 2^k whose amax is 6 * 2^k get block
    scale 2^k exactly: codes and dequantised values are exact."""
    g = torch.Generator().manual_seed(32)
    grid = torch.tensor(E2M1_VALUES)
    grid = torch.cat([grid, -grid])
    blocks = grid[torch.randint(0, 16, (8, 16), generator=g)]
    blocks[:, 3] = 6.0
    k = torch.tensor([-8, -2, 0, 1, 3, 5, 6, 0], dtype=torch.float32)
    x = (blocks * torch.pow(2.0, k)[:, None]).reshape(2, 64).to(DEVICE)
    quantize = nv.quantize_nvfp4 if impl == "kernel" else nv.quantize_nvfp4_ref
    packed, bscale, gscale = quantize(x, TE_GLOBAL_AMAX)
    assert gscale.item() == 1.0
    torch.testing.assert_close(bscale.float().flatten(), torch.pow(2.0, k).to(DEVICE),
                               rtol=0, atol=0)
    torch.testing.assert_close(nv.dequantize_nvfp4(packed, bscale, gscale), x, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nvfp4_ties_and_saturation(impl):
    """Block 0 (amax 6, scale 1): the E2M1 midpoints go to the even code. Block 1 (amax
    6.3): its scale 6.3/6 = 1.05 rounds down to E4M3 1.0, so 6.3 saturates to 6 (code 7)."""
    block0 = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0,
              -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0]
    codes0 = [0, 2, 2, 4, 4, 6, 6, 7, 8, 10, 10, 12, 12, 14, 14, 15]
    block1 = [6.3, -6.3, 3.0, 1.0] + [0.5] * 12
    codes1 = [7, 15, 5, 2] + [1] * 12
    x = torch.tensor([block0 + block1], device=DEVICE)
    quantize = nv.quantize_nvfp4 if impl == "kernel" else nv.quantize_nvfp4_ref
    packed, bscale, gscale = quantize(x, TE_GLOBAL_AMAX)
    assert bscale.float().flatten().tolist() == [1.0, 1.0]
    assert unpack_nibbles_ref(packed).flatten().tolist() == codes0 + codes1
    x_hat = nv.dequantize_nvfp4(packed, bscale, gscale)
    assert x_hat[0, 16].item() == 6.0 and x_hat[0, 17].item() == -6.0


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nvfp4_zero_blocks_and_zero_tensor(impl, kv_data):
    quantize = nv.quantize_nvfp4 if impl == "kernel" else nv.quantize_nvfp4_ref
    x = kv_data((2, 64), torch.float32, seed=33)
    x[1, 16:32] = 0.0
    packed, bscale, gscale = quantize(x)
    assert bscale[1, 1].float().item() == 0.0 and (packed[1, 8:16] == 0).all()
    x_hat = nv.dequantize_nvfp4(packed, bscale, gscale)
    assert (x_hat[1, 16:32] == 0).all() and torch.isfinite(x_hat).all()
    # all zeros: global amax 0 -> global_enc = FP32_MAX (TE), everything finite and zero
    packed0, bscale0, gscale0 = quantize(torch.zeros(3, 32, device=DEVICE))
    assert gscale0.item() == pytest.approx(1 / FP32_MAX, rel=2**-20)
    assert (packed0 == 0).all() and (bscale0.float() == 0).all()
    assert (nv.dequantize_nvfp4(packed0, bscale0, gscale0) == 0).all()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nvfp4_nan_is_never_hidden(impl, kv_data):
    """With a given global amax a NaN poisons its 16-element block (block scale = E4M3 NaN);
    with the tensor's own amax (NaN) it poisons the whole tensor."""
    quantize = nv.quantize_nvfp4 if impl == "kernel" else nv.quantize_nvfp4_ref
    x = kv_data((2, 64), torch.float32, seed=34)
    x[1, 40] = math.nan
    packed, bscale, gscale = quantize(x, 20.0)
    x_hat = nv.dequantize_nvfp4(packed, bscale, gscale)
    assert torch.isnan(bscale[1, 2].float()) and torch.isnan(x_hat[1, 32:48]).all()
    assert torch.isfinite(x_hat[0]).all() and torch.isfinite(x_hat[1, :32]).all()
    assert torch.isfinite(x_hat[1, 48:]).all()
    packed, bscale, gscale = quantize(x)
    assert torch.isnan(gscale).all()
    assert torch.isnan(nv.dequantize_nvfp4(packed, bscale, gscale)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_roundtrip_error(dtype, kv_data, kvperf):
    """|x - x_hat| <= half the E2M1 step at |x * enc| (0.25, 0.5, 1 below 2, 4, 6) times the
    block's decode scale, plus what saturation above 6 clips; cosine >= 0.98 (lab)."""
    x = kv_data((33, 8, 128), dtype, seed=35)
    packed, bscale, gscale = nv.quantize_nvfp4(x)
    x_hat = nv.dequantize_nvfp4(packed, bscale, gscale)
    decode = (bscale.double() * gscale.double()).repeat_interleave(16, dim=-1)
    y = x.double().abs() / decode  # the value in E2M1 units
    half_step = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0))
    bound = (half_step + (y - 6).clamp(min=0)) * decode + x.double().abs() * 2.0**-20
    worst = ((x_hat.double() - x.double()).abs() / bound).max().item()
    assert worst <= 1.0, f"an element exceeds the E2M1 half-step bound by x{worst:.3f}"
    m = kvperf.errors(x_hat, x.float(), prefix="nvfp4_roundtrip_")
    assert m["cosine"] >= 0.98, f"cosine {m['cosine']:.5f} < 0.98 (lab bar)"
    # E2M1 keeps 1 mantissa bit: relative rms error ~ 10 % on Gaussian data
    assert m["rel_l2_err"] <= 0.15


@pytest.mark.gpu
@pytest.mark.fp8
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_quantise_speed(fmt, kv_data, kv_bench, assert_same_codes):
    """Quantising a bf16 KV tensor (65536 tokens x 8 heads x 128) to MXFP8 / NVFP4 (the
    hardware E4M3 cast on an FP8 GPU); bytes = input + values + scales. NVFP4 is given its
    global amax (a calibrated cache), so one kernel is timed. Timed outputs are checked."""
    shape = (65536, 8, 128)
    x = kv_data(shape, torch.bfloat16, seed=40)
    n = x.numel()
    if fmt == "mxfp8":
        q = torch.empty(shape, dtype=E4M3, device=DEVICE)
        s = torch.empty(shape[:-1] + (4,), dtype=torch.uint8, device=DEVICE)
        kv_bench(mx.quantize_mxfp8, x, out=q, scale_out=s, bytes_moved=2 * n + n + n // 32)
        q_ref, s_ref = mx.quantize_mxfp8_ref(x)
        assert_same_codes(s, s_ref, "timed E8M0 scales", nan_mask=None)
        assert_same_codes(q, q_ref, "timed MXFP8 values")
    else:
        amax = x.abs().amax().float().reshape(1)
        p = torch.empty(shape[:-1] + (64,), dtype=torch.uint8, device=DEVICE)
        s = torch.empty(shape[:-1] + (8,), dtype=E4M3, device=DEVICE)
        kv_bench(nv.quantize_nvfp4, x, amax, out=p, scale_out=s,
                 bytes_moved=2 * n + n // 2 + n // 16)
        p_ref, s_ref, _ = nv.quantize_nvfp4_ref(x, amax)
        assert_same_codes(s, s_ref, "timed NVFP4 block scales")
        assert_same_codes(p, p_ref, "timed packed E2M1", nan_mask=None)


# --------------------------------------------------------------------------------------
# Error contract
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mxfp8", "nvfp4"])
def test_quantisers_reject_bad_inputs(name):
    quantize, block = (mx.quantize_mxfp8, 32) if name == "mxfp8" else (nv.quantize_nvfp4, 16)
    not_multiple = f"last dim 40 is not a multiple of the block size {block}"
    with pytest.raises(ValueError, match=not_multiple):
        quantize(torch.ones(2, 40, device=DEVICE))
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        quantize(torch.ones(2, 64, dtype=torch.float64, device=DEVICE))
    with pytest.raises(TypeError, match="unsupported dtype torch.int32"):
        quantize(torch.ones(2, 64, dtype=torch.int32, device=DEVICE))
    strided = r"last dim must be contiguous \(stride 1\), got stride 64"
    with pytest.raises(ValueError, match=strided):
        quantize(torch.ones(64, 64, device=DEVICE).t())


def test_nvfp4_rejects_bad_global_amax():
    x = torch.ones(2, 32, device=DEVICE)
    two = r"global_amax must have exactly 1 element, got shape \(2,\)"
    with pytest.raises(ValueError, match=two):
        nv.quantize_nvfp4(x, torch.ones(2, device=DEVICE))
    with pytest.raises(TypeError, match="global_amax must be a float tensor, got torch.int64"):
        nv.quantize_nvfp4(x, torch.ones(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="got str"):
        nv.quantize_nvfp4(x, "1.0")


def test_dequantisers_reject_mismatched_inputs():
    q, code = mx.quantize_mxfp8_ref(torch.ones(2, 64, device=DEVICE))
    with pytest.raises(TypeError, match="scale_e8m0 must be a uint8 tensor, got torch.float32"):
        mx.dequantize_mxfp8(q, code.float())
    wrong_shape = r"scale_e8m0 shape must be \(2, 2\) for q shape \(2, 64\)"
    with pytest.raises(ValueError, match=wrong_shape):
        mx.dequantize_mxfp8(q, code[:, :1].contiguous())
    packed, bscale, gscale = nv.quantize_nvfp4_ref(torch.ones(2, 64, device=DEVICE))
    with pytest.raises(TypeError, match="packed must be a uint8 tensor, got torch.int8"):
        nv.dequantize_nvfp4(packed.view(torch.int8), bscale, gscale)
    with pytest.raises(ValueError, match=r"block_scale shape must be \(2, 4\)"):
        nv.dequantize_nvfp4(packed, bscale[:, :2].contiguous(), gscale)
    with pytest.raises(TypeError, match="global_scale must be a 1-element float32 tensor"):
        nv.dequantize_nvfp4(packed, bscale, gscale.double())
    with pytest.raises(ValueError, match="packed last dim 12 is not a multiple of 8"):
        nv.dequantize_nvfp4(packed[:, :12], bscale, gscale)
    with pytest.raises(TypeError, match="unsupported output dtype torch.float64"):
        nv.dequantize_nvfp4(packed, bscale, gscale, torch.float64)
