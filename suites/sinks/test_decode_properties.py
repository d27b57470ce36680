"""Property tests of ``paged_decode_attention`` over its argument space (hypothesis).

Every draw either raises a TypeError / ValueError / NotImplementedError whose message names
a broken argument, or matches the float64 reference within the suite's tolerances
(``assert_matches_reference``: NaN/Inf never pass, so finite inputs never give NaN). Nothing
else may escape: no IndexError, RuntimeError or Triton error, and no crash (in the CPU
interpreter an out-of-bounds read is a segfault of the whole run; on a GPU,
``.ci/sanitize`` runs this file under compute-sanitizer).

Draws: batch 0..3 of ragged lengths, GQA groups, head_dim 64/128, page sizes, BF16/FP16 and
FP8 (e4m3fn, e4m3fnuz) KV with per-tensor (float or tensor) and per-token (plain, trailing
1, strided) scales, sinks (incl. -inf), windows (incl. 0 and beyond any length), split
counts, strided q / K / V / out views, extra block-table columns, max_seq_len and the
checked mode; then broken arguments (dtypes, shapes, devices, layouts, Python scalars
NaN/Inf/0/negative/huge, lengths past the table, page ids outside the cache, NaN sinks and
scales). In unchecked mode lying lengths and page ids are clamped in the kernel: the output
is the reference's on the clamped table.

Example counts: see kvperf_kernels.testing.properties (more on a GPU, or
KVPERF_HYPOTHESIS_EXAMPLES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from kvperf_kernels.attention.decode import MAX_SPLITS, DecodeLaunch, paged_decode_attention
from kvperf_kernels.attention.decode_ref import paged_decode_attention_ref
from kvperf_kernels.testing.compare import assert_matches_reference
from kvperf_kernels.testing.decode_specs import E4M3FNUZ
from kvperf_kernels.testing.inputs import make_decode_case
from kvperf_kernels.testing.properties import Expect, property_settings, raises_naming

BF16, FP16, E4M3 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
KV_CHOICES = [(E4M3, "per_token"), (BF16, None), (E4M3, "per_tensor"), (FP16, None)]
if E4M3FNUZ is not None:
    KV_CHOICES += [(E4M3FNUZ, "per_tensor"), (E4M3FNUZ, "per_token")]
Q_NAMES = ("q:", "q must", "query q")  # how the launcher's messages name q


@dataclass
class Draw:
    """One call's parameters (tensors are built from them by ``build``)."""

    lens: list[int]
    hq: int
    hkv: int
    head_dim: int
    page_size: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    granularity: str | None
    scale_form: str  # tensor | float | trailing1 | strided | none (K unscaled)
    sinks: str  # none | normal | neginf
    window_left: int
    num_splits: int | None
    max_seq_len: str  # none | exact | capacity
    checked: bool | None
    views: bool  # strided q / K / V / out views
    extra_cols: int  # unowned block-table columns beyond the longest sequence's
    block_n: int | None
    q_mag: float
    seed: int
    overrides: dict = field(default_factory=dict)


@st.composite
def draws(draw, *, checked_modes=(None, True, False)):
    # hypothesis shrinks towards the first choice: the richer cases come first
    batch = draw(st.sampled_from([2, 3, 1, 0]))
    page_size = draw(st.sampled_from([16, 4, 8]))
    lens = draw(st.lists(st.integers(1, 40), min_size=batch, max_size=batch))
    hkv = draw(st.sampled_from([2, 1]))
    group = draw(st.sampled_from([2, 4, 1]))
    kv, granularity = draw(st.sampled_from(KV_CHOICES))
    q_dtype = kv if granularity is None else draw(st.sampled_from([BF16, FP16]))
    scale_form = "tensor"
    if granularity == "per_tensor":
        scale_form = draw(st.sampled_from(["float", "tensor", "none"]))
    elif granularity == "per_token":
        scale_form = draw(st.sampled_from(["strided", "trailing1", "tensor", "none"]))
    longest = max(lens, default=1)
    window = draw(st.sampled_from([-1, "drawn", 0, 2**40]))
    if window == "drawn":
        window = draw(st.integers(1, longest + 4))
    return Draw(
        lens=lens, hq=hkv * group, hkv=hkv, head_dim=draw(st.sampled_from([64, 128, 64])),
        page_size=page_size, q_dtype=q_dtype, kv_dtype=kv,
        granularity=granularity, scale_form=scale_form,
        sinks=draw(st.sampled_from(["normal", "neginf", "none"])),
        window_left=window,
        num_splits=draw(st.sampled_from([3, None, 1, 2, 5])),
        max_seq_len=draw(st.sampled_from(["none", "exact", "capacity"])),
        checked=draw(st.sampled_from(checked_modes)),
        views=draw(st.booleans()), extra_cols=draw(st.sampled_from([1, 0])),
        block_n=draw(st.sampled_from([16, None])), q_mag=draw(st.sampled_from([1.0, 30.0, 1e-3])),
        seed=draw(st.integers(0, 2**16)),
    )


