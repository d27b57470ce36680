"""Property tests of the quantisers, dequantisers, the compressed-cache entry points and the
TE attention block's reference over their argument space (hypothesis).

Every draw either raises a TypeError / ValueError whose message names a broken argument,
or gives exactly the torch reference's bytes (quantisers: codes and scales, NaN == NaN;
dequantisers: floats, NaN == NaN), and finite inputs never give NaN codes, scales or values.
Nothing else escapes (no IndexError / RuntimeError / Triton error, no crash).

Draws: leading dims (0-sized included), last dims (block multiples, and not), dtypes (the
three float inputs, and float64 / ints / bool / FP8), layouts (contiguous, a slice of a wider
last dim, every other row, transposed, leading dims that cannot be flattened), values from
N(0, 1) per-channel spreads at magnitudes 2^-40 .. 2^40 with NaN / +-Inf / +-0 / subnormals
planted (bf16 subnormals only on a GPU: Triton's CPU interpreter loads them wrongly), block
sizes, global amaxes (None, floats incl. 0 / Inf / huge ints, tensors incl. NaN), output
dtypes, hw_cast, and for the dequantisers every stored byte and scale (NaN / Inf / 0 /
negative / subnormal). Example counts: kvperf_kernels.testing.properties.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvperf_kernels.attention.compressed import (
    attend_compressed,
    compress,
    decode_attention,
    decode_attention_ref,
    decompress,
)
from kvperf_kernels.cache.kv_memory import FORMATS
from kvperf_kernels.device import default_device, interpreted
from kvperf_kernels.models.te_attention_block import (
    ROW_LOCAL_FORMATS,
    BlockDims,
    BlockWeights,
    attention_block_ref,
    random_weights,
)
from kvperf_kernels.quant import fp8, mxfp8, nvfp4
from kvperf_kernels.testing.compare import same_bytes, same_floats
from kvperf_kernels.testing.inputs import kv_like
from kvperf_kernels.testing.params import FLOAT_DTYPES, to_cpu
from kvperf_kernels.testing.properties import (
    Expect,
    flush_bf16_subnormals,
    property_settings,
    raises_naming,
)

DEV = default_device()
BF16, FP16, FP32 = FLOAT_DTYPES
E4M3 = torch.float8_e4m3fn
FINITE_RANGE = {BF16: 100, FP16: 12, FP32: 100}  # |log2| of the drawn magnitudes
BAD_DTYPES = [torch.float64, torch.int32, torch.uint8, torch.bool, E4M3]

# name -> (kernel, reference, block along the last dim (None: the whole row))
QUANTISERS = {
    "per_token": (fp8.quantize_per_token, fp8.quantize_per_token_ref, None),
    "per_tensor": (fp8.quantize_per_tensor, fp8.quantize_per_tensor_ref, None),
    "per_block": (fp8.quantize_per_block, fp8.quantize_per_block_ref, "drawn"),
    "mxfp8": (mxfp8.quantize_mxfp8, mxfp8.quantize_mxfp8_ref, mxfp8.MX_BLOCK),
    "nvfp4": (nvfp4.quantize_nvfp4, nvfp4.quantize_nvfp4_ref, nvfp4.NVFP4_BLOCK),
}


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

@st.composite
def float_inputs(draw, *, block: int | None, dtype=None):
    """(x, block) valid for a quantiser with this block (None: any last dim)."""
    dtype = dtype or draw(st.sampled_from(FLOAT_DTYPES))
    # hypothesis shrinks towards the first choice: the richer cases come first
    if block is None:
        d = draw(st.sampled_from([64, 100, 3, 256, 16, 1]))
    else:
        d = block * draw(st.sampled_from([2, 1, 3]))
    lead = draw(st.sampled_from([(3,), (2, 5), (5,), (0,), (1,), (), (4, 0), (2, 1, 3)]))
    layout = draw(st.sampled_from(["sliced", "every_other_row", "contiguous"]))
    wide = d + (8 if layout == "sliced" else 0)
    rows = math.prod(lead) * (2 if layout == "every_other_row" else 1)
    x = kv_like((rows, wide), torch.float32, draw(st.integers(0, 2**16)), "cpu")
    span = FINITE_RANGE[dtype]
    exps = draw(st.lists(st.integers(-span, span // 2), min_size=1, max_size=4))
    x = x * torch.exp2(torch.tensor(exps, dtype=torch.float32)).repeat(rows)[:rows, None]
    specials = draw(st.lists(st.sampled_from(
        [math.nan, math.inf, -math.inf, 0.0, -0.0, 2.0**-130, -(2.0**-149), 448.0, 1e-3]),
        max_size=3))
    flat = x.view(-1)
    for i, value in enumerate(specials):
        if flat.numel():
            flat[(i * 7919) % flat.numel()] = value
    x = flush_bf16_subnormals(x.to(dtype))
    x = x.to(DEV)
    if layout == "sliced":
        x = x[:, :d]
    elif layout == "every_other_row":
        x = x[::2]
    return x.reshape(*lead, d)  # a view: splitting the row dim keeps the layout


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.float()).all())


def _check_no_nan(x, outputs, what: str) -> None:
    """Finite input: no NaN code or scale (E4M3 codes 0x7F / 0xFF), no NaN dequantised."""
    if not _finite(x):
        return
    for t in outputs:
        t = to_cpu(t)
        if t.dtype == E4M3:
            assert not torch.isnan(t.float()).any(), f"{what}: NaN codes from finite input"
        elif t.dtype == torch.uint8 and "mxfp8" in what:
            assert (t != 0xFF).all(), f"{what}: NaN E8M0 scale from finite input"
        elif t.dtype.is_floating_point:
            assert torch.isfinite(t).all(), f"{what}: NaN/Inf scale from finite input"


def _nan_codes_positive(t: torch.Tensor) -> torch.Tensor:
    """E4M3 codes with the NaN code's sign cleared (0xFF -> 0x7F).

    A NaN's sign is not part of the contract: the hardware conversion gives 0x7F for every
    NaN and GPU arithmetic makes canonical (positive) NaNs, but in the CPU interpreter x86
    propagates an input NaN's sign (a -NaN input), which the integer encoder keeps (0xFF)
    while torch's own arithmetic in the reference may pick the other operand's NaN."""
    b = t.view(torch.uint8)
    return torch.where(b == 0xFF, torch.full_like(b, 0x7F), b)


def _same(actual, expected, what: str) -> None:
    actual, expected = to_cpu(actual), to_cpu(expected)
    if actual.dtype.is_floating_point and actual.element_size() > 1:
        same_floats(actual, expected, what)
    elif actual.dtype == E4M3:
        same_bytes(_nan_codes_positive(actual), _nan_codes_positive(expected), what)
    else:
        same_bytes(actual, expected, what)


# --------------------------------------------------------------------------------------
# Quantisers: valid draws give the reference's bytes
# --------------------------------------------------------------------------------------

@st.composite
def quantiser_calls(draw, name: str):
    kernel, ref, block = QUANTISERS[name]
    kwargs, ref_kwargs = {}, {}
    if block == "drawn":
        block = draw(st.sampled_from([32, 48, 16, 128]))
        kwargs["block"] = ref_kwargs["block"] = block
    x = draw(float_inputs(block=block))
    if name == "nvfp4":
        amax = draw(st.sampled_from(["tensor", "float", "none"]))
        if amax != "none":
            value = draw(st.sampled_from([3.0, 0.0, 1e-30, 448.0, 1e30, math.inf, 10**40,
                                          math.nan]))
            if amax == "float":
                value = 0.0 if math.isnan(value) else value  # NaN floats are rejected
                kwargs["global_amax"] = ref_kwargs["global_amax"] = value
            else:
                t = torch.tensor([float(value)], dtype=torch.float32, device=DEV)
                kwargs["global_amax"], ref_kwargs["global_amax"] = t, t.cpu()
    kwargs["hw_cast"] = draw(st.sampled_from([None, False] if interpreted() else
                                             [None, False, True]))
    return kernel, ref, x, kwargs, ref_kwargs


@pytest.mark.parametrize("name", list(QUANTISERS))
@property_settings(cpu_examples=16)
@given(data=st.data())
def test_quantisers_give_the_reference_bytes(name, data):
    kernel, ref, x, kwargs, ref_kwargs = data.draw(quantiser_calls(name))
    what = f"{name} {tuple(x.shape)} {x.dtype} stride {x.stride()} {kwargs}"
    with raises_naming(None):
        got = kernel(x, **kwargs)
    expected = ref(x.cpu(), **ref_kwargs)
    for i, (a, e) in enumerate(zip(got, expected, strict=True)):
        _same(a, e, f"{what}: output {i}")
    amax = kwargs.get("global_amax")
    if not torch.is_tensor(amax) or _finite(amax):  # a NaN global amax poisons by design
        _check_no_nan(x, got, what)


# --------------------------------------------------------------------------------------
# Quantisers: broken arguments
# --------------------------------------------------------------------------------------

def _bad_dtype(x, kw, e, r):
    dtype = r.choice(BAD_DTYPES)
    e.add(TypeError, "x")
    return x.float().to(dtype), kw


def _not_a_tensor(x, kw, e, r):
    e.add(TypeError, "x")
    return r.choice([x.tolist(), 1.0, None, "x"]), kw


def _zero_dim(x, kw, e, r):
    e.add(ValueError, "x")
    return torch.tensor(1.0, device=DEV), kw


def _last_dim_zero(x, kw, e, r):
    e.add(ValueError, "x")
    return torch.zeros(*x.shape[:-1], 0, device=DEV), kw


def _last_dim_strided(x, kw, e, r):
    e.add(ValueError, "x")
    return torch.zeros(max(x.shape[-1], 2), 4, dtype=x.dtype, device=DEV).t(), kw


def _not_flattenable(x, kw, e, r):
    e.add(ValueError, "x")
    d = x.shape[-1]
    return torch.zeros(3, 4, d, dtype=x.dtype, device=DEV).transpose(0, 1), kw


def _row_too_long(x, kw, e, r):
    e.add(ValueError, "x", "block")
    return torch.zeros(1, 16384 + 128, dtype=x.dtype, device=DEV), kw


def _not_block_multiple(x, kw, e, r):
    block = kw.get("block", 32)
    e.add(ValueError, "x")
    return torch.zeros(2, block * 2 + 8, dtype=x.dtype, device=DEV), kw


def _bad_hw_cast(x, kw, e, r):
    e.add(TypeError, "hw_cast")
    return x, {**kw, "hw_cast": r.choice(["yes", 1, 0.0])}


def _meta_device(x, kw, e, r):
    e.add(ValueError, "x")
    return x.to("meta"), kw


def _bad_block(x, kw, e, r):
    value = r.choice([0, -16, 2.5, True, "32", 16384 * 2])
    e.add(ValueError, "block")
    return x, {**kw, "block": value}


def _bad_global_amax(x, kw, e, r):
    kind = r.choice(["negative", "nan", "str", "fp16", "two", "meta", "bool"])
    value = {"negative": -1.0, "nan": math.nan, "str": "7", "bool": True,
             "fp16": torch.ones(1, dtype=torch.float16, device=DEV),
             "two": torch.ones(2, device=DEV), "meta": torch.ones(1, device="meta")}[kind]
    e.add(TypeError if kind in ("str", "bool") else ValueError, "global_amax")
    return x, {**kw, "global_amax": value}


COMMON = [_bad_dtype, _not_a_tensor, _zero_dim, _last_dim_zero, _last_dim_strided,
          _not_flattenable, _row_too_long, _bad_hw_cast, _meta_device]
QUANT_MUTATIONS = [(name, m) for name in QUANTISERS for m in COMMON
                   if (name, m) != ("per_block", _row_too_long)]  # its groups are blocks
QUANT_MUTATIONS += [(name, _not_block_multiple) for name in ("per_block", "mxfp8", "nvfp4")]
QUANT_MUTATIONS += [("per_block", _bad_block), ("nvfp4", _bad_global_amax)]


@pytest.mark.parametrize("name, mutate", QUANT_MUTATIONS,
                         ids=[f"{n}-{m.__name__.strip('_')}" for n, m in QUANT_MUTATIONS])
@property_settings(cpu_examples=2)
@given(data=st.data())
def test_quantisers_reject_broken_arguments(name, mutate, data):
    kernel, _, block = QUANTISERS[name]
    kw = {}
    if block == "drawn":
        block = 32
        kw["block"] = block
    x = data.draw(float_inputs(block=block))
    e = Expect()
    x, kw = mutate(x, kw, e, data.draw(st.randoms(use_true_random=False)))
    with raises_naming(e.errors):
        kernel(x, **kw)


# --------------------------------------------------------------------------------------
# Dequantisers: every stored byte and scale, as the reference decodes it
# --------------------------------------------------------------------------------------

SCALE_SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.5, 2.0**-140, 2.0**-126,
                  3.4e38, 1.0]


@st.composite
def stored_parts(draw, fmt: str):
    """(kernel args, reference args) of one dequantiser call: random bytes, drawn scales."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lead = tuple(draw(st.lists(st.sampled_from([0, 1, 3]), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    specials = draw(st.lists(st.sampled_from(SCALE_SPECIALS), max_size=3))

    def scales(shape):
        s = torch.exp2(torch.randint(-30, 30, shape, generator=gen).float())
        flat = s.view(-1)
        for i, v in enumerate(specials):
            if flat.numel():
                flat[(i * 131) % flat.numel()] = v
        return s

    def random_bytes(shape):
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)

    if fmt == "fp8":
        block = draw(st.sampled_from(["tensor", "token", "token_squeezed", 16, 64]))
        d = 64
        q = random_bytes((*lead, d)).view(E4M3)
        shape = {"tensor": (1,), "token": (*lead, 1), "token_squeezed": lead}.get(
            block, (*lead, d // block) if isinstance(block, int) else None)
        if block == "token_squeezed" and math.prod(lead) == 1:
            shape = (*lead, 1)  # one element would read as per-tensor: the same values
        parts = (q, scales(shape))
    elif fmt == "mxfp8":
        d = 32 * draw(st.sampled_from([1, 2]))
        parts = (random_bytes((*lead, d)).view(E4M3), random_bytes((*lead, d // 32)))
    else:
        d = 16 * draw(st.sampled_from([1, 2]))
        parts = (random_bytes((*lead, d // 2)), random_bytes((*lead, d // 16)).view(E4M3),
                 scales((1,)))
    return tuple(p.to(DEV) for p in parts), parts, dtype


DEQUANTISERS = {"fp8": (fp8.dequantize, fp8.dequantize_ref),
                "mxfp8": (mxfp8.dequantize_mxfp8, mxfp8.dequantize_mxfp8_ref),
                "nvfp4": (nvfp4.dequantize_nvfp4, nvfp4.dequantize_nvfp4_ref)}


@pytest.mark.parametrize("fmt", list(DEQUANTISERS))
@property_settings(cpu_examples=16)
@given(data=st.data())
def test_dequantisers_decode_every_byte_as_the_reference(fmt, data):
    kernel, ref = DEQUANTISERS[fmt]
    parts, ref_parts, dtype = data.draw(stored_parts(fmt))
    with raises_naming(None):
        out = kernel(*parts, dtype=dtype)
    _same(out, ref(*ref_parts, dtype=dtype), f"{fmt} -> {dtype} {[tuple(p.shape) for p in parts]}")


PART_NAMES = {"fp8": ("q", "scale"), "mxfp8": ("q", "scale_e8m0"),
              "nvfp4": ("packed", "block_scale", "global_scale")}


def _retyped(t: torch.Tensor) -> torch.Tensor:
    """The same bytes or values in a dtype no dequantiser takes for that part."""
    if t.dtype == E4M3:
        return t.view(torch.uint8)
    if t.dtype == torch.uint8:
        return t.view(E4M3) if t.numel() else t.to(torch.int16)
    return t.to(torch.float16)


def _dq_wrong_dtype(parts, e, r):
    i = r.randrange(len(parts))
    bad = _retyped(parts[i])
    if r.fmt == "nvfp4" and i == 0 and bad.dtype == E4M3:
        bad = parts[0].to(torch.int16)  # packed as E4M3 would still be bytes: use int16
    e.add(TypeError, PART_NAMES[r.fmt][i])
    return parts[:i] + (bad,) + parts[i + 1:], {}


def _dq_out_dtype(parts, e, r):
    e.add(TypeError, "dtype")
    return parts, {"dtype": r.choice([torch.int8, torch.float64, "float32", None])}


def _dq_not_contiguous(parts, e, r):
    q = parts[0]
    e.add(ValueError, {"fp8": "q", "mxfp8": "q", "nvfp4": "packed"}[r.fmt])
    wide = torch.cat([q, q], dim=-1)
    return (wide[..., ::2],) + parts[1:], {}


def _dq_scale_shape(parts, e, r):
    """A scale with one block more than the stored values have (fp8: 3 blocks of a 64 dim)."""
    e.add(ValueError, PART_NAMES[r.fmt][1])
    q, s = parts[0], parts[1]
    blocks = 3 if r.fmt == "fp8" else s.shape[-1] + 1
    bad = torch.zeros(*q.shape[:-1], blocks, dtype=s.dtype, device=s.device)
    return (q, bad) + parts[2:], {}


def _dq_meta(parts, e, r):
    i = r.randrange(len(parts))
    e.add(ValueError, PART_NAMES[r.fmt][i])
    return parts[:i] + (parts[i].to("meta"),) + parts[i + 1:], {}


def _dq_hw_cast(parts, e, r):
    e.add(TypeError, "hw_cast")
    return parts, {"hw_cast": "yes"}


DQ_MUTATIONS = [_dq_wrong_dtype, _dq_out_dtype, _dq_not_contiguous, _dq_scale_shape, _dq_meta,
                _dq_hw_cast]


@pytest.mark.parametrize("fmt", list(DEQUANTISERS))
@pytest.mark.parametrize("mutate", DQ_MUTATIONS, ids=lambda m: m.__name__.strip("_"))
@property_settings(cpu_examples=3)
@given(data=st.data())
def test_dequantisers_reject_broken_arguments(fmt, mutate, data):
    kernel, _ = DEQUANTISERS[fmt]
    parts, _, _ = data.draw(stored_parts(fmt))
    r = data.draw(st.randoms(use_true_random=False))
    r.fmt = fmt
    e = Expect()
    if mutate is _dq_not_contiguous and not parts[0].numel():
        return  # an empty tensor is contiguous whatever its strides
    parts, kw = mutate(parts, e, r)
    with raises_naming(e.errors):
        kernel(*parts, **kw)


# --------------------------------------------------------------------------------------
# compress / decompress / attend_compressed / decode_attention
# --------------------------------------------------------------------------------------

ROUNDTRIP_REFS = {
    "fp8_per_tensor": lambda x: fp8.dequantize_ref(*fp8.quantize_per_tensor_ref(x)),
    "fp8_per_token": lambda x: fp8.dequantize_ref(*fp8.quantize_per_token_ref(x)),
    "fp8_per_block128": lambda x: fp8.dequantize_ref(*fp8.quantize_per_block_ref(x, 128)),
    "mxfp8": lambda x: mxfp8.dequantize_mxfp8_ref(*mxfp8.quantize_mxfp8_ref(x)),
    "nvfp4": lambda x: nvfp4.dequantize_nvfp4_ref(*nvfp4.quantize_nvfp4_ref(x)),
    "bf16": lambda x: x.to(BF16).float(),
    "fp16": lambda x: x.to(FP16).float(),
}


@st.composite
def kv_tensors(draw, *, batch=None):
    b = draw(st.sampled_from([0, 1, 2])) if batch is None else batch
    t, h, d = draw(st.sampled_from([1, 5])), draw(st.sampled_from([1, 2])), 128
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    x = kv_like((b, t, h, d), torch.float32, draw(st.integers(0, 2**16)), "cpu")
    return flush_bf16_subnormals(x.to(dtype)).to(DEV)


@property_settings(cpu_examples=20)
@given(x=kv_tensors(), fmt=st.sampled_from(FORMATS))
def test_compress_decompress_roundtrip_is_the_reference(x, fmt):
    with raises_naming(None):
        c = compress(x, fmt)
        back = decompress(c, torch.float32)
    assert c.nbytes == c.expected_nbytes, (fmt, c.nbytes, c.expected_nbytes)
    assert back.shape == x.shape
    same_floats(to_cpu(back), ROUNDTRIP_REFS[fmt](x.cpu()), f"{fmt} {tuple(x.shape)} {x.dtype}")
    assert torch.isfinite(back).all(), f"{fmt}: NaN from finite input"


@property_settings(cpu_examples=25)
@given(x=kv_tensors(), r=st.randoms(use_true_random=False))
def test_compress_rejects_broken_arguments(x, r):
    e = Expect()
    fmt, kw = r.choice(FORMATS), {}
    kind = r.choice(["fmt", "dtype", "type", "global_amax", "d", "dtype_out", "not_kv"])
    if kind == "fmt":
        fmt = r.choice(["fp6", "", None, 3])
        e.add(ValueError, "format")
    elif kind == "dtype":
        x = x.to(r.choice(BAD_DTYPES))
        e.add(TypeError, "x")
    elif kind == "type":
        x = x.tolist()
        e.add(TypeError, "x")
    elif kind == "global_amax":
        fmt = r.choice([f for f in FORMATS if f != "nvfp4"])
        kw["global_amax"] = torch.ones(1, device=DEV)
        e.add(ValueError, "global_amax")
    elif kind == "d":
        x = x[..., :40]
        fmt = r.choice(["fp8_per_block128", "mxfp8", "nvfp4"])
        e.add(ValueError, "head_dim")
    with raises_naming(e.errors):
        c = compress(x, fmt, **kw)
    if kind == "dtype_out":
        with raises_naming({TypeError: ("dtype",)}):
            decompress(c, r.choice([torch.int32, torch.float64, "bf16"]))
    elif kind == "not_kv":
        with raises_naming({TypeError: ("c must be",)}):
            decompress(c.tensors, torch.float32)


@property_settings(cpu_examples=10)
@given(data=st.data())
def test_attend_compressed_matches_the_reference_on_the_stored_cache(data):
    b = data.draw(st.sampled_from([0, 1, 2]))
    k = data.draw(kv_tensors(batch=b))
    v = (k.float().flip(-1) * 2).to(k.dtype)
    group = data.draw(st.sampled_from([1, 2]))
    q_dtype = data.draw(st.sampled_from([BF16, FP16]))
    q = kv_like((b, k.shape[2] * group, k.shape[3]), torch.float32, 7, "cpu").to(DEV, q_dtype)
    fmt = data.draw(st.sampled_from(FORMATS))
    sm_scale = data.draw(st.sampled_from([None, 0.05, 1.0]))
    ck, cv = compress(k, fmt), compress(v, fmt)
    with raises_naming(None):
        out = attend_compressed(q, ck, cv, sm_scale=sm_scale)
    ref = decode_attention_ref(q, decompress(ck, q_dtype), decompress(cv, q_dtype),
                               sm_scale=sm_scale)
    assert out.shape == q.shape and out.dtype == q_dtype
    assert torch.isfinite(out).all(), f"{fmt}: NaN/Inf from finite input"
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=2e-2, rtol=2**-6)


def test_attention_of_an_empty_batch_is_empty():
    """Found on the H200: torch 2.11's CUDA SDPA returned None for a batch of 0."""
    q = torch.zeros(0, 4, 128, dtype=BF16, device=DEV)
    k = torch.zeros(0, 3, 2, 128, dtype=BF16, device=DEV)
    for fmt in FORMATS:
        out = attend_compressed(q, compress(k, fmt), compress(k, fmt))
        assert out.shape == q.shape and out.dtype == BF16, fmt
    assert decode_attention_ref(q, k, k).shape == q.shape


@property_settings(cpu_examples=20)
@given(x=kv_tensors(batch=1), r=st.randoms(use_true_random=False))
def test_decode_attention_rejects_broken_arguments(x, r):
    k = x.to(BF16)
    q = torch.zeros(1, k.shape[2] * 2, k.shape[3], dtype=BF16, device=DEV)
    v, kw, e = k, {}, Expect()
    kind = r.choice(["q_type", "q_dtype", "q_dim", "heads", "kv_shape", "device", "sm_scale",
                     "kv_dtype", "not_compressed"])
    if kind == "q_type":
        q = q.tolist()
        e.add(TypeError, "q")
    elif kind == "q_dtype":
        q = q.to(r.choice([torch.float32, torch.int32]))
        e.add(TypeError, "q")
    elif kind == "q_dim":
        q = q[0]
        e.add(ValueError, "q must")
    elif kind == "heads":
        hq = k.shape[2] * 2 + 1 if k.shape[2] > 1 else 0  # not a multiple of Hkv, or none
        q = torch.zeros(1, hq, k.shape[3], dtype=BF16, device=DEV)
        e.add(ValueError, "q_heads")
    elif kind == "kv_shape":
        v = v[:, :, :, :64]
        e.add(ValueError, "k and v")
    elif kind == "device":
        v = v.to("meta")
        e.add(ValueError, "v is on")
    elif kind == "sm_scale":
        kw["sm_scale"] = r.choice([math.nan, math.inf, 0.0, -1.0, 1e39, "x", True])
        e.add(TypeError if isinstance(kw["sm_scale"], (str, bool)) else ValueError, "sm_scale")
    elif kind == "kv_dtype":
        v = v.to(torch.int32)
        e.add(TypeError, "v")
    if kind == "not_compressed":
        with raises_naming({TypeError: ("k must be",)}):
            attend_compressed(q, k, v)
        return
    with raises_naming(e.errors):
        decode_attention(q, k, v, **kw)


# --------------------------------------------------------------------------------------
# The TE attention block's reference (the block itself needs TE and a GPU)
# --------------------------------------------------------------------------------------

DIMS = BlockDims(hidden=64, q_heads=4, kv_heads=2, head_dim=128)


@pytest.fixture(scope="module")
def block_weights() -> BlockWeights:
    return random_weights(DIMS, generator=torch.Generator().manual_seed(0), device=DEV)


@property_settings(cpu_examples=15)
@given(batch=st.sampled_from([2, 1, 0]), past=st.sampled_from([3, 0, 1]),
       new=st.sampled_from([1, 2]), dtype=st.sampled_from([BF16, FP32]),
       kv_format=st.sampled_from([None, *ROW_LOCAL_FORMATS, "fp8_per_tensor", "int4"]),
       broken=st.sampled_from(["none", "none", "hidden", "int", "batch", "meta", "weights",
                               "list"]))
def test_attention_block_ref_runs_or_names_the_argument(block_weights, batch, past, new,
                                                        dtype, kv_format, broken):
    gen = torch.Generator().manual_seed(batch * 10 + past)
    x_past = torch.randn(batch, past, DIMS.hidden, generator=gen).to(DEV, dtype)
    x_new = torch.randn(batch, new, DIMS.hidden, generator=gen).to(DEV, dtype)
    w, e = block_weights, Expect()
    if broken == "hidden":
        x_new = x_new[..., :32]
        e.add(ValueError, "x_new")
    elif broken == "int":
        x_past = x_past.to(torch.int32)
        e.add(TypeError, "x_past")
    elif broken == "batch":
        x_new = torch.cat([x_new, x_new[:1] if batch else
                           torch.zeros(1, new, DIMS.hidden, device=DEV, dtype=dtype)])
        e.add(ValueError, "x_new")
    elif broken == "meta":
        x_new = x_new.to("meta")
        e.add(ValueError, "x_new")
    elif broken == "weights":
        w = dict(vars(block_weights))
        e.add(TypeError, "w and dims")
    elif broken == "list":
        x_past = x_past.tolist()
        e.add(TypeError, "x_past")
    if e.valid and kv_format is not None and kv_format not in ROW_LOCAL_FORMATS:
        e.add(ValueError, "kv_format")
    with raises_naming(e.errors):
        out = attention_block_ref(w, DIMS, x_past, x_new, kv_format=kv_format)
    if e.valid:
        assert out.shape == (batch, new, DIMS.hidden) and out.dtype == torch.float32
        assert torch.isfinite(out).all(), f"{kv_format}: NaN/Inf from finite input"
