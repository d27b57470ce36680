"""FP8 E4M3 quantisers (kvperf_kernels.quant.fp8): kernels against references, references
against the format, round-trip accuracy, speed and the error contract.

Contains the per-token suite of issue "plugin core item 7": KV tensors (tokens, heads,
head_dim) in bf16/fp16/fp32; q bytes and scales bit-exact against the torch reference,
round-trip error recorded with ``kvperf`` (cosine >= 0.99, the lab's bar), speed with
``kv_bench`` on the GPU.

Bit-exact everywhere: on an FP8 GPU the kernels use the hardware E4M3 conversion, on the
CPU interpreter the integer encoder of ``fp_formats`` (the interpreter's own fp8 cast is
wrong, e.g. 248 -> 128 instead of 256); the two paths are compared on the GPU as well.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import triton
import triton.language as tl

from kvperf_kernels.device import interpreted
from kvperf_kernels.formats.codecs import FP32_MIN_NORMAL, IEEE_SUBNORMALS
from kvperf_kernels.quant.fp8 import (
    E4M3_MAX,
    dequantize,
    dequantize_ref,
    div_rn_by_scale,
    quantize_per_block,
    quantize_per_block_ref,
    quantize_per_tensor,
    quantize_per_tensor_ref,
    quantize_per_token,
    quantize_per_token_ref,
)
from kvperf_kernels.testing.params import BF16, FLOAT_DTYPES, FP32, dtype_id, shape_id

GPU = pytest.mark.gpu

# (tokens, heads, head_dim) KV tensors. CPU shapes run in the Triton interpreter; the
# large ones fill an H100 (64 MB .. 256 MB of input) and need the GPU.
CPU_KV_SHAPES = [(4, 2, 64), (33, 8, 128), (64, 1, 576)]  # 576: MLA latent+rope, masked tile
GPU_KV_SHAPES = [(16384, 8, 128), (65536, 8, 128), (16384, 1, 576)]
KV_SHAPES = CPU_KV_SHAPES + [pytest.param(s, marks=GPU) for s in GPU_KV_SHAPES]

# 1 x block scaling: rows spanning several blocks (DeepSeek's 512-wide latent: 4 x 128).
CPU_BLOCK_CASES = [((4, 512), 128), ((6, 2, 96), 32)]
GPU_BLOCK_CASES = [((65536, 512), 128), ((8192, 8, 256), 128)]
BLOCK_CASES = CPU_BLOCK_CASES + [pytest.param(*c, marks=GPU) for c in GPU_BLOCK_CASES]

# Round-trip bound for KV-like Gaussian data: 3 mantissa bits, RNE give a relative rms
# error near 2^-3 / sqrt(12) / ln(4) ~ 0.026 of a uniformly spread magnitude; measured
# 0.021..0.027 for all three granularities. A broken rounding or scale lands far above.
FP8_REL_L2_MAX = 0.035
LAB_COSINE_MIN = 0.99
# (kernel, reference) per scaling granularity, for tests that run several of them
QUANTISERS = {
    "per_token": (quantize_per_token, quantize_per_token_ref),
    "per_tensor": (quantize_per_tensor, quantize_per_tensor_ref),
    **{f"per_block{n}": (partial(quantize_per_block, block=n),
                         partial(quantize_per_block_ref, block=n)) for n in (16, 32)},
}


def record_roundtrip(kvperf, x: torch.Tensor, x_hat: torch.Tensor, prefix: str = "roundtrip_"):
    m = kvperf.errors(x_hat, x, prefix=prefix)
    assert torch.isfinite(x_hat).all()
    assert m["cosine"] >= LAB_COSINE_MIN, f"cosine {m['cosine']:.5f} < lab bar {LAB_COSINE_MIN}"
    assert m["rel_l2_err"] <= FP8_REL_L2_MAX, f"rel_l2 {m['rel_l2_err']:.4f} > {FP8_REL_L2_MAX}"
    return m


# ======================================================================================
# Per-token suite (plugin core item 7)
# ======================================================================================

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", KV_SHAPES, ids=shape_id)
def test_per_token_matches_reference(shape, dtype, make_kv, kvperf, checks):
    x = make_kv(shape, dtype, seed=1)
    q, scale = quantize_per_token(x)
    q_ref, scale_ref = quantize_per_token_ref(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    checks.same_floats(scale, scale_ref, "per-token scales")
    checks.same_bytes(q, q_ref, "per-token q")
    # the amax element of every token lands exactly on +-448 (saturation, never NaN)
    assert ((q.view(torch.uint8) & 0x7F).amax(dim=-1) == 0x7E).all()
    kvperf.info("interpreted", interpreted())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", KV_SHAPES, ids=shape_id)
def test_per_token_roundtrip_accuracy(shape, dtype, make_kv, kvperf, checks):
    x = make_kv(shape, dtype, seed=2)
    q, scale = quantize_per_token(x)
    x_hat = dequantize(q, scale, torch.float32)
    checks.same_floats(x_hat, dequantize_ref(q, scale, torch.float32), "dequantize kernel")
    record_roundtrip(kvperf, x.float(), x_hat)
    checks.e4m3_error_bound(x.float(), x_hat, scale)


@GPU
@pytest.mark.fp8
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", GPU_KV_SHAPES, ids=shape_id)
def test_per_token_speed(shape, dtype, make_kv, kv_bench, kvperf, checks):
    x = make_kv(shape, dtype, seed=3)
    tokens = x.numel() // x.shape[-1]
    moved = x.numel() * x.element_size() + x.numel() + tokens * 4  # x + q bytes + fp32 scales
    res = kv_bench(quantize_per_token, x, bytes_moved=moved)
    q, scale = res.value  # what was timed is still correct
    q_ref, scale_ref = quantize_per_token_ref(x)
    checks.same_bytes(q, q_ref, "timed per-token q")
    checks.same_floats(scale, scale_ref, "timed per-token scales")
    if res.frac_of_peak is not None:
        kvperf.info("frac_of_peak_copy_bw", round(res.frac_of_peak, 3))


@GPU
@pytest.mark.fp8
@pytest.mark.parametrize("shape", [(65536, 8, 128)], ids=shape_id)
def test_dequantize_per_token_speed(shape, make_kv, kv_bench, checks):
    q, scale = quantize_per_token(make_kv(shape, BF16, seed=4))
    moved = q.numel() + scale.numel() * 4 + q.numel() * 2  # q + scales in, bf16 out
    res = kv_bench(dequantize, q, scale, torch.bfloat16, bytes_moved=moved)
    checks.same_floats(res.value, dequantize_ref(q, scale, torch.bfloat16), "timed dequantize")


# ======================================================================================
# Per-tensor and 1 x block scaling
# ======================================================================================

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", KV_SHAPES, ids=shape_id)
def test_per_tensor_matches_reference(shape, dtype, make_kv, kvperf, checks):
    x = make_kv(shape, dtype, seed=5)
    q, scale = quantize_per_tensor(x)
    q_ref, scale_ref = quantize_per_tensor_ref(x)
    assert scale.shape == (1,) and scale.dtype == torch.float32
    checks.same_floats(scale, scale_ref, "per-tensor scale")
    checks.same_bytes(q, q_ref, "per-tensor q")
    x_hat = dequantize(q, scale)
    record_roundtrip(kvperf, x.float(), x_hat)
    checks.e4m3_error_bound(x.float(), x_hat, scale)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("shape", "block"), BLOCK_CASES, ids=lambda v: shape_id(v)
                         if isinstance(v, tuple) else f"block{v}")
def test_per_block_matches_reference(shape, block, dtype, make_kv, kvperf, checks):
    x = make_kv(shape, dtype, seed=6)
    q, scale = quantize_per_block(x, block)
    q_ref, scale_ref = quantize_per_block_ref(x, block)
    assert scale.shape == (*shape[:-1], shape[-1] // block) and scale.dtype == torch.float32
    checks.same_floats(scale, scale_ref, "per-block scales")
    checks.same_bytes(q, q_ref, "per-block q")
    x_hat = dequantize(q, scale)
    checks.same_floats(x_hat, dequantize_ref(q, scale), "per-block dequantize kernel")
    record_roundtrip(kvperf, x.float(), x_hat)
    checks.e4m3_error_bound(x.float(), x_hat, scale)


@GPU
@pytest.mark.fp8
@pytest.mark.parametrize(("shape", "block"), GPU_BLOCK_CASES[:1],
                         ids=lambda v: shape_id(v) if isinstance(v, tuple) else f"block{v}")
def test_per_block_speed(shape, block, make_kv, kv_bench, checks):
    x = make_kv(shape, BF16, seed=7)
    moved = x.numel() * 2 + x.numel() + (x.numel() // block) * 4
    res = kv_bench(quantize_per_block, x, block, bytes_moved=moved)
    q_ref, _ = quantize_per_block_ref(x, block)
    checks.same_bytes(res.value[0], q_ref, "timed per-block q")


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor", "per_block32"])
def test_dequantize_matches_reference(granularity, out_dtype, make_kv, checks):
    x = make_kv((5, 3, 64), FP32, seed=8)
    q, scale = QUANTISERS[granularity][1](x)
    out = dequantize(q, scale, out_dtype)
    assert out.dtype == out_dtype and out.shape == x.shape
    assert torch.isfinite(out).all()
    checks.same_floats(out, dequantize_ref(q, scale, out_dtype), f"dequantize -> {out_dtype}")
    # the squeezed per-token layout (what the paged cache stores) reads the same
    if granularity == "per_token":
        checks.same_floats(dequantize(q, scale.squeeze(-1), out_dtype), out, "squeezed scale")


def test_sliced_rows_need_no_copy(make_kv, checks):
    """A slice of the last dim (rows with a stride > D) is read in place, same result."""
    base = make_kv((6, 4, 128), BF16, seed=9)
    x = base[..., :96]
    assert not x.is_contiguous()
    for name in ("per_token", "per_tensor", "per_block32"):
        quant, ref = QUANTISERS[name]
        q, s = quant(x)
        q_ref, s_ref = ref(x.contiguous())
        checks.same_bytes(q, q_ref, "sliced input q")
        checks.same_floats(s, s_ref, "sliced input scales")


# ======================================================================================
# References (and kernels) against the E4M3 definition: hand-checked values
# ======================================================================================

def _all_finite_e4m3() -> torch.Tensor:
    codes = torch.tensor([c for c in range(256) if (c & 0x7F) != 0x7F], dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn)


def _both(x: torch.Tensor):
    """(kernel, reference) per-token results for x on the kernels' device."""
    return quantize_per_token(x), quantize_per_token_ref(x)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("power", [0, -5, 7])
