"""FP8 E4M3 quantisers (per-token, per-tensor, 1x128 block): kernels, references, format rules.

What is checked, and against what:
- kernel vs torch reference: byte-exact q and equal fp32 scales, on the GPU and in the CPU
  interpreter alike (the kernels carry a bit-exact integer E4M3 encoder, used where the
  interpreter's own fp8 cast is wrong; on the GPU both the hardware cast and that encoder
  are compared);
- the reference (and the kernel) vs the E4M3 definition: hand-checked values for exact
  representables, saturation at +-448, ties to even, subnormals, zeros (signed), NaN/Inf;
- dequantise(quantise(x)) error per element within E4M3's half-ulp bound, cosine >= 0.99
  (the lab's bar), recorded with kvperf for drift against the stored baseline;
- the per-token KV suite (plugin core item 7): (tokens, heads, head_dim) tensors in bf16,
  fp16, fp32, accuracy recorded, speed measured with kv_bench on the GPU;
- the error contract: bad dtype/layout/shape raise TypeError/ValueError naming the problem.
"""

from __future__ import annotations

import math

import pytest
import torch
from kvperf_kernels import fp8_quant as fq
from kvperf_kernels._device import default_device, interpreted

# Triton's CPU interpreter evaluates with numpy, which warns about the IEEE operations the
# NaN/Inf tests perform on purpose (inf * 0, x / 0); the GPU computes the same silently.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning"
)

DEVICE = default_device()
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
E4M3 = torch.float8_e4m3fn

# hw_cast=None: the launcher's default (hardware cast on an FP8 GPU, integer path elsewhere);
# on an FP8 GPU the integer path is run as well and must give the same bytes.
ENCODERS = [
    pytest.param(None, id="default"),
    pytest.param(False, id="int-encoder", marks=pytest.mark.gpu),
]

MODES = {
    "per_token": (fq.quantize_per_token, fq.quantize_per_token_ref),
    "per_tensor": (fq.quantize_per_tensor, fq.quantize_per_tensor_ref),
    "per_block128": (
        lambda x, **kw: fq.quantize_per_block(x, 128, **kw),
        lambda x: fq.quantize_per_block_ref(x, 128),
    ),
}