def build(d: Draw, *, poison: bool = True) -> dict:
    """The call's arguments: a valid call for ``d`` (poisoned unowned slots: any read past a
    length or outside the owned pages shows as NaN)."""
    case = make_decode_case(d.lens, hq=d.hq, hkv=d.hkv, head_dim=d.head_dim,
                            page_size=d.page_size, q_dtype=d.q_dtype, seed=d.seed)
    kv = case.pack(d.kv_dtype, d.granularity, poison=poison)
    q = (case.q.float() * d.q_mag).to(d.q_dtype)
    k_cache, v_cache, bt = kv.k_cache, kv.v_cache, kv.block_tables
    if d.extra_cols:  # more columns than any sequence needs: they point at the poison page
        pad = torch.full((bt.shape[0], d.extra_cols), kv.k_cache.shape[0] - 1,
                         dtype=bt.dtype, device=bt.device)
        bt = torch.cat([bt, pad], dim=1)
    k_scale, v_scale = kv.k_scale, kv.v_scale
    if d.scale_form == "float":
        k_scale, v_scale = float(k_scale), float(v_scale)
    elif d.scale_form == "none":  # K's stored values taken as they are (scale 1); not V's:
        k_scale = None  # codes up to 448 would cancel far below the tolerance's output scale
    elif d.scale_form == "trailing1":
        k_scale, v_scale = k_scale[..., None], v_scale[..., None]
    elif d.scale_form == "strided":
        k_scale, v_scale = (torch.stack([s, torch.full_like(s, math.nan)], -1)[..., 0]
                            for s in (k_scale, v_scale))
    out = None
    if d.views:  # q from a wider fused tensor, K/V as halves of one cache, out preallocated
        wide = torch.full((q.shape[0], d.hq + 3, d.head_dim), math.nan, dtype=q.dtype,
                          device=q.device)
        wide[:, : d.hq] = q
        q = wide[:, : d.hq]
        fused = torch.stack([k_cache, v_cache], dim=1)
        k_cache, v_cache = fused[:, 0], fused[:, 1]
        out = torch.full_like(case.q, math.nan)
    sinks = None
    if d.sinks == "normal":
        sinks = case.sinks
    elif d.sinks == "neginf":
        sinks = case.sinks.clone()
        sinks[::2] = -math.inf
    capacity = bt.shape[1] * d.page_size
    max_seq_len = {"none": None, "exact": max(d.lens, default=1),
                   "capacity": capacity}[d.max_seq_len] if capacity else None
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=bt, seq_lens=kv.seq_lens,
                k_scale=k_scale, v_scale=v_scale, sinks=sinks, window_left=d.window_left,
                num_splits=d.num_splits, max_seq_len=max_seq_len, checked=d.checked, out=out,
                launch=DecodeLaunch(block_n=d.block_n))
    args.update(d.overrides)
    return args


def call(args: dict) -> torch.Tensor:
    a = dict(args)
    return paged_decode_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"),
                                  a.pop("block_tables"), a.pop("seq_lens"), **a)


def reference(args: dict, *, clamp: bool = False) -> torch.Tensor:
    """The float64 reference of a call; ``clamp``: on the table the kernel clamps to."""
    bt, lens = args["block_tables"], args["seq_lens"]
    if clamp:
        lens = lens.clamp(0, bt.shape[1] * args["k_cache"].shape[1])
        bt = bt.clamp(0, args["k_cache"].shape[0] - 1)
    q = args["q"]
    return paged_decode_attention_ref(
        q.contiguous(), args["k_cache"], args["v_cache"], bt, lens, k_scale=args["k_scale"],
        v_scale=args["v_scale"], sinks=args["sinks"], sm_scale=args.get("sm_scale"),
        window_left=args["window_left"])