def test_representable_values_roundtrip_exactly(power, dtype, quant_device, checks):
    """Every finite E4M3 value times 2^power in one token: scale 2^power, q = the codes."""
    grid = _all_finite_e4m3()
    x = (grid.float() * 2.0**power).to(dtype).to(quant_device).reshape(1, -1)
    assert torch.equal(x.float().cpu().flatten(), grid.float() * 2.0**power)  # exact in dtype
    for (q, scale), what in zip(_both(x), ("kernel", "reference"), strict=True):
        assert scale.item() == 2.0**power, what  # amax = 448 * 2^power, scale exact
        checks.same_bytes(q.cpu().flatten(), grid, f"{what}: codes of exact values")
        x_hat = dequantize(q, scale)
        assert torch.equal(x_hat.cpu(), x.float().cpu()), f"{what}: exact values round-trip"


# (input with scale 1, expected E4M3 value): ties go to the even mantissa code
TIES = [
    (1.0625, 1.0), (1.1875, 1.25), (17.0, 16.0), (19.0, 20.0), (200.0, 192.0),
    (248.0, 256.0),  # mantissa overflow carries into the exponent
    (2.0**-10, 0.0), (3 * 2.0**-10, 2.0**-8), (5 * 2.0**-10, 2.0**-8),  # subnormal ties
    (7.5 * 2.0**-9, 2.0**-6),  # largest subnormal + half a step: rounds up to the min normal
    (-1.0625, -1.0), (-19.0, -20.0), (-3 * 2.0**-10, -(2.0**-8)),
]