def _scale_shape(mode: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return {"per_token": shape[:-1] + (1,), "per_tensor": (1,),
            "per_block128": shape[:-1] + (shape[-1] // 128,)}[mode]


def _poisoned(mode: str, shape):
    """Output buffers filled with NaN (0x7F bytes, NaN scales): unwritten elements show."""
    q = torch.full(shape, 0x7F, dtype=torch.uint8, device=DEVICE).view(E4M3)
    s = torch.full(_scale_shape(mode, tuple(shape)), math.nan, device=DEVICE)
    return q, s


def _e4m3_values() -> torch.Tensor:
    """Every finite E4M3 value (both signs, both zeros), fp32."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(E4M3).float()
    return values[torch.isfinite(values)]


def _error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |x - dequant(quant(x))| E4M3 allows per element.

    Half a step of the value's binade: 2^-4 |x| in the normal range (3 mantissa bits),
    2^-10 * scale below it (subnormal step 2^-9 * scale); plus a few fp32 roundings
    (reciprocal, product, dequant product) and the saturation's last-bit trim.
    """
    xa = x.double().abs()
    return torch.maximum(xa * 2.0**-4, scale.double() * 2.0**-10) * (1 + 2.0**-20) + xa * 2.0**-21


def _dequant_scale(mode: str, scale: torch.Tensor, shape) -> torch.Tensor:
    """The scale of every element, shaped like the input."""
    if mode == "per_block128":
        return scale.repeat_interleave(128, dim=-1)
    return scale.expand(shape)


# --------------------------------------------------------------------------------------
# Kernel vs reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw_cast", ENCODERS)
@pytest.mark.parametrize("shape", [(3, 4, 256), (33, 8, 128)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_kernel_matches_reference(mode, dtype, shape, hw_cast, kv_data, assert_same_codes):
    quantize, reference = MODES[mode]
    x = kv_data(shape, dtype, seed=1)
    q_out, s_out = _poisoned(mode, shape)
    q, scale = quantize(x, out=q_out, scale_out=s_out, hw_cast=hw_cast)
    q_ref, scale_ref = reference(x)
    assert q.data_ptr() == q_out.data_ptr() and scale.data_ptr() == s_out.data_ptr()
    assert torch.isfinite(scale).all(), "a scale was left unwritten (NaN poison)"
    assert_same_codes(q, q_ref, f"{mode} q")
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    assert torch.isfinite(q.float()).all()


@pytest.mark.parametrize("hw_cast", ENCODERS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_dequantize_matches_reference(mode, out_dtype, hw_cast, kv_data):
    x = kv_data((5, 2, 256), torch.float32, seed=2)
    q, scale = MODES[mode][1](x)
    out = torch.full(x.shape, math.nan, dtype=out_dtype, device=DEVICE)
    got = fq.dequantize(q, scale, out_dtype, out=out, hw_cast=hw_cast)
    ref = fq.dequantize_ref(q, scale, out_dtype)
    assert got.dtype == out_dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("hw_cast", ENCODERS)
def test_encoder_matches_torch_cast_on_every_boundary(hw_cast, assert_same_codes):
    """With scale 1 (448 in the tensor) q is the plain cast: compare the kernel's E4M3
    encoder with torch's on every value, every midpoint between neighbours (ties), one
    fp32 ulp either side of each midpoint, and random values."""
    v = _e4m3_values().unique()  # sorted
    mids = (v[1:].double() + v[:-1].double()) / 2
    mids = mids.float()  # exact: neighbours differ in one bit below the fp32 mantissa
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    g = torch.Generator().manual_seed(3)
    rand = (torch.rand(4096, generator=g) * 2 - 1) * 448
    tiny = (torch.rand(512, generator=g) * 2 - 1) * 2.0**-6  # the subnormal range
    x = torch.cat([v, mids, up, down, rand, tiny, torch.tensor([448.0])]).to(DEVICE)
    q, scale = fq.quantize_per_tensor(x, hw_cast=hw_cast)
    assert scale.item() == 1.0
    assert_same_codes(q, x.to(E4M3), "E4M3 encoder vs torch cast", nan_mask=None)


# --------------------------------------------------------------------------------------
# Reference (and kernel) vs the format definition
# --------------------------------------------------------------------------------------

IMPLS = {"kernel": fq.quantize_per_tensor, "reference": fq.quantize_per_tensor_ref}

# (input, expected E4M3 value) with scale 1: ties go to the even mantissa, beyond 448 saturates
HAND_CHECKED = [
    (1.0625, 1.0),  # tie between 1.0 (mantissa 000) and 1.125 (001): even wins
    (1.1875, 1.25),  # tie between 1.125 (001) and 1.25 (010)
    (17.0, 16.0),  # tie between 16 (000) and 18 (001)
    (19.0, 20.0),  # tie between 18 (001) and 20 (010)
    (-19.0, -20.0),
    (31.6, 32.0),  # rounds up across a binade (mantissa overflow carries into the exponent)
    (2.0**-10, 0.0),  # half the smallest subnormal: tie to zero
    (3 * 2.0**-10, 2.0**-8),  # tie between subnormals 1 and 2 (x 2^-9): even (2)
    (5 * 2.0**-10, 2.0**-8),  # tie between subnormals 2 and 3: even (2)
    (2.0**-9, 2.0**-9),  # smallest subnormal, exact
    (0.015625 - 2.0**-12, 0.015625),  # just below the smallest normal 2^-6: rounds up to it
    (440.0, 448.0),  # the 416/448 midpoint is 432: 440 rounds up
    (448.0, 448.0),
]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_hand_checked_rounding(impl):
    x = torch.tensor([v for v, _ in HAND_CHECKED], device=DEVICE)
    q, scale = IMPLS[impl](x)
    assert scale.item() == 1.0
    expected = torch.tensor([e for _, e in HAND_CHECKED], device=DEVICE)
    torch.testing.assert_close(q.float(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_saturation_at_448(impl):
    """The amax element lands on exactly +-448 in every row, also where x * (1/scale)
    exceeds 448 in fp32 (the reciprocal rounds up): those rows are searched for, so the
    saturating path is exercised, and nothing in q exceeds 448 or turns NaN."""
    g = torch.Generator().manual_seed(4)
    amax = (torch.rand(20000, generator=g) * 1000 + 1e-3).float()
    scale = amax / 448.0
    over = (amax * torch.div(1.0, scale)) > 448.0  # fp32, as the quantiser computes it
    assert over.sum() >= 8, "no amax whose scaled value exceeds 448: the check would be vacuous"
    picked = amax[over][:64]
    rows = torch.rand(picked.numel(), 64, generator=g) * picked[:, None]
    rows[:, 7] = -picked
    x = rows.to(DEVICE)
    quantize = fq.quantize_per_token if impl == "kernel" else fq.quantize_per_token_ref
    q, s = quantize(x)
    qf = q.float()
    assert (qf[:, 7] == -448.0).all()
    assert torch.isfinite(qf).all() and qf.abs().max().item() == 448.0
    torch.testing.assert_close(s.squeeze(-1), (picked / 448.0).to(DEVICE), rtol=0, atol=0)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_representable_values_roundtrip_exactly(mode, impl):
    """Rows of E4M3 values whose amax is 448 * 2^k: scale 2^k, q and dequant exact."""
    v = _e4m3_values()
    v = v[v.abs() <= 448]
    g = torch.Generator().manual_seed(5)
    rows = v[torch.randint(0, v.numel(), (6, 256), generator=g)]
    rows[:, 0] = 448.0
    rows[:, 128] = -448.0  # every 128-block holds the amax too
    x = (rows * 2.0 ** torch.arange(-3, 3).float()[:, None]).to(DEVICE)  # scales 2^-3 .. 2^2
    quantize = MODES[mode][0] if impl == "kernel" else MODES[mode][1]
    q, scale = quantize(x)
    if mode == "per_tensor":
        assert scale.item() == 4.0
    else:
        expected = 2.0 ** torch.arange(-3, 3, device=DEVICE).float()
        per_row = scale.reshape(6, -1)
        torch.testing.assert_close(per_row, expected[:, None].expand_as(per_row), rtol=0, atol=0)
    x_hat = fq.dequantize(q, scale) if impl == "kernel" else fq.dequantize_ref(q, scale)
    if mode == "per_tensor":  # rows with smaller amax lose their subnormals: bound instead
        assert ((x_hat - x).abs() <= _error_bound(x, scale.expand(x.shape)).float()).all()
    else:
        torch.testing.assert_close(x_hat, x, rtol=0, atol=0)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_zero_rows_and_signed_zero(mode, impl):
    """amax 0 -> scale 1 (per-token/block); +-0 stay +-0 through quantise and dequantise."""
    x = torch.zeros(3, 256, device=DEVICE)
    x[0, 1::2] = -0.0
    x[2] = torch.linspace(-3, 3, 256)
    quantize = MODES[mode][0] if impl == "kernel" else MODES[mode][1]
    q, scale = quantize(x)
    codes = q.view(torch.uint8)
    assert (codes[0, 0::2] == 0x00).all() and (codes[0, 1::2] == 0x80).all()
    assert (codes[1] == 0x00).all()
    if mode != "per_tensor":
        assert (scale[0] == 1.0).all() and (scale[1] == 1.0).all()
    x_hat = fq.dequantize(q, scale)
    assert torch.equal(torch.signbit(x_hat[:2]), torch.signbit(x[:2]))
    assert (x_hat[:2] == 0).all() and torch.isfinite(x_hat).all()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_e4m3_subnormals(impl):
    """k * 2^-9 (k = 1..7) are E4M3 subnormals: with scale 1 they encode as codes k."""
    x = torch.tensor([k * 2.0**-9 for k in range(1, 8)] + [448.0], device=DEVICE)
    q, scale = IMPLS[impl](x)
    assert scale.item() == 1.0
    assert q.view(torch.uint8)[:7].tolist() == list(range(1, 8))
    torch.testing.assert_close(fq.dequantize(q, scale), x, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["per_token", "per_block128"])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_non_finite_inputs_are_never_hidden(mode, impl, kv_data):
    """NaN in a group -> NaN scale and NaN q for the group; Inf -> Inf scale, group dequantises
    to NaN; every other group is untouched."""
    x = kv_data((4, 256), torch.float32, seed=6)
    x[1, 3] = math.nan
    x[2, 200] = math.inf
    quantize, reference = MODES[mode]
    q, scale = (quantize if impl == "kernel" else reference)(x)
    x_hat = fq.dequantize(q, scale)
    per_block = mode == "per_block128"
    group = slice(0, 128) if per_block else slice(0, 256)  # the group holding the NaN
    group_inf = slice(128, 256) if per_block else slice(0, 256)  # ... and the Inf
    assert torch.isnan(scale[1, 0]) and torch.isnan(x_hat[1, group]).all()
    assert torch.isinf(scale[2, -1]) and torch.isnan(x_hat[2, group_inf]).all()
    good = [0, 3]
    assert torch.isfinite(x_hat[good]).all()
    q_ok, s_ok = reference(x[good])
    torch.testing.assert_close(q[good].float(), q_ok.float(), rtol=0, atol=0)
    torch.testing.assert_close(scale[good], s_ok, rtol=0, atol=0)
    if per_block:  # the other block of the poisoned rows is untouched
        assert torch.isfinite(x_hat[1, 128:]).all() and torch.isfinite(x_hat[2, :128]).all()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_tiny_amax_keeps_a_finite_reciprocal(impl):
    """fp32 rows with amax < 448 * 2^-126: the scale floors at 2^-126 so 1/scale is finite;
    the values still quantise within the E4M3 bound relative to that scale."""
    x = torch.tensor([[1e-37, -3e-38, 5e-39, 0.0]], device=DEVICE)
    quantize = fq.quantize_per_token if impl == "kernel" else fq.quantize_per_token_ref
    q, scale = quantize(x)
    assert scale.item() == 2.0**-126
    x_hat = fq.dequantize(q, scale)
    assert torch.isfinite(x_hat).all()
    assert ((x_hat.double() - x.double()).abs() <= _error_bound(x, scale.expand(x.shape))).all()


def test_per_block_equals_per_token_of_the_blocks(kv_data, assert_same_codes):
    """A 1x128 block scale is the per-token scale of the (…, D/128, 128) view."""
    x = kv_data((6, 512), torch.bfloat16, seed=7)
    q_blk, s_blk = fq.quantize_per_block(x, 128)
    q_tok, s_tok = fq.quantize_per_token(x.view(6, 4, 128))
    assert_same_codes(q_blk, q_tok.view(6, 512), "per-block vs per-token of blocks")
    torch.testing.assert_close(s_blk, s_tok.squeeze(-1), rtol=0, atol=0)


def test_per_tensor_scale_is_global_amax_over_448(kv_data):
    x = kv_data((17, 3, 96), torch.float16, seed=8)
    _, scale = fq.quantize_per_tensor(x)
    expected = torch.tensor([x.float().abs().max().item()], device=DEVICE) / 448.0
    torch.testing.assert_close(scale, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_roundtrip_error_within_e4m3_bound(mode, dtype, kv_data, kvperf):
    x = kv_data((9, 4, 256), dtype, seed=9)
    q, scale = MODES[mode][0](x)
    x_hat = fq.dequantize(q, scale)
    err = (x_hat.double() - x.double()).abs()
    bound = _error_bound(x, _dequant_scale(mode, scale, x.shape))
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"an element exceeds E4M3's half-ulp bound by x{worst:.3f}"
    m = kvperf.errors(x_hat, x.float(), prefix="roundtrip_")
    assert m["cosine"] >= 0.99, f"cosine {m['cosine']:.5f} < 0.99 (lab bar)"
    # E4M3 keeps 3 mantissa bits: relative rms error ~ 2^-4/sqrt(3) = 3.6 % at worst
    assert m["rel_l2_err"] <= 0.05


# --------------------------------------------------------------------------------------
# Per-token KV suite (plugin core item 7)
# --------------------------------------------------------------------------------------

KV_SHAPES = [
    pytest.param((4, 2, 64), id="4x2x64"),
    pytest.param((33, 8, 128), id="33x8x128"),
    pytest.param((16384, 8, 128), id="16384x8x128", marks=pytest.mark.gpu),
    pytest.param((65536, 8, 128), id="65536x8x128", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KV_SHAPES)
def test_per_token_kv_accuracy(shape, dtype, kv_data, kvperf, assert_same_codes):
    """Per-token FP8 of a (tokens, heads, head_dim) KV tensor: one scale per token and head."""
    x = kv_data(shape, dtype, seed=10)
    q_out, s_out = _poisoned("per_token", shape)
    q, scale = fq.quantize_per_token(x, out=q_out, scale_out=s_out)
    q_ref, scale_ref = fq.quantize_per_token_ref(x)
    assert scale.shape == shape[:-1] + (1,) and q.dtype == E4M3
    assert_same_codes(q, q_ref, "per-token q")
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    # every (token, head) row maps its amax element to +-448 exactly
    row_max = q.float().abs().amax(dim=-1)
    assert (row_max == 448.0).all()

    x_hat = fq.dequantize(q, scale)
    torch.testing.assert_close(x_hat, fq.dequantize_ref(q_ref, scale_ref), rtol=0, atol=0)
    err = (x_hat.double() - x.double()).abs()
    assert (err <= _error_bound(x, scale.expand(shape))).all()
    m = kvperf.errors(x_hat, x.float(), prefix="roundtrip_")
    kvperf.info("shape", str(shape))
    assert m["cosine"] >= 0.99, f"cosine {m['cosine']:.5f} < 0.99 (lab bar)"
    assert m["rel_l2_err"] <= 0.05


@pytest.mark.parametrize(
    "layout", ["odd_head_dim_96", "head_dim_100", "sliced_last_dim", "single_row_1d"]
)
def test_per_token_layouts(layout, kv_data, assert_same_codes):
    """Last dims that are not powers of two (masked tiles), a slice of a wider tensor
    (row stride != D, no copy), and a 1-D input."""
    if layout == "odd_head_dim_96":
        x = kv_data((7, 3, 96), torch.bfloat16, seed=11)
    elif layout == "head_dim_100":
        x = kv_data((5, 100), torch.float16, seed=12)
    elif layout == "sliced_last_dim":
        x = kv_data((6, 2, 192), torch.bfloat16, seed=13)[..., :64]
        assert not x.is_contiguous()
    else:
        x = kv_data((300,), torch.float32, seed=14)
    q, scale = fq.quantize_per_token(x)
    q_ref, scale_ref = fq.quantize_per_token_ref(x)
    assert_same_codes(q, q_ref, f"{layout} q")
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    x_hat = fq.dequantize(q, scale)
    assert torch.isfinite(x_hat).all()
    assert ((x_hat.double() - x.double()).abs() <= _error_bound(x, scale.expand(x.shape))).all()


@pytest.mark.gpu
@pytest.mark.fp8
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(16384, 8, 128), (65536, 8, 128)], ids=str)
def test_per_token_speed(shape, dtype, kv_data, kv_bench, kvperf, assert_same_codes):
    """Per-token FP8 quantisation of a KV tensor: bytes = input + q + scales (goal: >= 80 %
    of the measured copy bandwidth at these sizes). The timed outputs are checked too."""
    x = kv_data(shape, dtype, seed=15)
    rows = x.numel() // shape[-1]
    q_out, s_out = _poisoned("per_token", shape)
    bytes_moved = x.numel() * x.element_size() + x.numel() * 1 + rows * 4
    res = kv_bench(fq.quantize_per_token, x, out=q_out, scale_out=s_out,
                   bytes_moved=bytes_moved)
    q_ref, scale_ref = fq.quantize_per_token_ref(x)
    assert_same_codes(q_out, q_ref, "timed per-token q")
    torch.testing.assert_close(s_out, scale_ref, rtol=0, atol=0)
    if res.frac_of_peak is not None:
        kvperf.info("frac_of_copy_peak", round(res.frac_of_peak, 3))


@pytest.mark.gpu
@pytest.mark.fp8
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["per_token", "per_block128"])
def test_dequantize_speed(mode, out_dtype, kv_data, kv_bench):
    """Reading an FP8 KV tensor back (65536 tokens x 8 heads x 128): bytes = q + scales +
    output. The timed output is compared with the reference."""
    x = kv_data((65536, 8, 128), torch.bfloat16, seed=16)
    q, scale = MODES[mode][1](x)
    out = torch.full(x.shape, math.nan, dtype=out_dtype, device=DEVICE)
    bytes_moved = q.numel() + scale.numel() * 4 + out.numel() * out.element_size()
    kv_bench(fq.dequantize, q, scale, out_dtype, out=out, bytes_moved=bytes_moved)
    torch.testing.assert_close(out, fq.dequantize_ref(q, scale, out_dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Error contract
# --------------------------------------------------------------------------------------

QUANTISERS = {
    "per_token": fq.quantize_per_token,
    "per_tensor": fq.quantize_per_tensor,
    "per_block128": lambda x: fq.quantize_per_block(x, 128),
}


@pytest.mark.parametrize("name", list(QUANTISERS))
def test_rejects_unsupported_dtypes(name):
    for bad in (torch.int32, torch.float64, torch.uint8):
        x = torch.ones(2, 128, dtype=bad, device=DEVICE)
        with pytest.raises(TypeError, match=f"unsupported dtype {bad}"):
            QUANTISERS[name](x)
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        QUANTISERS[name]([1.0, 2.0])


@pytest.mark.parametrize("name", list(QUANTISERS))
def test_rejects_bad_layouts(name):
    x = torch.ones(256, 128, device=DEVICE)
    strided = r"last dim must be contiguous \(stride 1\), got stride 128"
    with pytest.raises(ValueError, match=strided):
        QUANTISERS[name](x.t())
    x3 = torch.ones(4, 6, 128, device=DEVICE).transpose(0, 1)  # contiguous rows, odd order
    with pytest.raises(ValueError, match="cannot be flattened into rows without a copy"):
        QUANTISERS[name](x3)
    with pytest.raises(ValueError, match="at least 1 dimension, got a 0-dim tensor"):
        QUANTISERS[name](torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match="last dim is 0"):
        QUANTISERS[name](torch.ones(3, 0, device=DEVICE))


def test_rejects_shapes_outside_the_contract():
    with pytest.raises(ValueError, match="last dim 200 is not a multiple of the block size 128"):
        fq.quantize_per_block(torch.ones(2, 200, device=DEVICE), 128)
    with pytest.raises(ValueError, match="block must be an int in"):
        fq.quantize_per_block(torch.ones(2, 128, device=DEVICE), 0)
    with pytest.raises(ValueError, match="last dim 20000 exceeds 16384"):
        fq.quantize_per_token(torch.ones(1, 20000, device=DEVICE))


def test_rejects_bad_output_buffers():
    x = torch.ones(4, 64, device=DEVICE)
    with pytest.raises(TypeError, match="out: dtype must be torch.float8_e4m3fn, got torch.uint8"):
        fq.quantize_per_token(x, out=torch.empty(4, 64, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(ValueError, match=r"scale_out: shape must be \(4, 1\), got \(4,\)"):
        fq.quantize_per_token(x, scale_out=torch.empty(4, device=DEVICE))


def test_dequantize_rejects_mismatched_inputs():
    q, scale = fq.quantize_per_token_ref(torch.ones(4, 64, device=DEVICE))
    with pytest.raises(TypeError, match="q must be a torch.float8_e4m3fn tensor, got torch.float32"
                       ):
        fq.dequantize(q.float(), scale)
    with pytest.raises(TypeError, match="scale must be a float32 tensor, got torch.float16"):
        fq.dequantize(q, scale.half())
    with pytest.raises(ValueError, match=r"scale shape \(4, 3\) does not fit q shape \(4, 64\)"):
        fq.dequantize(q, torch.ones(4, 3, device=DEVICE))
    with pytest.raises(TypeError, match="unsupported output dtype torch.int8"):
        fq.dequantize(q, scale, torch.int8)


@pytest.mark.gpu
def test_rejects_cpu_tensors_on_a_gpu_machine():
    if interpreted():
        pytest.skip("TRITON_INTERPRET=1 runs CPU tensors by design")
    with pytest.raises(ValueError, match="tensor is on cpu, the Triton kernel needs a CUDA tensor"):
        fq.quantize_per_token(torch.ones(4, 64))
