"""MXFP8 quantiser (kvperf_kernels.quant.mxfp8): kernel against reference (bit-exact: E4M3
elements and E8M0 block scales), the reference against the format's definition
(hand-checked values), round-trip accuracy recorded with ``kvperf``, speed on the GPU, and
the error contract.

The reference follows TransformerEngine's rules (``float_to_e8m0`` of amax * fl(1/448) and
``exp2f_rcp``).
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.formats.codecs import RCP_E4M3_MAX, e8m0_decode_ref, e8m0_encode_ref
from kvperf_kernels.quant.mxfp8 import (
    MX_BLOCK,
    dequantize_mxfp8,
    dequantize_mxfp8_ref,
    quantize_mxfp8,
    quantize_mxfp8_ref,
)
from kvperf_kernels.testing.params import BF16, FLOAT_DTYPES, FP16, FP32, dtype_id, shape_id, to_cpu

GPU = pytest.mark.gpu
CPU_SHAPES = [(4, 2, 64), (33, 8, 128), (5, 96)]  # 96: three 32-blocks
GPU_SHAPES = [(65536, 8, 128), (16384, 1, 576)]
SHAPES = CPU_SHAPES + [pytest.param(s, marks=GPU) for s in GPU_SHAPES]

LAB_FP8_COSINE_MIN = 0.99
# Relative L2 bound for KV-like data: E4M3 keeps 3 mantissa bits (rms relative error
# ~0.026, measured 0.016..0.031).
MXFP8_REL_L2_MAX = 0.035



@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
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


@pytest.mark.parametrize("out_dtype", [BF16, FP16], ids=dtype_id)
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
        assert (to_cpu(e) == 127 + power).all(), f"{what}: {e.flatten().tolist()}"
        checks.same_bytes(to_cpu(q).flatten(), grid.view(torch.float8_e4m3fn), f"{what}: codes")
        assert torch.equal(to_cpu(dequantize_mxfp8(q, e)), to_cpu(x)), f"{what}: exact round trip"
    for (_, e), what in ((quantize_mxfp8(x_up), "kernel"), (quantize_mxfp8_ref(x_up), "reference")):
        top_blocks = (x_up.abs().amax(-1) > 448 * 2.0**power).cpu()
        assert (to_cpu(e)[top_blocks] == 128 + power).all(), what


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
        assert to_cpu(e).tolist() == [[127], [0]], what
        got = to_cpu(q)[0, 1:1 + len(ties)].float()
        assert torch.equal(got, torch.tensor(expect)), f"{what}: {got.tolist()}"
        assert torch.equal(torch.signbit(got), torch.signbit(torch.tensor(expect))), what
        assert (to_cpu(q)[1].view(torch.uint8) == 0).all(), f"{what}: zero block"
        x_hat = to_cpu(dequantize_mxfp8(q.to(quant_device), e.to(quant_device)))
        assert (x_hat[1] == 0).all()


def test_mxfp8_nan_and_inf_blocks(quant_device, checks):
    """NaN in a block -> scale 0xFF (the whole block decodes NaN); Inf -> 0xFE (TE)."""
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(24))
    x[0, 40] = float("nan")
    x[1, 70] = float("inf")
    q, e = quantize_mxfp8(x.to(quant_device))
    q_ref, e_ref = quantize_mxfp8_ref(x)
    assert to_cpu(e).tolist() == to_cpu(e_ref).tolist()
    assert to_cpu(e)[0, 1].item() == 0xFF and to_cpu(e)[1, 2].item() == 0xFE
    nan_codes = (to_cpu(q).view(torch.uint8) & 0x7F) == 0x7F
    assert torch.equal(nan_codes, (q_ref.view(torch.uint8) & 0x7F) == 0x7F)
    checks.same_bytes(to_cpu(q)[~nan_codes], q_ref[~nan_codes], "finite codes")
    x_hat = to_cpu(dequantize_mxfp8(q, e)).reshape(2, 3, 32)
    assert torch.isnan(x_hat[0, 1]).all(), "a NaN block must decode to NaN as a whole"
    assert torch.isfinite(x_hat[0, 0]).all() and torch.isfinite(x_hat[0, 2]).all()
    assert torch.isfinite(x_hat[1, :2]).all()


@GPU
@pytest.mark.parametrize("shape", [(65536, 8, 128)], ids=shape_id)
def test_mxfp8_speed(shape, make_kv, kv_bench, checks):
    x = make_kv(shape, BF16, seed=25)
    moved = x.numel() * 2 + x.numel() + x.numel() // MX_BLOCK  # bf16 in, e4m3 + e8m0 out
    res = kv_bench(quantize_mxfp8, x, bytes_moved=moved)
    q_ref, e_ref = quantize_mxfp8_ref(x)
    checks.same_bytes(res.value[0], q_ref, "timed MXFP8 elements")
    checks.same_bytes(res.value[1], e_ref, "timed E8M0 scales")


@GPU
@pytest.mark.fp8
def test_mxfp8_hardware_cast_equals_integer_encoder(spread_kv, checks):
    """Tokens spread over 2^-30 .. 2^30: every E8M0 / E4M3 scale range, subnormals included."""
    x = spread_kv
    for a, b in zip(quantize_mxfp8(x, hw_cast=True), quantize_mxfp8(x, hw_cast=False), strict=True):
        checks.same_bytes(a, b, "MXFP8: hardware vs integer encode")


def test_mxfp8_rejects_bad_input(checks):
    checks.rejects_bad_quant_input(quantize_mxfp8, MX_BLOCK)


def test_mxfp8_dequantize_rejects_mismatched_parts(quant_device):
    q, e = quantize_mxfp8(torch.randn(4, 128, device=quant_device))
    with pytest.raises(ValueError, match=r"scale_e8m0 shape \(4, 3\) does not match"):
        dequantize_mxfp8(q, e[:, :3].contiguous())
    with pytest.raises(TypeError, match="uint8 tensor of E8M0 codes, got torch.float32"):
        dequantize_mxfp8(q, e.float())
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize_mxfp8(q.view(torch.uint8), e)