def test_ties_round_to_nearest_even(quant_device):
    values = torch.tensor([v for v, _ in TIES] + [E4M3_MAX])  # 448 pins the scale to 1
    expected = torch.tensor([e for _, e in TIES] + [E4M3_MAX])
    x = values.to(quant_device).reshape(1, -1)
    for (q, scale), what in zip(_both(x), ("kernel", "reference"), strict=True):
        assert scale.item() == 1.0
        got = q.float().cpu().flatten()
        assert torch.equal(got, expected), f"{what}: {got.tolist()} != {expected.tolist()}"


def test_subnormals_and_flush_to_zero(quant_device, checks):
    """Scale 1: k * 2^-9 (k = 1..7) are the E4M3 subnormal codes k; below 2^-10 is zero."""
    sub = [k * 2.0**-9 for k in range(1, 8)]
    x = torch.tensor([E4M3_MAX, *sub, 2.0**-11, -3 * 2.0**-9, -(2.0**-12)])
    expected_codes = torch.tensor([0x7E, 1, 2, 3, 4, 5, 6, 7, 0x00, 0x83, 0x80], dtype=torch.uint8)
    for (q, _), what in zip(_both(x.to(quant_device).reshape(1, -1)), ("kernel", "reference"),
                            strict=True):
        checks.same_bytes(q.cpu().flatten(), expected_codes.view(torch.float8_e4m3fn),
                          f"{what}: subnormal codes")


