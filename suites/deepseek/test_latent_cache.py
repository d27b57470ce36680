"""DeepSeek latent KV cache (issue 12, item 1): the lab's, V3.2's and V4's byte layouts,
the fused kv_norm + RoPE + FP8 quantise + paged write kernel and the gather / dequantise
kernel, each against its torch reference written from the layout description.

Bit for bit: the whole cache (written rows, footers, pad bytes and the poisoned bytes
nobody may touch) equals the reference's after the same writes, on ragged batches over
shuffled page tables, any block size. Accuracy (the lab's list): round-trip cosine >= 0.99
per layout against the float32 norm + RoPE, RoPE at the stored positions (a position off by
one fails), NaN poisoning, the byte counts. Speed on the GPU only (kv_bench).
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.device import default_device
from kvperf_kernels.latent.gather import latent_gather, latent_gather_ref
from kvperf_kernels.latent.layouts import LAYOUTS, MODEL1, V32, alloc_cache
from kvperf_kernels.latent.norm_rope import (
    kv_norm_rope_ref,
    mean_square_ref,
    rms_norm_ref,
    rope_cos_sin_cache,
    rope_ref,
)
from kvperf_kernels.latent.sparse_mla import sparse_mla_decode
from kvperf_kernels.latent.write import (
    WRITE_SWEEP,
    WriteLaunch,
    cache_views,
    latent_write,
    latent_write_ref,
    quantize_latent_ref,
)
from kvperf_kernels.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4, quantize_nvfp4_ref
from kvperf_kernels.testing.compare import same_bytes
from kvperf_kernels.testing.latent import POISON, make_latent_batch
from kvperf_kernels.testing.params import BF16, FP16, FP32, dtype_id

GPU = pytest.mark.gpu
NAMES = list(LAYOUTS)
LAB_COSINE_MIN = 0.99
# ragged batch: (cached tokens, new tokens) per sequence
RAGGED = ([0, 5, 30], [2, 1, 6])  # crosses block boundaries at block sizes 1, 4, 16


def _write_both(batch, cache=None):
    """(kernel cache, reference cache) after writing the batch into two poisoned caches."""
    ours = batch.new_cache() if cache is None else cache.clone()
    ref = ours.clone()
    latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, ours,
                 layout=batch.layout, block_size=batch.block_size)
    latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, ref,
                     layout=batch.layout, block_size=batch.block_size)
    return ours, ref


# ======================================================================================
# Layouts: byte counts and offsets, computed by hand from the public descriptions
# ======================================================================================

@pytest.mark.parametrize(("name", "per_token", "block_size", "block_bytes"), [
    ("lab", 516, 256, 256 * 516),
    ("v32", 656, 64, 65 * 656),  # one spare row per block, as FlashMLA allocates
    ("model1", 584, 64, 37440),  # 64 * 584 = 37,376 rounded up to 65 * 576
    ("model1", 584, 1, 1152),  # 584 -> 2 * 576
    ("model1", 584, 256, 149760),  # 256 * 584 = 149,504 -> 260 * 576
])
def test_layout_bytes(name, per_token, block_size, block_bytes, kvperf):
    layout = LAYOUTS[name]
    assert layout.bytes_per_token == per_token
    assert layout.block_bytes(block_size) == block_bytes
    assert alloc_cache(layout, 3, block_size).shape == (3, block_bytes)
    kvperf.info("bytes_per_token", per_token)


def test_model1_footer_offsets_by_hand(checks_device):
    """One token at slot 6 of a block-4 model1 cache: block 1, offset 2. A block is
    4 x 584 = 2,336 bytes rounded up to 5 x 576 = 2,880; the token's row starts at
    2,880 + 2 x 576, its footer at 2,880 + 4 x 576 + 2 x 8."""
    block_bytes = MODEL1.block_bytes(4)
    assert block_bytes == 2880  # 4 * 584 = 2336 -> 5 * 576
    batch = make_latent_batch("model1", [6], [1], 4, device=checks_device, seed=3)
    batch.slots[:] = 6
    cache, _ = _write_both(batch)
    fields = quantize_latent_ref(kv_norm_rope_ref(batch.x, batch.weight, batch.positions,
                                                  batch.cos_sin, MODEL1), MODEL1)
    flat = cache.view(-1).cpu()
    row, foot = 1 * 2880 + 2 * 576, 1 * 2880 + 4 * 576 + 2 * 8
    same_bytes(flat[row:row + 448], fields["fp8"][0].cpu(), "nope codes at the row")
    same_bytes(flat[row + 448:row + 576], fields["rope"][0].cpu().view(torch.uint8),
               "bf16 rope after the codes")
    same_bytes(flat[foot:foot + 7], fields["scale"][0].cpu(), "7 UE8M0 scales in the footer")
    assert flat[foot + 7].item() == 0, "pad byte"
    written = (flat != POISON).nonzero().flatten()
    assert written.min().item() >= row and written.max().item() < foot + 8


def test_v32_row_by_hand(checks_device):
    """v32 slot 5 of block size 2: block 2 (3 rows of 656 per block), offset 1."""
    batch = make_latent_batch("v32", [5], [1], 2, device=checks_device, seed=4)
    batch.slots[:] = 5
    cache, _ = _write_both(batch)
    fields = quantize_latent_ref(kv_norm_rope_ref(batch.x, batch.weight, batch.positions,
                                                  batch.cos_sin, V32), V32)
    row = 2 * 3 * 656 + 1 * 656
    flat = cache.view(-1).cpu()
    same_bytes(flat[row:row + 512], fields["fp8"][0].cpu(), "512 codes")
    scales = flat[row + 512:row + 528].view(torch.float32)
    assert torch.equal(scales, fields["scale"][0].cpu())
    # powers of two, at least 2^-13 (the 1e-4 floor)
    m, e = torch.frexp(scales)
    assert (m == 0.5).all() and (scales >= 2.0**-13).all()
    same_bytes(flat[row + 528:row + 656], fields["rope"][0].cpu().view(torch.uint8), "rope")


# ======================================================================================
# Write kernel vs reference: whole caches bit for bit
# ======================================================================================

@pytest.mark.parametrize(("block_size", "dtype"), [(1, BF16), (4, FP32), (16, BF16)],
                         ids=["block1-bf16", "block4-fp32", "block16-bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_write_matches_reference(name, block_size, dtype, checks_device):
    batch = make_latent_batch(name, *RAGGED, block_size, dtype=dtype, device=checks_device,
                              seed=block_size, drop_every=4)
    ours, ref = _write_both(batch)
    same_bytes(ours, ref, f"{name} cache after a ragged write")
    # every written token changed its bytes; padding tokens (slot -1) wrote nothing
    n_written = int((batch.slots >= 0).sum())
    assert int((ours != POISON).any(dim=-1).sum()) >= 1
    per_token = LAYOUTS[name].bytes_per_token
    assert int((ours != POISON).sum()) <= n_written * per_token


@GPU
@pytest.mark.parametrize("sweep", list(WRITE_SWEEP))
@pytest.mark.parametrize("name", NAMES)
def test_write_launches_store_the_same_bytes(name, sweep):
    """Every WriteLaunch the speed test times writes the reference's bytes (the interpreter
    ignores num_warps and pipelining: a GPU check; the reductions' order is fixed-point, so
    no warp split changes a bit). 700 tokens: each looping program writes several."""
    batch = make_latent_batch(name, [0, 3, 9], [300, 1, 399], 16, device=default_device(),
                              seed=17, drop_every=4)
    ours = batch.new_cache()
    ref = ours.clone()
    latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, ours,
                 layout=name, block_size=16, launch=WRITE_SWEEP[sweep])
    latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, ref,
                     layout=name, block_size=16)
    same_bytes(ours, ref, f"{name} write, {sweep}")


@pytest.mark.parametrize("name", NAMES)
def test_token_loop_matches_reference(name, checks_device):
    """Programs that loop over tokens (programs_per_sm; one program per SM multiple, one
    on the CPU) write the reference's bytes, skipped tokens (slot -1) included."""
    batch = make_latent_batch(name, *RAGGED, 4, device=checks_device, seed=18, drop_every=3)
    ours = batch.new_cache()
    ref = ours.clone()
    latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, ours,
                 layout=name, block_size=4, launch=WriteLaunch(programs_per_sm=2))
    latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, ref,
                     layout=name, block_size=4)
    same_bytes(ours, ref, f"{name} write, token loop")


