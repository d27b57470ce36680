"""Decode attention from each compressed KV cache vs the float64 reference on the original.

K/V look like real ones (``realistic_kv``): keys with a few outlier channels x20, log-normal
token norms, and an attention-sink token whose values are near zero; queries are isotropic
at a stated temperature (logits q.k/sqrt(D) with std 2 per head, ``realistic_query``).

What is asserted, and why:
* roundtrip of K and V, every format: the lab's cosine floors (FP8 and MXFP8 >= 0.99,
  NVFP4 >= 0.98);
* attention output of the unfused dequantise-then-attend path, for the cache
  configurations that meet the lab's bars on this data at every context tested: K and V
  in FP8 per-token or 1x128-block (>= 0.99), and K in FP8 per-token with V in NVFP4
  (>= 0.98);
* the other configurations (FP8 per-tensor, MXFP8, NVFP4 keys) are measured and recorded
  (baselined with kvperf.errors) but held only to their roundtrip floors: their attention
  cosine falls below the lab's bars at long context on outlier keys (measured on the
  CPU reference: per-tensor ~0.986 and MXFP8 ~0.976 at 8K, NVFP4 keys 0.82-0.97), because
  a K error is multiplied by the logit's magnitude; ``test_nvfp4_keys_cost_more_than_values``
  asserts that finding so it cannot silently change.
Block scaling is shown to beat per-tensor scaling on this data (asserted). The speed of
dequantise-then-attend per format against BF16 attention is measured on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from kvperf_kernels.attention.compressed import (
    attend_compressed,
    attention_bytes,
    compress,
    decode_attention,
    decode_attention_ref,
    decompress,
    realistic_kv,
    realistic_query,
    worst_token_rel_error,
)
from kvperf_kernels.device import default_device
from pytest_kvperf import error_metrics

# Lab floors for the roundtrip cosine of one tensor: FP8 >= 0.99, NVFP4 >= 0.98.
ROUNDTRIP_MIN_COSINE = {
    "bf16": 0.9999,  # control: storage in BF16 only
    "fp8_per_tensor": 0.99,
    "fp8_per_token": 0.99,
    "fp8_per_block128": 0.99,
    "mxfp8": 0.99,
    "nvfp4": 0.98,
}
# cache configuration -> (K format, V format)
CONFIGS = {fmt: (fmt, fmt) for fmt in ROUNDTRIP_MIN_COSINE}
CONFIGS["k_fp8_per_token+v_nvfp4"] = ("fp8_per_token", "nvfp4")
# Attention-output floors: the lab's bars where this data meets them at every context.
ATTN_MIN_COSINE = {
    "bf16": 0.9999,
    "fp8_per_token": 0.99,
    "fp8_per_block128": 0.99,
    "k_fp8_per_token+v_nvfp4": 0.98,
}


@dataclass(frozen=True)
class Shape:
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    context: int

    @property
    def id(self) -> str:
        return (f"b{self.batch}-h{self.q_heads}x{self.kv_heads}-d{self.head_dim}"
                f"-t{self.context}")


CPU_SHAPES = [Shape(2, 8, 2, 128, 16), Shape(2, 8, 2, 128, 100), Shape(1, 4, 1, 64, 33)]
GPU_SHAPES = [Shape(4, 32, 8, 128, 1024), Shape(4, 32, 8, 128, 8192),
              Shape(8, 64, 8, 64, 4096)]  # gpt-oss decode heads


def _fits(config: str, s: Shape) -> bool:
    return not ("fp8_per_block128" in CONFIGS[config] and s.head_dim % 128)


def _cases(shapes):
    return [pytest.param(c, s, id=f"{c}-{s.id}") for s in shapes for c in CONFIGS
            if _fits(c, s)]


def _inputs(s: Shape, seed: int, device):
    """(q bf16 [B, Hq, D], k bf16, v bf16 [B, T, Hkv, D]): the cache in the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    k, v = realistic_kv(s.batch, s.context, s.kv_heads, s.head_dim, generator=g, device=device)
    q = realistic_query(k, s.q_heads, generator=g)
    return q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)


def _check_config_accuracy(config: str, s: Shape, kvperf, device) -> None:
    k_fmt, v_fmt = CONFIGS[config]
    q, k, v = _inputs(s, seed=11, device=device)
    ck, cv = compress(k, k_fmt), compress(v, v_fmt)
    assert ck.nbytes == ck.expected_nbytes and cv.nbytes == cv.expected_nbytes
    mk = kvperf.errors(decompress(ck), k, prefix="k_roundtrip.")
    mv = kvperf.errors(decompress(cv), v, prefix="v_roundtrip.")
    out = attend_compressed(q, ck, cv)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    ma = kvperf.errors(out, decode_attention_ref(q, k, v), prefix="attn.")
    for what, m, fmt in (("K", mk, k_fmt), ("V", mv, v_fmt)):
        floor = ROUNDTRIP_MIN_COSINE[fmt]
        assert m["cosine"] >= floor, f"{fmt}: {what} roundtrip cosine {m['cosine']:.5f} < {floor}"
    floor = ATTN_MIN_COSINE.get(config)
    if floor is not None:
        assert ma["cosine"] >= floor, f"{config}: attention cosine {ma['cosine']:.5f} < {floor}"
    kvperf.info("attn_floor_asserted", floor if floor is not None else "none (recorded only)")
    kvperf.info("bytes_per_element", (ck.nbytes + cv.nbytes) / (2 * k.numel()))


