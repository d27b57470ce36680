"""kv_norm (RMSNorm) and GPT-J interleaved RoPE, defined so that a kernel can match them
bit for bit: each rule as a torch reference and as the ``@triton.jit`` helper the write
kernel calls.

RMSNorm, ``y = x * rstd * w`` with ``rstd = 1 / sqrt(mean(x^2) + eps)``:
  * the squares are exact in float64; their sum is taken in fixed point, so that no
    summation order matters: with ``2^e`` the smallest power of two above the largest
    square, every square is scaled by ``2^(43 - e)`` (exact), truncated to an int64 and
    the int64s summed (exact, any order: 576 terms < 2^43 stay below 2^53). What the
    truncation drops is below 2^-43 of the largest square per term: the mean square is
    correct to ~2^-33 relative, far below float32's rounding. The kernel computes that
    integer through float32 squares where they are exact (bf16 / fp16 inputs whose largest
    |x| is in [2^-41, 2^63): a quarter fewer instructions per token, offline for sm90), and
    through float64 ones otherwise.
  * ``mean + eps``, the square root and the reciprocal in float64 (each correctly
    rounded), rstd rounded once to float32; eps is taken as float32 (1e-6 ->
    9.99999997e-7), the value a kernel argument holds;
  * ``y = (x * rstd) * w``: two float32 multiplies (no add, so no FMA contraction).
  * A NaN or Inf in the normalised dims makes the mean square NaN (the token is poisoned
    rather than normalised to finite garbage).
RoPE, GPT-J interleaved (``is_neox_style=False``): pair ``i`` is dims ``(2i, 2i+1)`` of the
64 RoPE dims, rotated by ``theta = pos * base^(-2i/64)`` from a float32 ``cos_sin`` table
``[max_position, 64]`` (cos of the 32 frequencies, then their sin: vLLM's layout):
  ``out[2i] = x[2i] cos - x[2i+1] sin``, ``out[2i+1] = x[2i+1] cos + x[2i] sin``
computed in float64 (float32 products are exact there, so an FMA cannot change the result)
and rounded once to float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvperf_kernels.latent.layouts import D_NORM, D_ROPE
from kvperf_kernels.quant.groups import amax_propagate_nan

RMS_EPS = 1e-6
FIXED_POINT_BITS = 43
ROPE_BASE = 10000.0


def eps_f32(eps: float) -> float:
    return float(torch.tensor(eps, dtype=torch.float32))


def rope_cos_sin_cache(max_positions: int, rope_dim: int = D_ROPE,
                       base: float = ROPE_BASE) -> torch.Tensor:
    """float32 [max_positions, rope_dim]: cos of the rope_dim/2 frequencies, then their sin
    (computed in float64, rounded once)."""
    inv_freq = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


# --------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------

def mean_square_ref(x: torch.Tensor) -> torch.Tensor:
    """float64 [T]: mean of x^2 over the last dim, fixed-point summed (see the module)."""
    sq = x.double() ** 2
    m = sq.amax(dim=-1)
    _, e = torch.frexp(m)  # m < 2^e
    k = torch.where(m > 0, FIXED_POINT_BITS - e, torch.zeros_like(e))
    scaled = sq * torch.pow(2.0, k.double())[:, None]
    total = torch.trunc(scaled).to(torch.int64).sum(dim=-1)
    ms = total.double() * torch.pow(2.0, -k.double()) / x.shape[-1]
    return torch.where(torch.isfinite(sq).all(dim=-1), ms, torch.full_like(ms, float("nan")))


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """float32 [T, D]: x * rstd * weight over the last dim (module rules)."""
    rstd = (1.0 / torch.sqrt(mean_square_ref(x) + eps_f32(eps))).float()
    return (x.float() * rstd[:, None]) * weight.float()


def rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """float32 [T, 64]: GPT-J interleaved RoPE of x [T, 64] at positions [T]."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions.long()].double()
    cos, sin = cs[:, :half], cs[:, half:]
    even, odd = x[:, 0::2].double(), x[:, 1::2].double()
    out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    out[:, 0::2] = even * cos - odd * sin
    out[:, 1::2] = odd * cos + even * sin
    return out.float()


def kv_norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, layout, eps: float = RMS_EPS) -> torch.Tensor:
    """float32 [T, layout.d_in]: kv_norm over the first 512 dims, RoPE on the RoPE dims."""
    y = x.float().clone()
    y[:, :D_NORM] = rms_norm_ref(x[:, :D_NORM], weight, eps)
    r = layout.rope_in
    y[:, r:r + D_ROPE] = rope_ref(y[:, r:r + D_ROPE], positions, cos_sin)
    return y