def checks_data(args: dict) -> bool:
    """Whether the launcher runs its data checks for these arguments."""
    checked = args["checked"]
    return checked if isinstance(checked, bool) else args["max_seq_len"] is None


def check_output(out: torch.Tensor, args: dict, what: str, *, clamp: bool = False) -> None:
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype, what
    if args.get("out") is not None:
        assert out is args["out"], f"{what}: not written into out"
    assert_matches_reference(out, reference(args, clamp=clamp), what)


# ======================================================================================
# Valid draws match the reference
# ======================================================================================

# Found on the H200: fnuz KV with a float (or no) scale did not compile there (the cache was
# the unused scale pointer, and Triton has no fnuz pointer on NVIDIA GPUs).
FNUZ_FLOAT_SCALE = Draw(
    lens=[1, 1], hq=4, hkv=2, head_dim=64, page_size=16, q_dtype=BF16,
    kv_dtype=E4M3FNUZ or E4M3, granularity="per_tensor", scale_form="float", sinks="normal",
    window_left=-1, num_splits=3, max_seq_len="none", checked=None, views=False, extra_cols=1,
    block_n=16, q_mag=1.0, seed=0)


@property_settings(cpu_examples=40)
@given(d=draws())
@example(d=FNUZ_FLOAT_SCALE)
@example(d=replace(FNUZ_FLOAT_SCALE, scale_form="none"))
def test_valid_draws_match_reference(d):
    args = build(d)
    with raises_naming(None):
        out = call(args)
    check_output(out, args, f"valid draw {d}")


# ======================================================================================
# Lying lengths and page ids in unchecked mode: clamped in the kernel, never a fault
# ======================================================================================

@st.composite
def lies(draw):
    """An unchecked call (checked=False, or max_seq_len given) whose lengths or page ids lie."""
    d = draw(draws(checked_modes=(False, None)).filter(lambda d: d.lens))
    if d.checked is None and d.max_seq_len == "none":
        d = replace(d, max_seq_len="capacity")
    kind = draw(st.sampled_from(["past_capacity", "page_out_of_range", "page_negative",
                                 "both", "short"]))
    return d, kind, draw(st.integers(0, len(d.lens) - 1)), draw(st.integers(1, 2**31 - 1))


@property_settings(cpu_examples=20)
@given(lie=lies())
def test_unchecked_lies_are_clamped_never_a_fault(lie):
    d, kind, b, big = lie
    args = build(d, poison=False)  # clamped pages may be any page: keep every slot finite
    lens, bt = args["seq_lens"].clone(), args["block_tables"].clone()
    num_pages = args["k_cache"].shape[0]
    if kind in ("past_capacity", "both"):
        lens[b] = bt.shape[1] * d.page_size + big % 1000 + 1 if big % 3 else 2**31 - 1
    if kind in ("page_out_of_range", "both"):
        bt[b, 0] = num_pages + big % 1000 if big % 3 else 2**31 - 1
    if kind == "page_negative":
        bt[b, 0] = -(big % 1000) - 1 if big % 3 else -(2**31)
    if kind == "short":  # length 0 or negative: no tokens read, the output is not specified
        lens[b] = -(big % 5)
    args.update(seq_lens=lens, block_tables=bt)
    with raises_naming(None):
        out = call(args)
    if kind == "short":
        assert out.shape == args["q"].shape
    else:
        check_output(out, args, f"lie {kind} in {d}", clamp=True)


# ======================================================================================
# Broken arguments raise errors that name them
# ======================================================================================

def touches(*names):
    """Host mutations declare the arguments they replace: one draw breaks each at most once
    (two mutations of one argument would not compose)."""
    def mark(mutate):
        mutate.touches = frozenset(names)
        return mutate
    return mark


def replaced(label: str, name: str, make, exc: type, *names: str):
    """A host mutation that replaces one argument: args[name] = make(args[name]), an ``exc``
    naming ``names`` (default: the argument)."""
    @touches(name)
    def mutate(args, e, r):
        args[name] = make(args[name])
        e.add(exc, *(names or (name,)))
    mutate.__name__ = f"_{label}"
    return mutate