@pytest.mark.parametrize("config, shape", _cases(CPU_SHAPES))
def test_compressed_cache_accuracy(config, shape, kvperf):
    _check_config_accuracy(config, shape, kvperf, default_device())


@pytest.mark.gpu
@pytest.mark.parametrize("config, shape", _cases(GPU_SHAPES))
def test_compressed_cache_accuracy_gpu(config, shape, kvperf):
    _check_config_accuracy(config, shape, kvperf, "cuda")


def test_nvfp4_keys_cost_more_than_values(kvperf):
    """NVFP4 on K hurts the attention output more than NVFP4 on V (FP8 per-token on the
    other): a K error is multiplied by the logit, a V error only averaged. This is why the
    NVFP4 configuration that meets the lab's 0.98 keeps K in FP8.

    The ratio depends on where a cache's outlier channels fall (1.2x .. 2.9x over 24
    seeds), so it is measured over 8 independent caches drawn on the CPU (the same numbers
    on every device): K costs more in each, and 1.5x or more in geometric mean (~1.9).
    """
    dev = default_device()
    ratios = []
    for seed in range(8):
        q, k, v = (t.to(dev) for t in _inputs(Shape(2, 8, 2, 64, 100), seed=seed, device="cpu"))
        ref = decode_attention_ref(q, k, v)
        k8, v8 = compress(k, "fp8_per_token"), compress(v, "fp8_per_token")
        k4, v4 = compress(k, "nvfp4"), compress(v, "nvfp4")
        # float64 attention over the dequantised caches: the comparison is about the formats,
        # not about the rounding of whichever BF16 attention kernel this device has
        m_k4 = error_metrics(decode_attention_ref(q, decompress(k4), decompress(v8)), ref)
        m_v4 = error_metrics(decode_attention_ref(q, decompress(k8), decompress(v4)), ref)
        assert m_v4["cosine"] >= 0.98, (seed, m_v4)
        assert m_k4["rel_l2_err"] > m_v4["rel_l2_err"], (seed, m_k4, m_v4)
        ratios.append(m_k4["rel_l2_err"] / m_v4["rel_l2_err"])
    geo_mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    kvperf.accuracy("k_over_v_nvfp4_rel_l2_geomean", geo_mean, better="higher", rtol=0.05,
                    atol=0.0, domain=(0.0, None))
    assert geo_mean >= 1.5, [round(r, 2) for r in ratios]


def test_unfused_bf16_attention_matches_reference():
    """The attention the compressed paths share, alone: BF16 SDPA vs float64 (GQA grouping)."""
    q, k, v = _inputs(Shape(2, 8, 2, 64, 40), seed=3, device=default_device())
    out = decode_attention(q, k, v).double().cpu()
    ref = decode_attention_ref(q, k, v).cpu()
    assert torch.isfinite(out).all()
    # FlashAttention-style kernels (the GPU's SDPA) round the softmax weights to BF16 before
    # P @ V: up to 2^-9 relative per weight on outputs of |v| ~ 3, so atol 1e-2, rtol 2^-6.
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=2**-6)
    # a wrong GQA grouping (head h -> another kv head) would be far off: prove it is tested
    wrong = decode_attention_ref(q, k.roll(1, dims=2), v.roll(1, dims=2)).cpu()
    assert (wrong - ref).abs().max() > 0.1


# --------------------------------------------------------------------------------------
# Block scaling vs per-tensor on outlier data
# --------------------------------------------------------------------------------------

def test_block_scaling_beats_per_tensor_on_outlier_keys(kvperf):
    """Keys with outlier channels: a per-row (1x128 block) fp32 scale puts each row's
    largest element, an outlier that dominates the row's norm, exactly on 448 (exact in
    E4M3); one scale for the whole tensor cannot, so per-tensor's rel-L2 is ~1.6x higher
    (0.60-0.68x measured over seeds). MXFP8's power-of-two scales lose that advantage:
    recorded, not asserted."""
    dev = default_device()
    g = torch.Generator().manual_seed(21)
    k, _ = realistic_kv(2, 96, 2, 128, generator=g, device=dev)
    k = k.to(torch.bfloat16)
    rel = {fmt: kvperf.errors(decompress(compress(k, fmt)), k, prefix=f"{fmt}.")["rel_l2_err"]
           for fmt in ("fp8_per_tensor", "fp8_per_block128", "mxfp8")}
    assert rel["fp8_per_block128"] <= 0.8 * rel["fp8_per_tensor"], rel