def test_unwritten_slots_keep_their_bytes(checks_device):
    """A second batch writes other slots: the first batch's rows stay as they were."""
    first = make_latent_batch("model1", [0, 0], [9, 4], 8, device=checks_device, seed=11)
    cache, _ = _write_both(first)
    before = cache.clone()
    second = make_latent_batch("model1", [0, 0], [9, 4], 8, device=checks_device, seed=12)
    second.slots = torch.where(second.seq_ids == 1, second.slots, -1)
    ours, ref = _write_both(second, cache)
    same_bytes(ours, ref, "second write")
    got = latent_gather(ours, first.slots[first.seq_ids == 0], layout="model1", block_size=8,
                        out_dtype=FP32)
    want = latent_gather(before, first.slots[first.seq_ids == 0], layout="model1",
                         block_size=8, out_dtype=FP32)
    assert torch.equal(got, want)


def test_rms_norm_reference_is_rms_norm():
    """The fixed-point mean square is the plain float64 one to 2^-33; it does not depend on
    the order of the dims (a permuted row gives the permuted result, bit for bit)."""
    x = make_latent_batch("lab", [0], [16], 16, dtype=FP32, seed=5).x
    plain = (x.double() ** 2).mean(dim=-1)
    rel = ((mean_square_ref(x) - plain).abs() / plain).max().item()
    assert rel <= 2.0**-33, rel
    w = torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.5
    y = rms_norm_ref(x, w)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (512,), w, eps=1e-6),
                               rtol=2e-6, atol=1e-6)
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rms_norm_ref(x[:, perm], w[perm]), y[:, perm])