def _on_meta(name: str):
    return replaced(f"{name}_on_meta", name, lambda t: t.to("meta"), ValueError,
                    *(Q_NAMES if name == "q" else (name,)))


ONE_ARGUMENT = [
    replaced("fp8_query", "q", lambda q: q.float().to(torch.float8_e4m3fn), NotImplementedError,
             "query q"),
    replaced("q_float32", "q", lambda q: q.float(), TypeError, "query q"),
    replaced("q_2d", "q", lambda q: q.flatten(1), ValueError, *Q_NAMES),
    replaced("table_int64", "block_tables", lambda t: t.long(), TypeError),
    replaced("lens_int64", "seq_lens", lambda t: t.long(), TypeError),
    replaced("lens_as_list", "seq_lens", lambda t: t.tolist(), TypeError),
    replaced("v_shape_differs", "v_cache", lambda v: torch.cat([v, v[:1]]), ValueError),
    *(_on_meta(name) for name in ("q", "k_cache", "v_cache", "block_tables", "seq_lens")),
]


@touches("k_cache", "v_cache")
def _cache_3d(args, e, r):
    args["k_cache"] = args["k_cache"].flatten(0, 1)
    e.add(ValueError, "k_cache")


@touches("k_cache", "v_cache", "k_scale", "v_scale")
def _kv_float32(args, e, r):
    args["k_cache"] = args["k_cache"].float()
    args["v_cache"] = args["v_cache"].float()
    e.add(NotImplementedError, "k_cache")


@touches("v_cache")
def _v_dtype_differs(args, e, r):
    args["v_cache"] = args["v_cache"].view(torch.uint8) if args["v_cache"].element_size() == 1 \
        else args["v_cache"].float()
    e.add(TypeError, "v_cache")


@touches("k_cache", "v_cache", "k_scale", "v_scale")
def _16bit_kv_other_dtype(args, e, r):
    other = FP16 if args["q"].dtype == BF16 else BF16
    args["k_cache"] = args["k_cache"].float().nan_to_num(0.0).to(other)
    args["v_cache"] = args["k_cache"].clone()
    args["k_scale"] = args["v_scale"] = None
    e.add(TypeError, "k_cache")


@touches("q", "k_cache", "v_cache")
def _head_dim_32(args, e, r):
    args["q"] = args["q"][..., :32]
    args["k_cache"] = args["k_cache"][..., :32]
    args["v_cache"] = args["v_cache"][..., :32]
    e.add(ValueError, *Q_NAMES)


@touches("k_cache", "v_cache")
def _kv_head_dim_differs(args, e, r):
    args["k_cache"] = torch.cat([args["k_cache"]] * 2, dim=-1)
    args["v_cache"] = torch.cat([args["v_cache"]] * 2, dim=-1)
    e.add(ValueError, "k_cache")


@touches("k_cache", "v_cache")
def _no_pages(args, e, r):
    args["k_cache"], args["v_cache"] = args["k_cache"][:0], args["v_cache"][:0]
    e.add(ValueError, "k_cache")


@touches("q")
def _hq_not_multiple(args, e, r):
    hkv = args["k_cache"].shape[2]
    if hkv == 1:
        args["q"] = args["q"][:, :0]  # Hq 0
    else:
        args["q"] = args["q"][:, :1]
    e.add(ValueError, *Q_NAMES)


@touches("q")
def _q_last_dim_strided(args, e, r):
    q = args["q"]
    args["q"] = torch.stack([q, q], -1)[..., 0]
    e.add(ValueError, *Q_NAMES)


@touches("block_tables")
def _table_rows(args, e, r):
    bt = args["block_tables"]
    args["block_tables"] = torch.cat([bt, bt.new_zeros(1, bt.shape[1])])
    e.add(ValueError, "block_tables")


@touches("block_tables")
def _table_strided_pages(args, e, r):
    bt = args["block_tables"]
    bt = torch.cat([bt, bt.new_zeros(bt.shape[0], 2)], dim=1)  # >= 2 columns, every other one
    args["block_tables"] = torch.stack([bt, bt], -1)[..., 0]
    e.add(ValueError, "block_tables")


@touches("seq_lens")
def _lens_shape(args, e, r):
    lens = args["seq_lens"]
    args["seq_lens"] = torch.cat([lens, lens.new_ones(1)])
    e.add(ValueError, "seq_lens")


