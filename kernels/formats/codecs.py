"""Bit-level rules of the low-precision formats shared by the quantisers.

FP8 E4M3 ("fn": no Inf, NaN = S.1111.111, max 448, subnormals down to 2^-9),
E8M0 (OCP MX power-of-two scale: code c means 2^(c-127), 0xFF = NaN) and
E2M1 (FP4: 0, 0.5, 1, 1.5, 2, 3, 4, 6 with a sign bit, no NaN/Inf).

Each rule exists twice: as a torch reference written from the format's definition
(``*_ref``) and as a ``@triton.jit`` helper that the kernels call. The Triton helpers
have two paths selected by the constexpr ``HW_CAST``:

* ``HW_CAST=True``: the hardware conversion (``cvt.rn.satfinite.e4m3x2.f32`` on
  sm89+), the fast path on an FP8-capable GPU;
* ``HW_CAST=False``: the same round-to-nearest-even written with integer ops. It is
  bit-exact everywhere, so it runs on GPUs without FP8 conversions and in Triton's CPU
  interpreter, whose own fp32->fp8 and fp32->bf16 conversions are wrong (they round
  half away from zero and do not carry a mantissa overflow into the exponent:
  31.6 becomes 16 instead of 32).

The module also holds the input contract the three quantisers share (dtype, layout,
block divisibility), so their error messages read the same.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
E2M1_MAX = 6.0
FP32_MAX = float(torch.finfo(torch.float32).max)
FP32_MIN_NORMAL = 2.0**-126
E8M0_NAN = 0xFF
E8M0_BIAS = 127

# Launch options of every kernel that divides: Triton links libdevice in flush-to-zero
# mode by default, so div_rn would read a subnormal amax or x as 0 (0/0 = NaN, x/0 = Inf)
# where the torch references divide them exactly.
IEEE_SUBNORMALS = {"enable_reflect_ftz": False}


def fp32_reciprocal(v: float) -> float:
    """The fp32 value of 1/v rounded to nearest (exact as a Python float).

    TE multiplies by these rounded reciprocals instead of dividing; using the same
    constants keeps the references and kernels bit-exact with it.
    """
    return float(torch.tensor(1.0 / v, dtype=torch.float32))


RCP_E4M3_MAX = fp32_reciprocal(E4M3_MAX)
RCP_E2M1_MAX = fp32_reciprocal(E2M1_MAX)

# E2M1 magnitudes by 3-bit code; bit 3 of a nibble is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --------------------------------------------------------------------------------------
# Torch references, written from the format definitions
# --------------------------------------------------------------------------------------


def e4m3_encode_ref(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> E4M3 with saturation to +-448 (NaN stays NaN), round to nearest even."""
    x = x.float()
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e8m0_encode_ref(v: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= v as an E8M0 code (uint8), for v >= 0.

    ceil(log2 v) from frexp (v = m * 2^E, m in [0.5, 1): exact power iff m == 0.5),
    clamped to the code range [0, 254] (2^-127 .. 2^127): values at or below 2^-127,
    0 included, give 0x00; values above 2^127 and +Inf saturate to 0xFE (TE's rule);
    NaN gives 0xFF.
    """
    v = v.float()
    m, e = torch.frexp(v)
    ceil_log2 = torch.where(m == 0.5, e - 1, e)
    code = (ceil_log2 + E8M0_BIAS).clamp(0, 254)
    code = torch.where(v == 0, torch.zeros_like(code), code)
    code = torch.where(torch.isinf(v), torch.full_like(code, 254), code)
    code = torch.where(torch.isnan(v), torch.full_like(code, E8M0_NAN), code)
    return code.to(torch.uint8)


def e8m0_decode_ref(code: torch.Tensor) -> torch.Tensor:
    """E8M0 code -> fp32 2^(code-127) (0x00 is the fp32 subnormal 2^-127), 0xFF -> NaN."""
    c = code.to(torch.int32)
    value = torch.pow(2.0, (c - E8M0_BIAS).double()).float()  # exact: fp64 power, fp32 cast
    return torch.where(c == E8M0_NAN, torch.full_like(value, math.nan), value)


def e2m1_encode_ref(y: torch.Tensor) -> torch.Tensor:
    """fp32 (already clamped to +-6) -> E2M1 nibble codes (uint8 0..15), nearest, ties even.

    Picks the nearest grid value; on a tie the even code (mantissa bit 0) wins, which
    gives TE's thresholds (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4).
    The sign bit is set for y < 0 only: -0.0 encodes as +0 (code 0) as in TE's
    reference, and NaN (no E2M1 encoding) gives code 0, like TE.
    """
    y = y.float()
    grid = torch.tensor(E2M1_VALUES, device=y.device, dtype=torch.float32)
    dist = (y.abs().unsqueeze(-1) - grid).abs()
    best = dist.min(dim=-1, keepdim=True).values
    tied = dist == best
    # among tied candidates prefer an even code: weight odd codes down by a half step
    codes = torch.arange(8, device=y.device)
    preference = tied.to(torch.int32) * (2 + (codes % 2 == 0).to(torch.int32))
    mag = preference.argmax(dim=-1).to(torch.uint8)
    mag = torch.where(torch.isnan(y), torch.zeros_like(mag), mag)
    sign = (y < 0).to(torch.uint8) << 3
    return mag | sign


def e2m1_decode_ref(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 nibble codes (0..15) -> fp32 values (code 8 is -0.0)."""
    table = torch.tensor(E2M1_VALUES, device=codes.device, dtype=torch.float32)
    c = codes.to(torch.int64)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def pack_nibbles_ref(codes: torch.Tensor) -> torch.Tensor:
    """[..., D] codes -> [..., D/2] bytes, element 2k in the low nibble, 2k+1 in the high."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles_ref(packed: torch.Tensor) -> torch.Tensor:
    """[..., D/2] bytes -> [..., D] codes (inverse of pack_nibbles_ref)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


# --------------------------------------------------------------------------------------
# Triton helpers (called from the kernels; fp32 in, int32 codes out)
# --------------------------------------------------------------------------------------


@triton.jit
def max_propagate_nan(a, b):
    """Combine fn for tl.reduce: a NaN anywhere makes the max NaN.

    tl.max follows fmaxf on the GPU and drops NaN, which would turn a NaN input into a
    finite scale; max.NaN keeps it, so a poisoned block dequantises to NaN.
    """
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def saturate(x, limit):
    """Clamp to [-limit, limit]; NaN stays NaN (fminf/fmaxf would replace it)."""
    y = tl.where(x > limit, limit, x)
    return tl.where(y < -limit, -limit, y)


@triton.jit
def encode_e4m3(x, HW_CAST: tl.constexpr):
    """fp32 in [-448, 448] or NaN -> E4M3 code (int32 0..255), round to nearest even."""
    if HW_CAST:
        return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        bits = x.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = bits & 0x7FFFFFFF
        # normal E4M3 (|x| >= 2^-6): keep 3 of 23 mantissa bits, RNE on the 20 dropped
        # bits, then rebias the exponent from 127 to 7 (120 << 3 = 960 in code units)
        rounded = a + 0x7FFFF + ((a >> 20) & 1)
        normal = (rounded >> 20) - 960
        # subnormal E4M3 (|x| < 2^-6): code = RNE(|x| / 2^-9), an integer 0..8
        exp = a >> 23
        mant = (a & 0x7FFFFF) | tl.where(exp > 0, 0x800000, 0)
        shift = tl.minimum(141 - tl.maximum(exp, 1), 30)  # |x| / 2^-9 = mant >> shift
        q = mant >> shift
        rem = mant & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        code = tl.where(a >= (121 << 23), normal, q)
        code = tl.where(a > 0x7F800000, 0x7F, code)
        return code | sign


@triton.jit
def decode_e4m3(code, HW_CAST: tl.constexpr):
    """E4M3 code (int32 0..255) -> fp32, NaN codes -> NaN."""
    if HW_CAST:
        return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        exp = (code >> 3) & 0xF
        mant = code & 7
        normal = (((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
        value = tl.where(exp == 0, mant.to(tl.float32) * 0.001953125, normal)  # 2^-9 units
        value = tl.where((code & 0x7F) == 0x7F, float("nan"), value)
        # the sign bit ORed in: Triton 3.6 builds a float's -x as 0 - x (3.9: fneg), which
        # made code 0x80 +0 where the hardware conversion and torch's float8_e4m3fn give -0
        sign = (code & 0x80) << 24
        return (value.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def encode_e8m0(v):
    """fp32 v >= 0 (or NaN/Inf) -> E8M0 code of the smallest power of two >= v.

    Integer form of ceil(log2 v): bump the fp32 exponent field when any mantissa bit
    is set; fp32 subnormals at or below 2^-127 (mantissa <= 0x400000) stay at code 0;
    saturate at 0xFE; +Inf -> 0xFE and NaN -> 0xFF, as TE's float_to_e8m0.
    """
    bits = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    exp = bits >> 23
    mant = bits & 0x7FFFFF
    bump = (mant > 0) & (exp != 0xFE) & ~((exp == 0) & (mant <= 0x400000))
    code = exp + bump.to(tl.int32)
    return tl.where(exp == 0xFF, tl.where(mant == 0, 0xFE, 0xFF), code)


@triton.jit
def encode_e2m1(y):
    """fp32 -> E2M1 code (int32 0..15), nearest, ties to even, saturating at +-6 (Inf
    too); -0.0 and NaN give code 0, tiny negatives -0 (code 8), as TE's reference (which
    clamps to +-6 first: the same codes, as rounding is monotonic).

    Arithmetic rather than a threshold per grid point: the NVFP4 quantiser is
    instruction-bound on Hopper, which has no E2M1 conversion.
    1. Round |y| to the E2M1 grid in fp32: the grid step is 0.5 below 2, 1 up to 4, 2 up
       to 6; adding 2^22 * step and subtracting it again rounds to that step, nearest-even
       (1.75 -> 2, 5 -> 4; a step's even multiples are the even codes).
    2. r * 2^-126 is exact (r has one significant bit after the leading one, or r < 1 is a
       multiple of 0.5: an fp32 subnormal). Its bits >> 22 are the E2M1 code, because E2M1
       is IEEE-like with bias 1 and 1.0 lands on fp32's smallest normal: 0.5 -> 1,
       1 -> 2, 1.5 -> 3, 2 -> 4, 3 -> 5, 4 -> 6, 6 -> 7 (needs IEEE subnormals, not FTZ).
    """
    # |y| saturated at 6 with one min (NaN -> 6 here; its code is zeroed below)
    a = tl.minimum(tl.abs(y), 6.0)
    bits = a.to(tl.int32, bitcast=True)
    magic = ((tl.maximum(bits, 0x3F800000) & 0x7F800000) + (22 << 23)).to(tl.float32,
                                                                           bitcast=True)
    r = (a + magic) - magic
    mag = (r * 1.1754943508222875e-38).to(tl.int32, bitcast=True) >> 22  # 2^-126
    mag = tl.where(y != y, 0, mag)  # NaN -> 0, as TE
    return mag | tl.where(y < 0, 8, 0)


@triton.jit
def decode_e2m1(code):
    """E2M1 code (int32 0..15) -> fp32: 2^(e-1) * (1 + m/2) for e > 0, m/2 for e == 0."""
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    normal = (1.0 + 0.5 * m) * tl.where(e == 3, 4.0, tl.where(e == 2, 2.0, 1.0))
    value = tl.where(e == 0, 0.5 * m, normal)
    # the sign bit ORed in, as in decode_e4m3: Triton 3.6's -x is 0 - x, +0 for code 8
    sign = (code & 8) << 28
    return (value.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def cast_out(x, OUT_DTYPE: tl.constexpr, HW_CAST: tl.constexpr):
    """fp32 -> OUT_DTYPE with round to nearest even (bf16 by integer ops off the fast path)."""
    if OUT_DTYPE == tl.bfloat16:
        if HW_CAST:
            return x.to(tl.bfloat16)
        else:
            bits = x.to(tl.int32, bitcast=True)
            a = bits & 0x7FFFFFFF
            r = (a + 0x7FFF + ((a >> 16) & 1)) >> 16
            r = tl.where(a > 0x7F800000, 0x7FC0, r) | ((bits >> 16) & 0x8000)
            return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(OUT_DTYPE)