# largest |x| of a token around the float32 sum's bounds (2^-41, 2^63) and beyond (bf16);
# fp16's finite values all lie within them
NORM_SCALES = {BF16: [-46, -42, -41, -40, 0, 60, 62, 63, 64, 100], FP16: [-14, -8, 0, 8, 15]}


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=dtype_id)
def test_norm_paths_store_the_same_bytes(dtype, checks_device):
    """A 16-bit token whose largest |x| lies in [2^-41, 2^63) is normalised through float32
    squares, any other through float64 ones (rstd_from_parts); both are the reference's
    one fixed-point integer, so every token below, each scaled by a power of two around
    those bounds, one with a value 2^-30 of its largest beside it, stores the reference's
    bytes."""
    scales = NORM_SCALES[dtype]
    batch = make_latent_batch("model1", [0], [len(scales)], 16, dtype=FP32,
                              device=checks_device, seed=17)
    big = batch.x.abs().amax(dim=-1, keepdim=True)
    x = batch.x / big  # largest |x| 1 in every token
    x[:, 7] = 2.0**-30 * torch.sign(x[:, 7])  # a small square, truncated by the sum or not
    e = torch.tensor(scales, dtype=FP32, device=x.device)
    batch.x = (x * torch.exp2(e)[:, None]).to(dtype)
    ours, ref = _write_both(batch)
    same_bytes(ours, ref, f"{dtype} tokens of largest |x| 2^{scales}")


def test_float32_squares_are_wrong_beyond_the_bound():
    """The negative control of the bound: at 2^64 a bf16 value's float32 square is Inf,
    so the float32 sum would poison a finite token; at 2^62 it is exact."""
    for e, finite in ((62, True), (64, False)):
        x = torch.tensor([1.5 * 2.0**e], dtype=BF16).float()
        assert bool(torch.isfinite(x * x)) is finite, e
        if finite:
            assert (x.double() ** 2).item() == (x * x).double().item()