@touches("seq_lens")
def _lens_strided(args, e, r):
    lens = args["seq_lens"]
    if lens.shape[0] < 2:
        args["seq_lens"] = lens[:, None].expand(-1, 2)  # 2-D
    else:
        args["seq_lens"] = torch.stack([lens, lens], -1)[:, 0]
    e.add(ValueError, "seq_lens")


@touches("sinks")
def _sinks_bad(args, e, r):
    hq = args["q"].shape[1]
    kind = r.choice(["shape", "int", "list", "float"])
    if kind == "shape":
        args["sinks"] = torch.zeros(hq + 1, device=args["q"].device)
        e.add(ValueError, "sinks")
    elif kind == "int":
        args["sinks"] = torch.zeros(hq, dtype=torch.int32, device=args["q"].device)
        e.add(TypeError, "sinks")
    elif kind == "list":
        args["sinks"] = [0.0] * hq
        e.add(TypeError, "sinks")
    else:
        args["sinks"] = 0.5
        e.add(TypeError, "sinks")


SCALAR_BAD = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e39, 10**400]


def _scale_tensor_bad(name):
    def mutate(args, e, r):
        cache = args["k_cache"]
        kind = r.choice(["float64", "shape", "meta"])
        if kind == "float64":
            args[name] = torch.ones(1, dtype=torch.float64, device=cache.device)
            e.add(TypeError, name)
        elif kind == "shape":
            args[name] = torch.ones(cache.shape[0] + 1, cache.shape[1], cache.shape[2],
                                    device=cache.device)
            e.add(ValueError, name)
        else:
            args[name] = torch.ones(1, device="meta")
            e.add(ValueError, name)
    mutate.__name__ = f"_{name}_tensor"
    return touches(name)(mutate)


@touches("max_seq_len")
def _max_seq_len(args, e, r):
    capacity = args["block_tables"].shape[1] * args["k_cache"].shape[1]
    args["max_seq_len"] = r.choice([0, -5, True, 7.0, capacity + 1, capacity + 10**6])
    e.add(ValueError, "max_seq_len")


@touches("out")
def _out(args, e, r):
    q = args["q"]
    kind = r.choice(["dtype", "shape", "meta", "strided", "list"])
    if kind == "dtype":
        args["out"] = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    elif kind == "shape":
        args["out"] = torch.empty(q.shape[0] + 1, *q.shape[1:], dtype=q.dtype, device=q.device)
    elif kind == "meta":
        args["out"] = torch.empty(q.shape, dtype=q.dtype, device="meta")
    elif kind == "strided":
        args["out"] = torch.empty(*q.shape, 2, dtype=q.dtype, device=q.device)[..., 0]
    else:
        args["out"] = [[0.0]]
        e.add(TypeError, "out")
        return
    e.add(ValueError, "out")


def chosen(name: str, values, *, type_errors=()):
    """A host mutation that sets ``name`` to one of ``values``: a TypeError naming it for a
    value of one of the ``type_errors`` types, else a ValueError."""
    @touches(name)
    def mutate(args, e, r):
        value = r.choice(values)
        args[name] = value
        e.add(TypeError if isinstance(value, type_errors) else ValueError, name)
    mutate.__name__ = f"_{name}_chosen"
    return mutate


SCALARS = dict(values=SCALAR_BAD + [True, "2", [1.0]], type_errors=(bool, str, list))
CHOSEN = [
    chosen("k_scale", **SCALARS), chosen("v_scale", **SCALARS), chosen("sm_scale", **SCALARS),
    chosen("window_left", [-2, -(2**40), 1.5, True, "8", None]),
    chosen("num_splits", [0, -1, MAX_SPLITS + 1, True, 2.0, "2"]),
    chosen("checked", ["yes", 1, 0, 0.0], type_errors=object),
    chosen("launch", [{"block_n": 16}, None, 16], type_errors=object),
]
HOST_MUTATIONS = [
    *ONE_ARGUMENT, _kv_float32, _v_dtype_differs, _16bit_kv_other_dtype, _cache_3d, _head_dim_32,
    _kv_head_dim_differs, _no_pages, _hq_not_multiple, _q_last_dim_strided, _table_rows,
    _table_strided_pages, _lens_shape, _lens_strided, _sinks_bad, _scale_tensor_bad("k_scale"),
    _scale_tensor_bad("v_scale"), _max_seq_len, _out, *CHOSEN,
]