# --------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------

@triton.jit
def _fixed_point_sum(sq, k):
    """sum(trunc(sq * 2^k)) as int64 (any reduction order gives the same integer)."""
    pow2k = ((k + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    return tl.sum((sq * pow2k).to(tl.int64))


@triton.jit
def _exponent_shift(m):
    """k with m * 2^k < 2^43 <= 2 m * 2^k (m a positive normal float64); 0 for m == 0."""
    biased = (m.to(tl.int64, bitcast=True) >> 52) & 0x7FF
    return tl.where(m > 0, 1065 - biased, 0)  # frexp exponent e = biased - 1022; 43 - e


@triton.jit
def _fixed_point_f64(a, b, c):
    """(sum, k, non-finite count) of the module's fixed-point sum of squares, in float64."""
    sa = a.to(tl.float64) * a.to(tl.float64)
    sb = b.to(tl.float64) * b.to(tl.float64)
    sc = c.to(tl.float64) * c.to(tl.float64)
    m = tl.maximum(tl.maximum(tl.max(sa), tl.max(sb)), tl.max(sc))
    k = _exponent_shift(m)
    total = _fixed_point_sum(sa, k) + _fixed_point_sum(sb, k) + _fixed_point_sum(sc, k)
    # x - x is NaN for NaN and +-Inf: any non-finite value poisons the token
    bad = tl.sum(((a - a) != 0).to(tl.int32)) + tl.sum(((b - b) != 0).to(tl.int32)) \
        + tl.sum(((c - c) != 0).to(tl.int32))
    return total, k, bad


@triton.jit
def _fixed_point_f32(a, b, c, amax_bits):
    """(sum, k) as _fixed_point_f64 computes them, in float32, for values with at most 12
    significant bits (bf16, fp16) and 2^-41 <= max |x| < 2^63: each square is exact in
    float32, and so is its scaling by 2^k, unless it falls below float32's normal range,
    where it is below 2^-83 <= 2^-43 of the largest square and truncates to 0 either way."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    m = amax * amax  # the largest square (a square of the largest |x|)
    k = 169 - ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF)  # 43 - frexp exponent
    pow2k = ((k + 127) << 23).to(tl.float32, bitcast=True)  # k in [-84, 126]: normal
    total = tl.sum((a * a * pow2k).to(tl.int64)) + tl.sum((b * b * pow2k).to(tl.int64)) \
        + tl.sum((c * c * pow2k).to(tl.int64))
    return total, k.to(tl.int64)


@triton.jit
def tile_amax_bits(v):
    """max |v| over the whole tile as int32 bits (quant.groups' NaN-propagating amax: NaN
    and Inf lie above every finite value)."""
    return amax_propagate_nan(v, None).to(tl.int32, bitcast=True)


@triton.jit
def rstd_from_parts(a, b, c, eps, N: tl.constexpr, NARROW: tl.constexpr):
    """float32 rstd of the N values held in a, b, c (fp32, any shapes; masked lanes 0).
    NARROW: the values came from bf16 / fp16 (so a token of finite values whose largest
    |x| is in [2^-41, 2^63) takes the float32 sum of _fixed_point_f32, the same integer;
    the others, and float32 inputs, the float64 one)."""
    if NARROW:
        top = tl.maximum(tl.maximum(tile_amax_bits(a), tile_amax_bits(b)), tile_amax_bits(c))
        # 2^-41 and 2^63 as float32 bits (NaN and Inf bits lie above 2^63)
        if (top >= 0x2B000000) & (top < 0x5F000000):
            total, k = _fixed_point_f32(a, b, c, top)
            bad = top * 0
        else:
            total, k, bad = _fixed_point_f64(a, b, c)
    else:
        total, k, bad = _fixed_point_f64(a, b, c)
    inv_pow2k = ((1023 - k).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    ms = total.to(tl.float64) * inv_pow2k / N
    # float64 division and square root are IEEE (correctly rounded) on NVIDIA GPUs and
    # numpy alike; sqrt_rn / div_rn are float32-only
    rstd = 1.0 / tl.sqrt(ms + eps)  # eps: a float32 argument, widened exactly
    rstd = tl.where(bad > 0, float("nan"), rstd)
    return rstd.to(tl.float32)


@triton.jit
def rope_pairs(even, odd, cos, sin):
    """GPT-J rotation of the pairs (even[i], odd[i]) in float64, rounded to float32."""
    e, o = even.to(tl.float64), odd.to(tl.float64)
    c, s = cos.to(tl.float64), sin.to(tl.float64)
    return (e * c - o * s).to(tl.float32), (o * c + e * s).to(tl.float32)
