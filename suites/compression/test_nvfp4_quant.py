"""NVFP4 quantiser (kvperf_kernels.quant.nvfp4): kernel against reference (bit-exact: packed
E2M1 elements, E4M3 block scales, global scale), the E2M1 encoder against the format's
definition, round-trip accuracy recorded with ``kvperf``, speed on the GPU, and the error
contract.

The reference follows TransformerEngine's ``reference_nvfp4.py`` (1x16 tiles, RNE, no RHT).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kvperf_kernels.formats.codecs import (
    E2M1_VALUES,
    e2m1_encode_ref,
    encode_e2m1,
    pack_nibbles_ref,
    unpack_nibbles_ref,
)
from kvperf_kernels.quant.nvfp4 import (
    NVFP4_BLOCK,
    dequantize_nvfp4,
    dequantize_nvfp4_ref,
    quantize_nvfp4,
    quantize_nvfp4_ref,
)
from kvperf_kernels.testing.params import BF16, FLOAT_DTYPES, FP16, FP32, dtype_id, shape_id, to_cpu

GPU = pytest.mark.gpu
CPU_SHAPES = [(4, 2, 64), (33, 8, 128), (5, 96)]  # 96: six 16-blocks
GPU_SHAPES = [(65536, 8, 128), (16384, 1, 576)]
SHAPES = CPU_SHAPES + [pytest.param(s, marks=GPU) for s in GPU_SHAPES]

LAB_NVFP4_COSINE_MIN = 0.98
# Relative L2 bound for KV-like data: E2M1 steps are 0.5/1/2 on 0..6, a relative
# half-step of up to 1/4 (rms ~0.09, measured 0.078..0.10 with the tensor's own global amax).
NVFP4_REL_L2_MAX = 0.12



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
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
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


@pytest.mark.parametrize("out_dtype", [BF16, FP16], ids=dtype_id)
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
        assert to_cpu(g).item() == 1.0 and to_cpu(s).float().item() == 1.0, what
        checks.same_bytes(to_cpu(packed), pack_nibbles_ref(codes.reshape(1, 16)), f"{what} codes")
        x_hat = to_cpu(dequantize_nvfp4(packed.to(quant_device), s.to(quant_device),
                                      g.to(quant_device)))
        assert torch.equal(x_hat, x), f"{what}: exact round trip"


@pytest.mark.parametrize("out_dtype", [FP32, BF16], ids=dtype_id)
def test_e2m1_negative_zero_dequantizes_to_negative_zero(out_dtype, quant_device, checks):
    """Code 8 is -0 (what the encoder stores for a tiny negative value): the dequantise
    kernel gives -0, as the reference does. Triton 3.6 builds a float's -x as 0 - x, so a
    negation-based decoder makes it +0 (the E4M3 decoder's defect on the H200)."""
    codes = torch.tensor([[8, 0, 2, 10] * 4], dtype=torch.uint8)  # -0, +0, 1, -1
    packed = pack_nibbles_ref(codes).to(quant_device)
    s = torch.ones(1, 1, dtype=torch.float8_e4m3fn, device=quant_device)
    g = torch.ones(1, dtype=torch.float32, device=quant_device)
    ref = dequantize_nvfp4_ref(packed, s, g, out_dtype)
    assert torch.equal(torch.signbit(ref).cpu(), (codes >= 8).reshape(ref.shape))
    checks.same_bytes(dequantize_nvfp4(packed, s, g, out_dtype), ref, f"-0 codes -> {out_dtype}")


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
        assert to_cpu(s).float().item() == 1.0
        got = unpack_nibbles_ref(to_cpu(packed))
        assert torch.equal(got, expected), f"{what}: {got.tolist()} != {expected.tolist()}"
        assert to_cpu(packed)[0, 0].item() == 0x07  # element 0 (code 7) low, element 1 (0) high


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
    differ = (to_cpu(codes) != expected).nonzero().flatten()
    assert not differ.numel(), (
        f"{differ.numel()} of {y.numel()} values encode wrongly, e.g. "
        f"{y[differ[:5]].tolist()} -> {to_cpu(codes)[differ[:5]].tolist()}, "
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
        codes = unpack_nibbles_ref(to_cpu(packed))[0]
        s_bytes = to_cpu(s).view(torch.uint8)[0].tolist()
        assert s_bytes[0] == 0x7E, f"{what}: saturated scale is 448"
        assert codes[:4].tolist() == [7, 15, 2, 0], f"{what}: {codes[:4].tolist()}"
        assert s_bytes[1] == 0x02, f"{what}: subnormal block scale 2^-8"
        assert codes[16:20].tolist() == [7, 2, 13, 0], f"{what}: {codes[16:20].tolist()}"
        x_hat = to_cpu(dequantize_nvfp4(packed.to(quant_device), s.to(quant_device),
                                      g.to(quant_device)))
        assert x_hat[0, 0].item() == 6 * 448.0  # the clamp's cost, visible
        assert x_hat[0, 16:20].tolist() == [6 * 2.0**-8, 2.0**-8, -3 * 2.0**-8, 0.0]
        assert x_hat[0, 32].item() == pytest.approx(1.0, rel=0.25)


def test_nvfp4_all_zero_tensor(quant_device):
    """global amax 0 -> g_enc = 1 (not Inf): zero scales, zero codes, exact zeros back."""
    x = torch.zeros(2, 32)
    for (packed, s, g), what in zip(_nvfp4_both(x, None, quant_device), ("kernel", "ref"),
                                    strict=True):
        assert to_cpu(g).item() == 1.0, what
        assert (to_cpu(packed) == 0).all() and (to_cpu(s).float() == 0).all(), what
        x_hat = dequantize_nvfp4(packed.to(quant_device), s.to(quant_device), g.to(quant_device))
        assert (to_cpu(x_hat) == 0).all() and torch.isfinite(x_hat).all()


def test_nvfp4_nan_poisons_its_block(quant_device, checks):
    """With a calibrated global amax, a NaN makes only its block's E4M3 scale NaN; with the
    tensor's own amax the global scale is NaN too (every block depends on it)."""
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(29))
    x[1, 20] = float("nan")
    packed, s, g = quantize_nvfp4(x.to(quant_device), 8.0)
    packed_ref, s_ref, g_ref = quantize_nvfp4_ref(x, 8.0)
    checks.same_bytes(to_cpu(packed), packed_ref, "packed")
    checks.same_bytes(to_cpu(s), s_ref, "block scales")
    nan_scale = torch.isnan(to_cpu(s).float())
    assert nan_scale.tolist() == [[False] * 4, [False, True, False, False]]
    x_hat = to_cpu(dequantize_nvfp4(packed, s, g)).reshape(2, 4, 16)
    assert torch.isnan(x_hat[1, 1]).all() and torch.isfinite(x_hat[0]).all()
    assert torch.isfinite(x_hat[1, [0, 2, 3]]).all()
    _, _, g_own = quantize_nvfp4(x.to(quant_device))
    assert torch.isnan(g_own).all()


@GPU
@pytest.mark.parametrize("shape", [(65536, 8, 128)], ids=shape_id)
def test_nvfp4_speed(shape, make_kv, kv_bench, checks):
    x = make_kv(shape, BF16, seed=30)
    # calibrated and already on the device, as an engine keeps it: one launch, no host copy
    amax = x.float().abs().amax().reshape(1)
    moved = x.numel() * 2 + x.numel() // 2 + x.numel() // NVFP4_BLOCK  # in, nibbles, scales
    res = kv_bench(quantize_nvfp4, x, amax, bytes_moved=moved)
    packed_ref, s_ref, _ = quantize_nvfp4_ref(x, amax)
    checks.same_bytes(res.value[0], packed_ref, "timed packed E2M1")
    checks.same_bytes(res.value[1], s_ref, "timed block scales")


@GPU
@pytest.mark.fp8
def test_nvfp4_hardware_cast_equals_integer_encoder(spread_kv, checks):
    """Tokens spread over 2^-30 .. 2^30: every E4M3 block-scale range, subnormals included."""
    x = spread_kv
    for a, b in zip(quantize_nvfp4(x, hw_cast=True), quantize_nvfp4(x, hw_cast=False), strict=True):
        checks.same_bytes(a, b, "NVFP4: hardware vs integer encode")


def test_nvfp4_rejects_bad_input(checks):
    checks.rejects_bad_quant_input(quantize_nvfp4, NVFP4_BLOCK)


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


def test_nvfp4_dequantize_rejects_mismatched_parts(quant_device):
    packed, s, g = quantize_nvfp4(torch.randn(4, 128, device=quant_device))
    with pytest.raises(ValueError, match=r"block_scale shape \(4, 2\) does not match"):
        dequantize_nvfp4(packed, s[:, :2].contiguous(), g)
    with pytest.raises(TypeError, match="global_scale: expected a float32 tensor"):
        dequantize_nvfp4(packed, s, 0.5)
    with pytest.raises(TypeError, match="output dtype torch.int32"):
        dequantize_nvfp4(packed, s, g, torch.int32)
    with pytest.raises(ValueError, match="packed must be contiguous"):
        dequantize_nvfp4(torch.zeros(32, 4, dtype=torch.uint8, device=quant_device).t(),
                         torch.zeros(4, 4, dtype=torch.float8_e4m3fn, device=quant_device), g)