def test_rope_reference_is_a_rotation():
    """GPT-J pairs rotate by pos * base^(-2i/64): position 0 is the identity, each pair
    keeps its norm, and two rotations compose (p then q = p + q) within float32."""
    cs = rope_cos_sin_cache(64)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(rope_ref(x, torch.zeros(3, dtype=torch.long), cs), x)
    y = rope_ref(x, torch.tensor([5, 17, 40]), cs)
    pair_norm = lambda t: t[:, 0::2] ** 2 + t[:, 1::2] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-6, atol=1e-6)
    twice = rope_ref(rope_ref(x, torch.tensor([2, 7, 20]), cs), torch.tensor([3, 10, 20]), cs)
    torch.testing.assert_close(twice, y, rtol=1e-5, atol=1e-5)


# ======================================================================================
# Gather / dequantise
# ======================================================================================

@pytest.mark.parametrize("out_dtype", [BF16, FP32], ids=dtype_id)
@pytest.mark.parametrize("name", NAMES)
def test_gather_matches_reference(name, out_dtype, checks_device):
    batch = make_latent_batch(name, *RAGGED, 16, device=checks_device, seed=21)
    cache, _ = _write_both(batch)
    slots = batch.slots.clone()
    slots[1] = -1  # a padded index: zeros
    got = latent_gather(cache, slots, layout=name, block_size=16, out_dtype=out_dtype)
    ref = latent_gather_ref(cache, slots, layout=name, block_size=16, out_dtype=out_dtype)
    assert got.shape == (len(slots), LAYOUTS[name].d_in) and got.dtype == out_dtype
    same_bytes(got, ref, f"{name} gather -> {out_dtype}")
    assert torch.equal(got[1].float(), torch.zeros(LAYOUTS[name].d_in, device=checks_device))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("out_dtype", [BF16, FP32], ids=dtype_id)