@pytest.mark.parametrize("sink_value_scale", [1e-2, 1e-4])
def test_block_scaling_keeps_small_tokens_per_tensor_loses_them(sink_value_scale, kvperf):
    """Values of the sink token scaled by 1e-2 or 1e-4 of the others (sink tokens carry
    near-zero values). One tensor scale is set by the largest value (~20x a typical one),
    so at 1e-4 the sink's values sit ~2e-6 below the max, past E4M3's normal range
    (2^-6 .. 448, a ratio of 2^-14.8) into its subnormals, and its row loses most bits;
    every block-scaled format rescales that row. At 1e-2 all formats serve every row at
    E4M3's precision (the worst row's relative error stays near 2^-5)."""
    dev = default_device()
    g = torch.Generator().manual_seed(21)
    _, v = realistic_kv(2, 96, 2, 128, generator=g, sink_value_scale=sink_value_scale,
                        device=dev)
    v = v.to(torch.bfloat16)
    worst = {}
    for fmt in ("fp8_per_tensor", "fp8_per_block128", "mxfp8"):
        worst[fmt] = worst_token_rel_error(decompress(compress(v, fmt)), v)
        kvperf.error(f"{fmt}.worst_token_rel_err", worst[fmt])
    for fmt in ("fp8_per_block128", "mxfp8"):
        assert worst[fmt] <= 2**-4, worst  # E4M3: 3 mantissa bits, <= 2^-4 per element
    if sink_value_scale <= 1e-4:
        assert worst["fp8_per_tensor"] >= 4 * max(worst["fp8_per_block128"], worst["mxfp8"]), \
            worst
    else:
        assert worst["fp8_per_tensor"] <= 2**-4, worst


# --------------------------------------------------------------------------------------
# Error contract
# --------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    dev = default_device()
    x = torch.randn(2, 4, 2, 64).to(dev, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown KV format 'fp6'"):
        compress(x, "fp6")
    with pytest.raises(ValueError, match="head_dim 64 is not a multiple of its 128"):
        compress(x, "fp8_per_block128")
    with pytest.raises(ValueError, match="global_amax applies to nvfp4 only"):
        compress(x, "mxfp8", global_amax=torch.ones(1, device=dev))
    q = torch.randn(2, 6, 64).to(dev, torch.bfloat16)
    with pytest.raises(ValueError, match="q_heads 6 is not a multiple of kv_heads 4"):
        decode_attention(q, x.repeat(1, 1, 2, 1), x.repeat(1, 1, 2, 1))
    with pytest.raises(ValueError, match=r"q must be \[batch, q_heads, head_dim\]"):
        decode_attention(q[0], x, x)
    with pytest.raises(TypeError, match="attention takes bfloat16 or float16"):
        decode_attention(q.float(), x, x)
    with pytest.raises(ValueError, match="k and v must both be"):
        decode_attention(q, x, x[:, :3])


# --------------------------------------------------------------------------------------
# Speed (GPU): dequantise-then-attend per format vs BF16 attention
# --------------------------------------------------------------------------------------

SPEED_SHAPES = [Shape(32, 64, 8, 128, 8192), Shape(64, 64, 8, 128, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("config, shape", _cases(SPEED_SHAPES))
def test_dequantise_then_attend_speed(config, shape, kvperf, kv_bench):
    k_fmt, v_fmt = CONFIGS[config]
    q, k, v = _inputs(shape, seed=13, device="cuda")
    ck, cv = compress(k, k_fmt), compress(v, v_fmt)
    res = kv_bench(attend_compressed, q, ck, cv, bytes_moved=attention_bytes(q, ck, cv),
                   tokens=shape.batch)
    m = kvperf.errors(res.value, decode_attention_ref(q, k, v), prefix="attn.")
    floor = ATTN_MIN_COSINE.get(config)
    if floor is not None:
        assert m["cosine"] >= floor, f"{config}: attention cosine {m['cosine']:.5f} < {floor}"
    # every timed format still meets its roundtrip floor: a fast wrong kernel cannot pass
    for what, c, t, fmt in (("K", ck, k, k_fmt), ("V", cv, v, v_fmt)):
        r = kvperf.errors(decompress(c), t, prefix=f"{what}_roundtrip.")
        assert r["cosine"] >= ROUNDTRIP_MIN_COSINE[fmt], f"{fmt}: {what} roundtrip {r}"
    kvperf.info("kv_bytes", ck.nbytes + cv.nbytes)
    kvperf.info("path", "bf16 SDPA" if config == "bf16" else "dequantise kernels + bf16 SDPA")