def test_saturation_of_amax_element(quant_device, checks):
    """Whatever amax / 448 rounds to, amax / scale encodes as exactly 448, never NaN.

    amax values are chosen where fl(amax / 448) < amax / 448, so x / scale > 448 before
    the saturation (the unsaturated torch cast would give 448 for these too, but 480+
    would be NaN: the clamp is what guarantees it).
    """
    gen = torch.Generator().manual_seed(10)
    amax = torch.rand(4096, generator=gen) * 1000 + 1e-3
    scale = amax / E4M3_MAX
    over = amax / scale > E4M3_MAX
    assert over.sum() > 100, "the input must exercise quotients above 448"
    x = torch.stack([amax[over], -amax[over] / 3], dim=-1)
    for (q, s), what in zip(_both(x.to(quant_device)), ("kernel", "reference"), strict=True):
        checks.same_floats(s.cpu().flatten(), scale[over], f"{what}: scales")
        assert (q[:, 0].float() == E4M3_MAX).all(), f"{what}: amax element not saturated to 448"


def test_zero_and_negative_zero_tokens(quant_device):
    """amax 0 gives scale 1 (not 0/0): +0 stays 0x00, -0 stays 0x80 and decodes to -0."""
    x = torch.zeros(3, 16)
    x[1] = -0.0
    x[2, 5] = 3.0
    x = x.to(quant_device)
    for (q, scale), what in zip(_both(x), ("kernel", "reference"), strict=True):
        assert scale[:2].flatten().tolist() == [1.0, 1.0], what
        codes = q.view(torch.uint8).cpu()
        assert (codes[0] == 0x00).all() and (codes[1] == 0x80).all(), what
        x_hat = dequantize(q, scale).cpu()
        assert torch.equal(torch.signbit(x_hat[:2]), torch.signbit(x.cpu()[:2])), what
        assert abs(x_hat[2, 5].item() - 3.0) <= 3.0 * 2**-22, what  # 448 * fl(3/448)