@pytest.mark.parametrize("name", NAMES)
def test_negative_zero_codes_keep_their_sign(name, out_dtype, checks_device):
    """E4M3 code 0x80 is -0 (what the encoders store for a tiny negative value): it reads
    back as -0 on every cast path, as the hardware conversion and torch's float8_e4m3fn
    give it. Triton 3.6 builds a float's -x as 0 - x, so the integer decoder's negation
    made it +0 (0x00 against the hardware's 0x80 on the H200)."""
    layout = LAYOUTS[name]
    cache = alloc_cache(layout, 1, 4, checks_device)
    views = cache_views(cache, layout, 4)
    codes = torch.tensor([0x80, 0x00, 0x38, 0xB8], dtype=torch.uint8)  # -0, +0, 1, -1
    views["fp8"][0, :2] = codes.repeat(layout.d_fp8 // 4).to(checks_device)
    views["scale"][0, :2] = 127 if layout.scale_kind == "ue8m0" else 1.0
    if "rope" in views:  # bf16 -0 and +0 pairs: stored bits, copied as they are
        views["rope"][0, :2] = torch.tensor([-0.0, 0.0] * 32, dtype=BF16).to(checks_device)
    slots = torch.tensor([0, 1], device=checks_device)
    ref = latent_gather_ref(cache, slots, layout=name, block_size=4, out_dtype=out_dtype)
    # the reference's signs are the codes' sign bits (-0 included), its zeros where 0 is coded
    negative = torch.zeros(layout.d_in, dtype=torch.bool)
    negative[:layout.d_fp8] = (codes >= 0x80).repeat(layout.d_fp8 // 4)
    zero = torch.ones(layout.d_in, dtype=torch.bool)
    zero[:layout.d_fp8] = (codes & 0x7F == 0).repeat(layout.d_fp8 // 4)
    if "rope" in views:
        negative[layout.rope_in::2] = True
    assert torch.equal(torch.signbit(ref), negative.to(checks_device).expand(2, -1))
    assert torch.equal(ref == 0, zero.to(checks_device).expand(2, -1))
    for hw in (False, None):  # the integer decoder, and the default (hardware on an FP8 GPU)
        got = latent_gather(cache, slots, layout=name, block_size=4, out_dtype=out_dtype,
                            hw_cast=hw)
        same_bytes(got, ref, f"{name} gather of -0 codes (hw_cast={hw})")


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_accuracy(name, checks_device, kvperf):
    """The lab's FP8 bar: dequantised tokens vs the float32 kv_norm + RoPE, cosine >= 0.99;
    the power-of-two layouts also within half an E4M3 step of each value."""
    batch = make_latent_batch(name, [0, 100], [10, 6], 64, device=checks_device, seed=31)
    cache, _ = _write_both(batch)
    want = kv_norm_rope_ref(batch.x, batch.weight, batch.positions, batch.cos_sin,
                            batch.layout)
    got = latent_gather(cache, batch.slots, layout=name, block_size=64, out_dtype=FP32)
    m = kvperf.errors(got, want, prefix="roundtrip_")
    assert m["cosine"] >= LAB_COSINE_MIN, f"{name}: cosine {m['cosine']:.5f}"
    d = batch.layout.d_fp8
    err = (got[:, :d] - want[:, :d]).abs()
    # RNE to 3 mantissa bits: 2^-4 relative, or 2^-10 of the scale (subnormal E4M3)
    amax = want[:, :d].abs().reshape(len(got), -1, batch.layout.tile).amax(-1)
    floor = (amax / 448.0 * 2.0 * 2.0**-10).repeat_interleave(batch.layout.tile, dim=-1)
    assert (err <= torch.maximum(want[:, :d].abs() * 2.0**-4, floor) * (1 + 1e-6)).all()
    kvperf.info("bytes_per_token", batch.layout.bytes_per_token)


def test_nvfp4_latent_roundtrip(checks_device, kvperf):
    """The lab's NVFP4 item: the normalised, RoPE'd latent through the project's NVFP4
    quantiser: cosine >= 0.98, 256 + 32 = 288 bytes per token (+ 4 per tensor) against the
    FP8 layouts' 516 / 656 / 584."""
    batch = make_latent_batch("lab", [0], [16], 16, dtype=FP32, device=checks_device,
                              seed=35)
    y = kv_norm_rope_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.layout)
    packed, scale, g = quantize_nvfp4(y)
    same_bytes(packed, quantize_nvfp4_ref(y)[0], "NVFP4 codes")
    got = dequantize_nvfp4(packed, scale, g)
    m = kvperf.errors(got, y, prefix="nvfp4_")
    assert m["cosine"] >= 0.98, m
    per_token = (packed.numel() + scale.numel()) // len(y)
    assert per_token == 288
    kvperf.info("nvfp4_bytes_per_token", per_token)


@pytest.mark.parametrize("name", NAMES)
def test_rope_at_stored_positions(name, checks_device, kvperf):
    """The RoPE dims read back are the normalised dims rotated at each token's own
    position: within storage rounding at the true positions, 5x further off at position + 1."""
    batch = make_latent_batch(name, [3, 50], [6, 6], 16, device=checks_device, seed=41)
    cache, _ = _write_both(batch)
    got = latent_gather(cache, batch.slots, layout=name, block_size=16, out_dtype=FP32)
    r = batch.layout.rope_in
    rope = got[:, r:r + 64].double()
    err = {}
    for shift in (0, 1):
        want = kv_norm_rope_ref(batch.x, batch.weight, batch.positions + shift,
                                batch.cos_sin, batch.layout)[:, r:r + 64].double()
        err[shift] = ((rope - want).norm() / want.norm()).item()
    bound = 0.035 if batch.layout.rope_fp8 else 2.0**-8  # E4M3 rms / bf16 half-ulp
    kvperf.error("rope_rel_l2", err[0])
    assert err[0] <= bound, f"{name}: RoPE at the stored positions: rel err {err[0]:.3g}"
    # the control: one position off moves the high-frequency pairs a lot, the low ones
    # hardly (measured 0.20 against 0.028 (lab, FP8 RoPE dims) / 0.0016 (bf16))
    assert err[1] > max(5 * err[0], bound), f"{name}: off-by-one went unnoticed ({err[1]:.3g})"


@pytest.mark.parametrize("name", NAMES)
def test_nan_token_is_poisoned(name, checks_device):
    """A NaN in a token's normalised dims makes its FP8 part read back as NaN, never as
    finite values; its neighbours are untouched."""
    batch = make_latent_batch(name, [0], [3], 4, dtype=FP32, device=checks_device, seed=51)
    batch.x[1, 7] = float("nan")
    cache = batch.new_cache(0)
    latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, cache,
                 layout=name, block_size=4)
    got = latent_gather(cache, batch.slots, layout=name, block_size=4, out_dtype=FP32)
    d = batch.layout.d_fp8
    assert torch.isnan(got[1, :d]).all()
    assert torch.isfinite(got[[0, 2]]).all()


def test_unwritten_slot_reads_nan(checks_device):
    """Every byte of a fresh test cache is 0xFF: reading a slot nobody wrote gives NaN."""
    cache = alloc_cache("model1", 2, 4, checks_device, POISON)
    got = latent_gather(cache, torch.tensor([5], device=checks_device), layout="model1",
                        block_size=4, out_dtype=FP32)
    assert torch.isnan(got).all()


# ======================================================================================
# Error contract and empty batches
# ======================================================================================

def test_bad_input_is_refused(checks_device):
    b = make_latent_batch("v32", [0], [4], 4, device=checks_device, seed=61)
    cache = b.new_cache()

    def write(**over):
        a = dict(x=b.x, kv_norm_weight=b.weight, positions=b.positions, cos_sin=b.cos_sin,
                 slot_mapping=b.slots, cache=cache, layout="v32", block_size=4)
        a.update(over)
        return latent_write(**a)

    capacity = cache.shape[0] * 4
    with pytest.raises(ValueError, match=rf"slot_mapping: slots must be in \[-1, {capacity}\)"):
        write(slot_mapping=torch.full_like(b.slots, capacity))
    with pytest.raises(ValueError, match="slot_mapping: slots must be in"):
        write(slot_mapping=torch.full_like(b.slots, -2))
    with pytest.raises(TypeError, match="slot_mapping: unsupported dtype torch.float32"):
        write(slot_mapping=b.slots.float())
    with pytest.raises(ValueError, match="slot_mapping must have 4 entries"):
        write(slot_mapping=b.slots[:3])
    with pytest.raises(TypeError, match="x: unsupported dtype torch.float64"):
        write(x=b.x.double())
    with pytest.raises(ValueError, match=r"x: layout 'v32' takes \[T, 576\] latents"):
        write(x=b.x[:, :512])
    with pytest.raises(ValueError, match="x: last dim must be contiguous"):
        write(x=torch.zeros(576, 4, dtype=BF16, device=checks_device).t())
    with pytest.raises(ValueError, match=r"cache: layout 'v32' with block_size 4 has 3280"):
        write(cache=alloc_cache("model1", cache.shape[0], 4, checks_device))
    with pytest.raises(TypeError, match="cache: unsupported dtype"):
        write(cache=cache.view(torch.int8))
    with pytest.raises(ValueError, match="layout must be one of"):
        latent_write(b.x, b.weight, b.positions, b.cos_sin, b.slots, cache, layout="v4",
                     block_size=4)
    with pytest.raises(ValueError, match="positions must be in"):
        write(positions=b.positions + b.cos_sin.shape[0])
    with pytest.raises(ValueError, match="kv_norm_weight must be a contiguous"):
        write(kv_norm_weight=b.weight[:448])
    with pytest.raises(TypeError, match="cos_sin: unsupported dtype"):
        write(cos_sin=b.cos_sin.double())
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        latent_write(b.x, b.weight, b.positions, b.cos_sin, b.slots, cache, layout="v32",
                     block_size=0)
    with pytest.raises(TypeError, match="launch must be a WriteLaunch, got dict"):
        write(launch={"num_warps": 2})
    for bad in (3, 0, 8, 2.0, True):
        with pytest.raises(ValueError, match="WriteLaunch.num_warps must be"):
            WriteLaunch(num_warps=bad)
    for kw in ({"programs_per_sm": 0}, {"programs_per_sm": 1.5}, {"num_stages": 0}):
        with pytest.raises(ValueError, match=f"WriteLaunch.{next(iter(kw))} must be"):
            WriteLaunch(**kw)
    with pytest.raises(ValueError, match="slots: slots must be in"):
        latent_gather(cache, torch.tensor([capacity], device=checks_device), layout="v32",
                      block_size=4)
    with pytest.raises(TypeError, match="out_dtype: unsupported output dtype"):
        latent_gather(cache, b.slots, layout="v32", block_size=4, out_dtype=torch.int32)


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name, checks_device):
    b = make_latent_batch(name, [0], [0], 4, device=checks_device)
    cache = alloc_cache(name, 2, 4, checks_device)
    before = cache.clone()
    latent_write(b.x, b.weight, b.positions, b.cos_sin, b.slots, cache, layout=name,
                 block_size=4)
    assert torch.equal(cache, before)
    out = latent_gather(cache, b.slots, layout=name, block_size=4)
    assert out.shape == (0, LAYOUTS[name].d_in)