# Data errors: raised by the checked mode only (``checks_data``); each returns whether the
# draw still has something to break.
def one_value(label: str, name: str, values, *, row_only: bool = False):
    """A data mutation: one element of tensor argument ``name`` (of the first column, when
    ``row_only``: an entry the sequence owns) set to one of ``values(args)``."""
    def mutate(args, r) -> str | None:
        t = args[name]
        if t is None or not args["q"].shape[0]:
            return None
        t = t.clone()
        index = (r.randrange(t.shape[0]), 0) if row_only else r.randrange(t.shape[0])
        t[index] = r.choice(values(args))
        args[name] = t
        return name
    mutate.__name__ = f"_{label}"
    return mutate


def _capacity(args) -> int:
    return args["block_tables"].shape[1] * args["k_cache"].shape[1]


def _scale_values(args, r) -> str | None:
    name = r.choice(["k_scale", "v_scale"])
    scale = args[name]
    if not torch.is_tensor(scale) or not args["q"].shape[0]:
        return None
    value = r.choice([math.nan, math.inf, 0.0, -1.0])
    if scale.numel() == 1:
        args[name] = torch.full_like(scale, value)
    else:  # the first token of the first sequence: a slot that sequence owns
        scale = scale.clone()
        page = int(args["block_tables"][0, 0])
        scale[page, 0] = value
        args[name] = scale
    return name


def _max_seq_len_short(args, r) -> str | None:
    lens = args["seq_lens"]
    if not lens.numel() or int(lens.max()) < 2:
        return None
    args["max_seq_len"] = int(lens.max()) - 1
    return "seq_lens"


DATA_MUTATIONS = [
    one_value("len_past_capacity", "seq_lens", lambda a: [_capacity(a) + 1, 2**31 - 1]),
    one_value("len_not_positive", "seq_lens", lambda a: [0, -1, -(2**31)]),
    one_value("page_outside", "block_tables",
              lambda a: [-1, a["k_cache"].shape[0], 2**31 - 1], row_only=True),
    one_value("sinks_nan", "sinks", lambda a: [math.nan, math.inf]),
    _scale_values, _max_seq_len_short,
]


def _run_broken(d: Draw, host, data, r) -> None:
    """Apply the mutations to a valid call of ``d`` and check the launcher's answer."""
    args = build(d)
    host_errors, data_errors = Expect(), Expect()
    for mutate in data:  # first: they need the valid tensors
        name = mutate(args, r)
        if name is not None:
            data_errors.add(ValueError, name)
    for mutate in host:
        mutate(args, host_errors, r)
    if not host_errors.valid:
        expected = host_errors.errors
    elif not data_errors.valid and args["q"].shape[0] and checks_data(args):
        expected = data_errors.errors
    else:
        expected = None
    what = f"{[m.__name__ for m in host + data]} on {d}"
    with raises_naming(expected):
        out = call(args)
    if expected is None and data_errors.valid:
        check_output(out, args, what)


RANDOMS = st.randoms(use_true_random=False)


@pytest.mark.parametrize("mutate", HOST_MUTATIONS, ids=lambda m: m.__name__.strip("_"))
@property_settings(cpu_examples=3)
@given(d=draws(), r=RANDOMS)
def test_broken_argument_raises_error_naming_it(mutate, d, r):
    _run_broken(d, [mutate], [], r)


@pytest.mark.parametrize("mutate", DATA_MUTATIONS, ids=lambda m: m.__name__.strip("_"))
@property_settings(cpu_examples=6)
@given(d=draws(), r=RANDOMS)
def test_bad_value_raises_in_checked_mode_only(mutate, d, r):
    """Lengths past the table, page ids outside the cache, NaN/+inf sinks, bad scale values:
    a ValueError naming them when the data is checked, accepted (no fault) otherwise."""
    _run_broken(d, [], [mutate], r)


@property_settings(cpu_examples=40)
@given(d=draws(), first=st.sampled_from(HOST_MUTATIONS), second=st.sampled_from(HOST_MUTATIONS),
       r=RANDOMS)
def test_two_broken_arguments_raise_an_error_naming_one(d, first, second, r):
    host = [first] if first.touches & second.touches else [first, second]
    _run_broken(d, host, [], r)