@pytest.mark.parametrize("granularity", ["per_token", "per_block16", "per_tensor"])
def test_nan_and_inf_poison_their_group_only(granularity, make_kv, checks):
    """NaN in a group -> its scale and every q of the group are NaN; Inf -> scale Inf.

    Groups without non-finite input are quantised as usual (bit-exact with the reference).
    """
    x = make_kv((4, 64), FP32, seed=11)
    x[1, 3] = float("nan")
    x[2, 40] = float("inf")
    quant, ref = QUANTISERS[granularity]
    q, scale = quant(x)
    q_ref, scale_ref = ref(x)
    checks.same_floats(scale, scale_ref, "scales with NaN/Inf input")
    nan_q = (q.view(torch.uint8) & 0x7F) == 0x7F
    nan_ref = (q_ref.view(torch.uint8) & 0x7F) == 0x7F
    assert torch.equal(nan_q, nan_ref), "NaN codes differ from the reference"
    checks.same_bytes(q[~nan_ref], q_ref[~nan_ref], "finite codes")
    x_hat = dequantize(q, scale)
    if granularity == "per_tensor":
        assert torch.isnan(scale).all() and torch.isnan(x_hat).all()
    else:
        group = 64 if granularity == "per_token" else 16
        # the Inf group decodes to NaN too: its zeros times the Inf scale
        nan_groups = torch.isnan(x_hat).reshape(4, -1, group).all(-1)
        assert nan_groups[1, 3 // group] and nan_groups[2, 40 // group]
        assert nan_groups.sum() == 2, "a non-finite value leaked out of its group"
        assert torch.isnan(scale.reshape(4, -1)[1, 3 // group])
        assert torch.isinf(scale.reshape(4, -1)[2, 40 // group])
        assert torch.isfinite(x_hat[0]).all() and torch.isfinite(x_hat[3]).all()


@GPU
@pytest.mark.fp8
def test_hardware_cast_equals_integer_encoder(quant_device, checks):
    """The GPU's cvt.rn.satfinite and fp_formats' integer encoder give the same bytes.

    Values span every E4M3 binade, the subnormals and the ties (a few amax rows pin
    several scales); both paths also decode to the same floats.
    """
    gen = torch.Generator().manual_seed(12)
    mags = torch.exp2(torch.rand(4096, 256, generator=gen) * 30 - 20)
    x = (mags * torch.randn(4096, 256, generator=gen).sign()).to(quant_device)
    x[:64, :len(TIES)] = torch.tensor([v for v, _ in TIES], device=quant_device)
    x[:64, -1] = E4M3_MAX
    q_hw, s_hw = quantize_per_token(x, hw_cast=True)
    q_int, s_int = quantize_per_token(x, hw_cast=False)
    checks.same_floats(s_hw, s_int, "scales")
    checks.same_bytes(q_hw, q_int, "hardware vs integer E4M3 encode")
    for dtype in FLOAT_DTYPES:
        checks.same_floats(dequantize(q_hw, s_hw, dtype, hw_cast=True),
                           dequantize(q_hw, s_hw, dtype, hw_cast=False), f"decode -> {dtype}")


@triton.jit
def _divide_rows_kernel(x_ptr, s_ptr, out_ptr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = rows[:, None] * D + tl.arange(0, D)[None, :]
    s = tl.load(s_ptr + rows)
    tl.store(out_ptr + offs, div_rn_by_scale(tl.load(x_ptr + offs), s[:, None]))


def test_kernel_division_is_correctly_rounded(quant_device, checks):
    """The kernels' x / scale (Markstein's reciprocal + 2 FMAs, plain division outside
    [2^-90, 2^126)) equals IEEE division bit for bit, near-ties and subnormals included.

    Tiles of 8 rows: tiles 0-5 take the reciprocal path (scales 2^-89 .. 2^100); tile 6
    holds a 2^-120 scale, a subnormal 2^-140 one and 2^126, tile 7 an Inf and a NaN scale
    (plain division for the tile). Small quotients times tiny scales give subnormal x,
    which a flush-to-zero division would read as 0.
    """
    gen = torch.Generator().manual_seed(13)
    rows, d = 64, 256
    s = torch.exp2(torch.rand(rows, generator=gen, dtype=torch.float64) * 189 - 89) * (
        1 + torch.rand(rows, generator=gen, dtype=torch.float64))
    s = s.float()
    s[48], s[49], s[50] = 2.0**-120, 2.0**-140, 2.0**126
    s[56], s[57] = float("inf"), float("nan")
    quotient = (torch.rand(rows, d, generator=gen) * 896 - 448) * torch.exp2(
        -torch.randint(0, 12, (rows, d), generator=gen).float())
    x = (quotient.double() * s.double()[:, None]).float()  # quotients at exact fp32 values...
    step = torch.randint(-2, 3, (rows, d), generator=gen)  # ... and up to 2 ulps around them
    x = torch.where(step > 0, x.nextafter(torch.tensor(float("inf"))), x)
    x = torch.where(step < 0, x.nextafter(torch.tensor(float("-inf"))), x)
    x[56, :4] = torch.tensor([1.0, -3.0, float("inf"), 0.0])
    x[:, -2:] = torch.tensor([0.0, -0.0])  # signed zeros, on both paths
    assert (x[48:50].abs() < FP32_MIN_NORMAL).any(), "the test needs subnormal x"
    out = torch.full((rows, d), float("nan"), device=quant_device)  # poisoned
    _divide_rows_kernel[(rows // 8,)](x.to(quant_device), s.to(quant_device), out, D=d,
                                      BLOCK_M=8, **IEEE_SUBNORMALS)
    expected = x / s[:, None]
    checks.same_floats(out.cpu(), expected, "kernel division vs IEEE division")
    # signs of zeros only: a NaN's sign is not specified (x86 makes Inf/Inf -NaN, CUDA +NaN)
    zeros = expected == 0
    assert torch.equal(torch.signbit(out.cpu()[zeros]), torch.signbit(expected[zeros])), \
        "signs of zeros"


def test_subnormal_amax_quantises_like_the_reference(quant_device, checks):
    """Tokens whose amax is subnormal give the reference's bytes and scales (the kernels
    divide without flushing to zero), and finite ones: where amax / 448 underflows to 0
    (amax 2^-149) the scale is 1, as for amax 0, not a 0 that would turn x / 0 into NaN."""
    amax = torch.tensor([2.0**-127, 3 * 2.0**-140, 2.0**-149, 1e-30, 2.0**-100])
    x = amax[:, None] * torch.linspace(-1, 1, 32)[None, :]
    # per-tensor: one scale, so only the three subnormal-amax tokens (amax 2^-127)
    for name, data in (("per_token", x), ("per_tensor", x[:3]), ("per_block16", x)):
        quant, quant_ref = QUANTISERS[name]
        ref = quant_ref(data)
        got = quant(data.to(quant_device))
        checks.same_floats(got[1].cpu(), ref[1], f"{name}: scales")
        checks.same_bytes(got[0].cpu(), ref[0], f"{name}: codes")
        assert not torch.isnan(ref[0].float()).any(), f"{name}: NaN codes from finite input"
    assert quantize_per_token_ref(x)[1][2].item() == 1.0, "underflowed scale must become 1"


# ======================================================================================
# Error contract
# ======================================================================================

LAUNCHERS = {"per_token": QUANTISERS["per_token"][0], "per_tensor": QUANTISERS["per_tensor"][0],
             "per_block": QUANTISERS["per_block32"][0]}


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_rejects_bad_input(name, quant_device):
    quant = LAUNCHERS[name]
    good = torch.randn(64, 64, device=quant_device)
    with pytest.raises(TypeError, match="float64"):
        quant(good.double())
    with pytest.raises(TypeError, match="int32"):
        quant(good.to(torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quant(good.tolist())
    with pytest.raises(ValueError, match="contiguous"):
        quant(good.t())  # last dim has stride 64
    with pytest.raises(ValueError, match="flattened"):
        quant(torch.randn(4, 3, 64, device=quant_device).transpose(0, 1))
    with pytest.raises(ValueError, match="0-dim"):
        quant(torch.tensor(1.0, device=quant_device))
    with pytest.raises(ValueError, match="last dim is 0"):
        quant(torch.randn(4, 0, device=quant_device))


def test_rejects_bad_block(quant_device):
    x = torch.randn(4, 96, device=quant_device)
    with pytest.raises(ValueError, match="96 is not a multiple of the block size 64"):
        quantize_per_block(x, 64)
    with pytest.raises(ValueError, match="positive int"):
        quantize_per_block(x, 0)
    with pytest.raises(ValueError, match="positive int"):
        quantize_per_block(x, 32.0)


def test_rejects_rows_longer_than_a_tile(quant_device):
    with pytest.raises(ValueError, match="last dim = 16400 exceeds 16384"):
        quantize_per_token(torch.randn(1, 16400, device=quant_device))


def test_dequantize_rejects_bad_input(quant_device):
    q, scale = quantize_per_token(torch.randn(4, 64, device=quant_device))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize(q.view(torch.uint8), scale)
    with pytest.raises(TypeError, match="float32"):
        dequantize(q, scale.half())
    with pytest.raises(TypeError, match="output dtype torch.int8"):
        dequantize(q, scale, torch.int8)
    with pytest.raises(ValueError, match=r"scale shape \(4, 3\) fits no scaling"):
        dequantize(q, torch.ones(4, 3, device=quant_device))
    with pytest.raises(ValueError, match="q must be contiguous"):
        dequantize(q.t(), scale)


@GPU
def test_rejects_cpu_tensor_on_gpu_machine():
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        quantize_per_token(torch.randn(4, 64))