# ======================================================================================
# GPU: index overflow and speed
# ======================================================================================

@GPU
def test_large_cache_offsets():
    """Blocks beyond 2^31 bytes: a model1 cache of 2.3 GB, written, gathered and attended
    at its end."""
    bs = 64
    nb = 2**31 // MODEL1.block_bytes(bs) + 2
    batch = make_latent_batch("model1", [0], [bs], bs, device=default_device(), seed=71)
    batch.slots = torch.arange(bs, device=batch.x.device) + (nb - 1) * bs
    cache = torch.full((nb, MODEL1.block_bytes(bs)), POISON, dtype=torch.uint8,
                       device=batch.x.device)
    latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, cache,
                 layout="model1", block_size=bs)
    tail = cache[-2:].clone()
    ref = torch.full_like(tail, POISON)
    latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin,
                     batch.slots - (nb - 2) * bs, ref, layout="model1", block_size=bs)
    same_bytes(tail, ref, "last blocks of a > 2^31-byte cache")
    assert (cache[: nb - 2] == POISON).all()
    got = latent_gather(cache, batch.slots, layout="model1", block_size=bs, out_dtype=FP32)
    same_bytes(got, latent_gather_ref(ref, batch.slots - (nb - 2) * bs, layout="model1",
                                      block_size=bs), "gather past 2^31 bytes")
    # the decode kernel's offsets too: a one-hot selection of the last token is its row
    q = torch.randn(1, 16, 512, device=cache.device).bfloat16()
    idx = torch.full((1, 32), -1, dtype=torch.int64, device=cache.device)
    idx[0, 0] = batch.slots[-1]
    out, _ = sparse_mla_decode(q, cache, idx, layout="model1", block_size=bs)
    row = latent_gather(cache, batch.slots[-1:], layout="model1", block_size=bs)[0, :512]
    same_bytes(out[0], row.expand(16, 512), "one-hot decode past 2^31 bytes")


