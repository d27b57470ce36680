"""Causal prefill attention through tensor descriptors (TMA) and its plain-load twin (cp.async),
GQA, head_dim 64 and 128, sinks and sliding window optional; against the float64 reference.

The TMA path runs where ``tma_ready()`` says so (compute capability >= 9, Triton tensor
descriptors, a probe kernel compiled to cp.async.bulk.tensor that copies right); elsewhere it
skips with that reason (hw_skip_reason). The path is verified in the compiled PTX, not by
name: on the GPU from the launch, and on any machine by compiling for sm90 offline.
Speed at 8K causal, head_dim 128, beside torch SDPA (flash) and FlashInfer fa3.
Goal (H200): TMA above its twin and >= 0.8x FlashInfer fa3 in TFLOPS: info ratios.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvperf_kernels.attention.prefill import (
    compiled_asm,
    prefill_attention,
    prefill_attention_ref,
    ptx_by_load_path,
    tma_ready,
)
from kvperf_kernels.device import default_device

TOL = (1e-2, 1e-2)  # P rounded to 16 bits once (FlashAttention's), as FlashInfer's own tests


def _inputs(batch, seq_len, hq, hkv, dim, seed=0, device=None):
    device = device or default_device()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq_len, h, dim, generator=gen) for h in (hq, hkv, hkv))
    sinks = 1.0 + 2.0 * torch.randn(hq, generator=gen)
    return [t.to(device=device, dtype=torch.bfloat16) for t in (q, k, v)] + [sinks.to(device)]


def _check(out, ref, what):
    got = out.double()
    assert torch.isfinite(got).all(), f"{what}: NaN/Inf"
    atol, rtol = TOL
    err = (got - ref).abs()
    bad = err > atol + rtol * ref.abs()
    assert not bad.any(), f"{what}: {int(bad.sum())} outputs beyond {TOL} (max {err.max():.3g})"


def _tma_or_skip(kvperf):
    ready, reason = tma_ready()
    if not ready:
        kvperf.skip(reason)


@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "plain"])
@pytest.mark.parametrize("dim, with_sinks, window",
                         [(64, False, -1), (64, True, 20), (128, True, -1)],
                         ids=["d64", "d64-sinks-win20", "d128-sinks"])
def test_prefill_matches_reference(use_tma, dim, with_sinks, window, kvperf):
    """Interpreter (tensor descriptors emulated) or GPU: both load paths, ragged last tile."""
    if use_tma and torch.cuda.is_available():
        _tma_or_skip(kvperf)
    q, k, v, sinks = _inputs(2, 77, 4, 2, dim, seed=dim)
    sinks = sinks if with_sinks else None
    out = prefill_attention(q, k, v, sinks=sinks, window_left=window, use_tma=use_tma)
    ref = prefill_attention_ref(q, k, v, sinks=sinks, window_left=window)
    _check(out, ref, f"prefill {'tma' if use_tma else 'plain'} d{dim}")
    kvperf.accuracy("max_abs_err", (out.double() - ref).abs().max().item(), better="lower",
                    rtol=1.0, atol=2e-3)


def test_prefill_paths_agree_and_control():
    """Both load paths compute the same bits (the same math on the same tiles); the control:
    a reference whose window is one token shorter must fail the check."""
    q, k, v, sinks = _inputs(1, 50, 4, 2, 64, seed=1)
    if torch.cuda.is_available() and not tma_ready()[0]:
        pytest.skip(tma_ready()[1])
    a = prefill_attention(q, k, v, sinks=sinks, window_left=20, use_tma=True)
    b = prefill_attention(q, k, v, sinks=sinks, window_left=20, use_tma=False)
    assert torch.equal(a, b)
    wrong = prefill_attention_ref(q, k, v, sinks=sinks, window_left=19)
    with pytest.raises(AssertionError, match="beyond"):
        _check(b, wrong, "prefill vs a window one token short")


def test_prefill_bad_input_and_readiness():
    q, k, v, _ = _inputs(1, 8, 4, 2, 64)
    with pytest.raises(TypeError, match="k/v dtype"):
        prefill_attention(q, k.half(), v.half())
    with pytest.raises(ValueError, match="k must be contiguous"):
        prefill_attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), v)
    with pytest.raises(ValueError, match="Hq"):
        prefill_attention(q[:, :, :3].contiguous(), k, v)
    with pytest.raises(ValueError, match="head_dim"):
        prefill_attention(q[..., :32].contiguous(), k[..., :32].contiguous(),
                          v[..., :32].contiguous())
    assert prefill_attention(q[:, :0], k[:, :0], v[:, :0]).shape == (1, 0, 4, 64)
    ready, reason = tma_ready()
    if not torch.cuda.is_available():
        assert not ready and reason.startswith("needs a CUDA GPU"), reason


@pytest.mark.parametrize("dim", [128])
def test_prefill_ptx_for_sm90_compiled_offline(dim, kvperf):
    """The load path in the sm90 PTX, on any machine (Triton's bundled ptxas, no GPU): the TMA
    kernel issues cp.async.bulk.tensor copies, its twin cp.async and no bulk tensor copy."""
    try:
        ptx = ptx_by_load_path(90, dim)
    except Exception as exc:  # no NVIDIA backend / ptxas in this Triton
        kvperf.skip(f"needs Triton's NVIDIA backend to compile for sm90 offline; found "
                    f"{type(exc).__name__}: {exc}"[:300])
    tma, plain = ptx["tma"], ptx["plain"]
    assert tma.count("cp.async.bulk.tensor") > 0
    assert "cp.async.bulk.tensor" not in plain and plain.count("cp.async") > 0
    kvperf.info("bulk_tensor_copies", tma.count("cp.async.bulk.tensor"))


# --- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_tma_path_in_the_ptx(kvperf):
    """The TMA variant's PTX has bulk tensor copies, its twin's has cp.async and none."""
    _tma_or_skip(kvperf)
    q, k, v, _ = _inputs(1, 1024, 8, 2, 128)
    prefill_attention(q, k, v, use_tma=True)
    prefill_attention(q, k, v, use_tma=False)
    tma_ptx, plain_ptx = compiled_asm(True)["ptx"], compiled_asm(False)["ptx"]
    assert "cp.async.bulk.tensor" in tma_ptx
    assert "cp.async.bulk.tensor" not in plain_ptx and "cp.async" in plain_ptx
    kvperf.info("tma_bulk_copies_in_ptx", tma_ptx.count("cp.async.bulk.tensor"))


LONG = [(8192, 128), (8192, 64), (32768, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len, dim", LONG, ids=[f"t{t}-d{d}" for t, d in LONG])
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "plain"])
def test_prefill_long(use_tma, seq_len, dim, kvperf):
    """Llama-3-8B heads (Hq 32, Hkv 8) with sinks; 256 query rows checked (first, last, spread)."""
    if use_tma:
        _tma_or_skip(kvperf)
    q, k, v, sinks = _inputs(1, seq_len, 32, 8, dim, seed=seq_len)
    out = prefill_attention(q, k, v, sinks=sinks, use_tma=use_tma)
    rows = torch.linspace(0, seq_len - 1, 256, device=q.device).long()
    ref = prefill_attention_ref(q, k, v, sinks=sinks, rows=rows)
    _check(out[:, rows], ref, f"prefill {seq_len} d{dim}")


def _causal_flops(batch, seq_len, hq, dim):
    return 4 * batch * hq * dim * seq_len * (seq_len + 1) / 2


@pytest.mark.gpu
def test_prefill_speed_8k(kv_bench, kvperf):
    """8K causal, Hq 32, Hkv 8, D 128, bf16: ours TMA and plain, torch SDPA (flash backend,
    K/V heads expanded outside the timing), each output checked on 64 rows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq_len, hq, hkv, dim = 8192, 32, 8, 128
    q, k, v, _ = _inputs(1, seq_len, hq, hkv, dim, seed=8)
    flops = _causal_flops(1, seq_len, hq, dim)
    rows = torch.linspace(0, seq_len - 1, 64, device=q.device).long()
    ref = prefill_attention_ref(q, k, v, rows=rows)
    tflops = {}
    paths = [False] + ([True] if tma_ready()[0] else [])
    kvperf.info("tma_ready", tma_ready()[1])
    for use_tma in paths:
        name = "ours_tma" if use_tma else "ours_plain"
        res = kv_bench(prefill_attention, q, k, v, use_tma=use_tma, flops=flops, label=name)
        _check(res.value[:, rows], ref, name)
        tflops[name] = res.tflops
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k.repeat_interleave(hq // hkv, 2),
                                              v.repeat_interleave(hq // hkv, 2)))

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, scale=1.0 / math.sqrt(dim))
    res = kv_bench(sdpa, flops=flops, label="torch_sdpa_flash")
    _check(res.value.transpose(1, 2)[:, rows], ref, "torch SDPA flash")
    tflops["sdpa"] = res.tflops
    if tflops.get("ours_tma") and tflops.get("ours_plain"):
        kvperf.info("tma_over_plain", round(tflops["ours_tma"] / tflops["ours_plain"], 3))
    if tflops.get("sdpa"):
        best = max(v for key, v in tflops.items() if key.startswith("ours") and v)
        kvperf.info("ours_best_over_sdpa", round(best / tflops["sdpa"], 3))


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.requires("flashinfer", "0.7")
def test_prefill_speed_vs_flashinfer_fa3(kv_bench, kvperf):
    """FlashInfer's single prefill (fa3 on sm90) beside our TMA kernel, same inputs."""
    import flashinfer

    _tma_or_skip(kvperf)
    seq_len, hq, hkv, dim = 8192, 32, 8, 128
    q, k, v, _ = _inputs(1, seq_len, hq, hkv, dim, seed=8)
    flops = _causal_flops(1, seq_len, hq, dim)
    rows = torch.linspace(0, seq_len - 1, 64, device=q.device).long()
    ref = prefill_attention_ref(q, k, v, rows=rows)
    fa3 = kv_bench(flashinfer.single_prefill_with_kv_cache, q[0], k[0], v[0], causal=True,
                   backend="fa3", flops=flops, label="flashinfer_fa3")
    _check(fa3.value[None][:, rows], ref, "FlashInfer fa3")
    ours = kv_bench(prefill_attention, q, k, v, use_tma=True, flops=flops, label="ours_tma")
    _check(ours.value[:, rows], ref, "ours tma")
    kvperf.info("flashinfer", flashinfer.__version__)
    if ours.tflops and fa3.tflops:
        kvperf.info("ours_tma_over_fa3", round(ours.tflops / fa3.tflops, 3))
        kvperf.info("goal", "TMA prefill >= 0.8x FlashInfer fa3 TFLOPS at 8K causal, D 128")