@GPU
@pytest.mark.fp8
@pytest.mark.parametrize("name", NAMES)
def test_hardware_and_integer_casts_agree(name):
    """On an FP8 GPU the kernels use the hardware E4M3 / bf16 conversions; the integer
    encoders (the interpreter's path) must give the same bytes on 8,192 tokens."""
    batch = make_latent_batch(name, [0, 100], [4096, 4096], 64, device=default_device(),
                              seed=75)
    caches = []
    for hw in (True, False):
        cache = batch.new_cache()
        latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots,
                     cache, layout=name, block_size=64, hw_cast=hw)
        caches.append(cache)
    same_bytes(caches[0], caches[1], f"{name}: hw vs integer casts")
    ref = batch.new_cache()
    latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, ref,
                     layout=name, block_size=64)
    same_bytes(caches[0], ref, f"{name}: 8K tokens vs reference")
    outs = [latent_gather(caches[0], batch.slots, layout=name, block_size=64, hw_cast=hw)
            for hw in (True, False)]
    same_bytes(outs[0], outs[1], f"{name}: gather hw vs integer casts")


SPEED_TOKENS = [16384, 131072]


@GPU
@pytest.mark.fp8
@pytest.mark.parametrize("tokens", SPEED_TOKENS)
@pytest.mark.parametrize("name", NAMES)
def test_write_speed(name, tokens, kv_bench, kvperf):
    """Fused write of a prefill chunk (bf16 in, block 64, shuffled pages). Bytes moved: the
    input rows, the stored bytes, slots and positions, and the cos/sin rows read."""
    batch = make_latent_batch(name, [0, 0], [tokens // 2, tokens // 2], 64,
                              device=default_device(), seed=81)
    cache = batch.new_cache()
    layout = batch.layout
    moved = tokens * (layout.d_in * 2 + layout.bytes_per_token + 8 + 8 + 64 * 4)
    res = kv_bench(latent_write, batch.x, batch.weight, batch.positions, batch.cos_sin,
                   batch.slots, cache, layout=name, block_size=64, checked=False,
                   bytes_moved=moved)
    ref = batch.new_cache()
    latent_write_ref(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, ref,
                     layout=name, block_size=64)
    same_bytes(res.value, ref, "timed write")  # what was timed is still correct
    copy = kv_bench(torch.Tensor.copy_, torch.empty_like(batch.x), batch.x, label="copy_x",
                    bytes_moved=2 * batch.x.numel() * 2)
    for label, launch in WRITE_SWEEP.items():  # the launch default's evidence, same run
        kv_bench(latent_write, batch.x, batch.weight, batch.positions, batch.cos_sin,
                 batch.slots, batch.new_cache(), layout=name, block_size=64, checked=False,
                 launch=launch, bytes_moved=moved, label=label)
    if res.frac_of_peak is not None:
        kvperf.info("frac_of_peak_copy_bw", round(res.frac_of_peak, 3))
        kvperf.info("issue_goal_frac_of_copy_bw", 0.8)
    if copy.gbps and res.gbps:
        kvperf.info("vs_torch_copy_of_x", round(res.gbps / copy.gbps, 3))


@GPU
@pytest.mark.fp8
@pytest.mark.parametrize("name", NAMES)
def test_gather_speed(name, kv_bench, kvperf):
    """Gather + dequantise 65,536 tokens at shuffled slots to bf16."""
    batch = make_latent_batch(name, [0, 0], [32768, 32768], 64, device=default_device(),
                              seed=91)
    cache = batch.new_cache()
    latent_write(batch.x, batch.weight, batch.positions, batch.cos_sin, batch.slots, cache,
                 layout=name, block_size=64)
    n = len(batch.slots)
    moved = n * (batch.layout.bytes_per_token + batch.layout.d_in * 2 + 8)
    out = torch.empty(n, batch.layout.d_in, dtype=BF16, device=cache.device)
    res = kv_bench(latent_gather, cache, batch.slots, layout=name, block_size=64, out=out,
                   checked=False, bytes_moved=moved)
    same_bytes(res.value, latent_gather_ref(cache, batch.slots, layout=name, block_size=64,
                                            out_dtype=BF16), "timed gather")
    if res.frac_of_peak is not None:
        kvperf.info("frac_of_peak_copy_bw", round(res.frac_of_peak, 3))
