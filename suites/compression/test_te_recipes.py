"""Transformer Engine recipe ladder (lab 2): choice, logging, and the attention block.

CPU part: ``choose_recipe`` against availability tables per hardware profile. The tables
are TEST DATA for the pure choice function, written with TE's own reason strings (TE
2.x ``transformer_engine/pytorch/quantization.py``, ``_compute_*_support``); they are not
results of TE. The block's dimension rules and its torch reference run on the CPU too.

GPU part (needs TE >= 2.0, which neither CI nor this project's H100 has, so these skip
there with the plugin's reason "needs transformer_engine>=2.0; found transformer_engine not
installed"): the block on TE modules under each rung, compared with the BF16 torch
reference of the same weights (rel-L2 <= 2^-4 FP8/MXFP8, <= 2^-2 NVFP4), the rung the
ladder chooses on this machine, and decode speed per rung.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from kvperf_kernels.models.te_attention_block import (
    BlockDims,
    TEAttentionBlock,
    attention_block_ref,
    random_weights,
)
from kvperf_kernels.te.availability import TE_NOT_INSTALLED
from kvperf_kernels.te.recipes import (
    KV_FORMAT_FOR_RECIPE,
    LADDER,
    REL_L2_POLICY,
    TERecipeUnavailable,
    choose_and_log,
    choose_recipe,
    te_availability,
)

# TE's reason strings (verbatim from TE 2.x quantization.py).
FP8_CC = "Device compute capability 8.9 or higher required for FP8 execution."
MXFP8_CC = "Device compute capability 10.0 or higher required for MXFP8 execution."
MXFP8_SM12X = "MXFP8 (for all gemm layouts) is not supported on 12.0+ architectures yet."
NVFP4_CC = "Device compute capability 10.0 or higher required for NVFP4 execution."
BLOCK_CC = "FP8 block scaled GEMM requires compute capability 9.0 or higher and CUDA >= 12.9."
NO_TE = f"{TE_NOT_INSTALLED} (No module named 'transformer_engine')"
YES = (True, "")

# profile -> (availability table as TE reports it on that hardware, expected rung)
PROFILES = {
    "sm80_a100": ({"nvfp4": (False, NVFP4_CC), "mxfp8": (False, MXFP8_CC),
                   "fp8_block": (False, BLOCK_CC), "fp8_current": (False, FP8_CC),
                   "bf16": YES}, "bf16"),
    "sm89_l40s": ({"nvfp4": (False, NVFP4_CC), "mxfp8": (False, MXFP8_CC),
                   "fp8_block": (False, BLOCK_CC), "fp8_current": YES, "bf16": YES},
                  "fp8_current"),
    "sm90_h100_cuda13": ({"nvfp4": (False, NVFP4_CC), "mxfp8": (False, MXFP8_CC),
                          "fp8_block": YES, "fp8_current": YES, "bf16": YES}, "fp8_block"),
    "sm90_h100_cuda12.8": ({"nvfp4": (False, NVFP4_CC), "mxfp8": (False, MXFP8_CC),
                            "fp8_block": (False, BLOCK_CC), "fp8_current": YES, "bf16": YES},
                           "fp8_current"),
    "sm100_b200": ({r: YES for r in LADDER}, "nvfp4"),
    "sm120_rtx5090": ({"nvfp4": YES, "mxfp8": (False, MXFP8_SM12X), "fp8_block": YES,
                       "fp8_current": YES, "bf16": YES}, "nvfp4"),
    "sm121_gb10": ({"nvfp4": YES, "mxfp8": (False, MXFP8_SM12X), "fp8_block": YES,
                    "fp8_current": YES, "bf16": YES}, "nvfp4"),
    "cpu_no_te": ({r: (False, NO_TE) for r in LADDER}, None),
}


# --------------------------------------------------------------------------------------
# The choice function (CPU)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", list(PROFILES))
def test_choose_recipe_per_profile(profile):
    table, expected = PROFILES[profile]
    chosen, rejected = choose_recipe(table)
    assert chosen == expected
    assert [r for r, _ in rejected] == [r for r in LADDER if r != chosen]
    above = LADDER if chosen is None else LADDER[:LADDER.index(chosen)]
    for rung, reason in rejected:
        if rung in above:
            assert reason == table[rung][1], rung  # TE's own string, unchanged
        else:
            assert reason == f"{chosen} ranks higher and is available"


def test_hopper_rejects_mxfp8_and_nvfp4_with_te_reasons():
    chosen, rejected = choose_recipe(PROFILES["sm90_h100_cuda13"][0])
    reasons = dict(rejected)
    assert chosen == "fp8_block"
    assert reasons["mxfp8"] == MXFP8_CC
    assert reasons["nvfp4"] == NVFP4_CC


def test_choice_is_logged_with_reasons(caplog):
    caplog.set_level(logging.INFO, logger="kvperf.te")
    assert choose_and_log(PROFILES["sm121_gb10"][0]) == "nvfp4"
    messages = [r.getMessage() for r in caplog.records if r.name == "kvperf.te"]
    assert "TE recipe: running nvfp4" in messages
    assert f"TE recipe mxfp8 not used: {MXFP8_SM12X}" not in messages  # below the chosen rung
    assert "TE recipe mxfp8 not used: nvfp4 ranks higher and is available" in messages
    caplog.clear()
    assert choose_and_log(PROFILES["sm90_h100_cuda13"][0]) == "fp8_block"
    messages = [r.getMessage() for r in caplog.records if r.name == "kvperf.te"]
    assert f"TE recipe mxfp8 not used: {MXFP8_CC}" in messages
    assert f"TE recipe nvfp4 not used: {NVFP4_CC}" in messages


def test_nothing_available_raises_with_every_reason(caplog):
    caplog.set_level(logging.INFO, logger="kvperf.te")
    with pytest.raises(TERecipeUnavailable) as info:
        choose_and_log(PROFILES["cpu_no_te"][0])
    for rung in LADDER:
        assert f"{rung}: {NO_TE}" in str(info.value)
    assert any(r.levelno == logging.WARNING and r.name == "kvperf.te" for r in caplog.records)


def test_bad_availability_tables_raise():
    good = dict(PROFILES["sm100_b200"][0])
    with pytest.raises(ValueError, match=r"unknown recipe name\(s\) \['fp6'\]"):
        choose_recipe({**good, "fp6": YES})
    with pytest.raises(ValueError, match=r"availability lacks \['bf16'\]"):
        choose_recipe({k: v for k, v in good.items() if k != "bf16"})
    with pytest.raises(TypeError, match=r"availability\['nvfp4'\] must be a \(bool, str\) pair"):
        choose_recipe({**good, "nvfp4": True})
    with pytest.raises(TypeError, match="availability must be a mapping"):
        choose_recipe([("nvfp4", YES)])


def test_te_availability_on_this_machine():
    """The real table here: TE's answers where TE is installed, else the import failure."""
    table = te_availability()
    assert set(table) == set(LADDER)
    for rung, (ok, reason) in table.items():
        assert isinstance(ok, bool) and isinstance(reason, str), rung
        if not ok:
            assert reason, f"{rung} unavailable without a reason"
    if importlib.util.find_spec("transformer_engine") is None:
        assert all(not ok for ok, _ in table.values())
        assert all(reason.startswith(TE_NOT_INSTALLED) for _, reason in table.values())
        assert choose_recipe(table)[0] is None
    elif torch.cuda.is_available():
        assert table["bf16"] == (True, "")


# --------------------------------------------------------------------------------------
# The block's contract and its torch reference (CPU)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden=1000, q_heads=8, kv_heads=2, head_dim=128), "hidden=1000 is not a multiple of 16"),
    (dict(hidden=1024, q_heads=8, kv_heads=2, head_dim=72), "head_dim=72 is not a multiple of 16"),
    (dict(hidden=1024, q_heads=6, kv_heads=4, head_dim=64), "q_heads=6 is not a multiple of"),
    (dict(hidden=1024, q_heads=0, kv_heads=1, head_dim=64), "q_heads must be a positive int"),
])
def test_block_dims_must_suit_te_gemms(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockDims(**kwargs)


SMALL = BlockDims(hidden=256, q_heads=4, kv_heads=2, head_dim=128)


def _block_inputs(dims, batch, past, new, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = random_weights(dims, generator=g, device=device)
    x_past = torch.randn(batch, past, dims.hidden, generator=g).to(device, torch.bfloat16)
    x_new = torch.randn(batch, new, dims.hidden, generator=g).to(device, torch.bfloat16)
    return w, x_past, x_new


def test_reference_block_is_causal_over_new_tokens():
    w, x_past, x_new = _block_inputs(SMALL, 2, 16, 2, seed=1)
    out = attention_block_ref(w, SMALL, x_past, x_new)
    x_new2 = x_new.clone()
    x_new2[:, 1] = torch.randn(x_new.shape[0], SMALL.hidden,
                               generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    out2 = attention_block_ref(w, SMALL, x_past, x_new2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out2[:, 0], out[:, 0], rtol=0, atol=0)  # token 0 can't see 1
    assert (out2[:, 1] - out[:, 1]).abs().max() > 1e-2  # token 1 sees itself


@pytest.mark.parametrize("recipe", [r for r in LADDER if r != "bf16"])
def test_reference_block_cache_share_within_policy(recipe, kvperf):
    """The KV cache's share of the block error (GEMMs exact): within the recipe's policy."""
    kv_format = KV_FORMAT_FOR_RECIPE[recipe]
    w, x_past, x_new = _block_inputs(SMALL, 2, 48, 2, seed=2)
    ref = attention_block_ref(w, SMALL, x_past, x_new)
    out = attention_block_ref(w, SMALL, x_past, x_new, kv_format=kv_format)
    m = kvperf.errors(out, ref)
    kvperf.info("kv_format", kv_format)
    assert m["rel_l2_err"] <= REL_L2_POLICY[recipe]
    assert m["rel_l2_err"] > 0  # the cache really was compressed


# --------------------------------------------------------------------------------------
# The block on TE modules (GPU + TE)
# --------------------------------------------------------------------------------------

# Every GEMM dim a multiple of 128 so all recipes' alignment rules hold (TE asks 16 for
# FP8, 32 for MXFP8 tiles, 16 rows for NVFP4); head_dim 128 for the 1x128 FP8 blocks.
GPU_DIMS = BlockDims(hidden=1024, q_heads=8, kv_heads=2, head_dim=128)
GPU_BATCH, GPU_PAST, GPU_NEW = 16, 256, 8  # decode: 16 sequences x 8 new tokens = 128 rows
CALIBRATION_STEPS = 4

RUNG_MARKS = {
    "nvfp4": [pytest.mark.fp4],
    "mxfp8": [pytest.mark.sm100],
    "fp8_block": [pytest.mark.fp8],
    "fp8_current": [pytest.mark.fp8],
    "bf16": [],
}
RUNGS = [pytest.param(r, marks=RUNG_MARKS[r], id=r) for r in LADDER]


def _te_block(rung, kvperf):
    """The block for a rung, or a skip with TE's own reason when TE says it cannot run."""
    ok, reason = te_availability()[rung]
    if not ok:
        kvperf.skip(reason)
    w, x_past, x_new = _block_inputs(GPU_DIMS, GPU_BATCH, GPU_PAST, GPU_NEW, seed=5,
                                     device="cuda")
    block = TEAttentionBlock(GPU_DIMS, w, recipe=rung)
    if rung == "nvfp4":  # calibrate in FP8 first, then switch to FP4
        g = torch.Generator().manual_seed(6)
        batches = [torch.randn(GPU_BATCH, GPU_NEW, GPU_DIMS.hidden, generator=g)
                   .to("cuda", torch.bfloat16) for _ in range(CALIBRATION_STEPS)]
        block.calibrate(batches + [x_past])
        assert block.calibration_steps == CALIBRATION_STEPS + 1
    return block, w, x_past, x_new


@pytest.mark.gpu
@pytest.mark.requires("transformer_engine", "2.0")
@pytest.mark.parametrize("rung", RUNGS)
def test_te_block_accuracy_per_recipe(rung, kvperf):
    block, w, x_past, x_new = _te_block(rung, kvperf)
    out = block.forward(x_past, x_new)
    ref = attention_block_ref(w, GPU_DIMS, x_past, x_new)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    m = kvperf.errors(out, ref)
    kvperf.info("te_recipe", rung)
    kvperf.info("kv_format", block.kv_format)
    policy = 2.0**-6 if rung == "bf16" else REL_L2_POLICY[rung]  # bf16: ~2^-8 expected
    assert m["rel_l2_err"] <= policy, f"{rung}: rel-L2 {m['rel_l2_err']:.4g} > {policy:.4g}"


@pytest.mark.gpu
@pytest.mark.requires("transformer_engine", "2.0")
def test_te_ladder_runs_the_chosen_recipe(kvperf, caplog):
    caplog.set_level(logging.INFO, logger="kvperf.te")
    table = te_availability()
    chosen = choose_and_log(table)
    _, rejected = choose_recipe(table)
    kvperf.info("te_recipe", chosen)
    for rung, reason in rejected:
        kvperf.info(f"not_used.{rung}", reason)
    assert f"TE recipe: running {chosen}" in [r.getMessage() for r in caplog.records]
    block, w, x_past, x_new = _te_block(chosen, kvperf)
    out = block.forward(x_past, x_new)
    ref = attention_block_ref(w, GPU_DIMS, x_past, x_new)
    m = kvperf.errors(out, ref)
    policy = 2.0**-6 if chosen == "bf16" else REL_L2_POLICY[chosen]
    assert m["rel_l2_err"] <= policy


@pytest.mark.gpu
@pytest.mark.requires("transformer_engine", "2.0")
@pytest.mark.parametrize("rung", RUNGS)
def test_te_block_decode_speed(rung, kvperf, kv_bench):
    block, w, x_past, x_new = _te_block(rung, kvperf)
    block.prefill(x_past)
    # the timed call attends over the cache without appending, so every call is the same
    res = kv_bench(block.decode, x_new, append=False, tokens=GPU_BATCH * GPU_NEW)
    out = res.value
    ref = attention_block_ref(w, GPU_DIMS, x_past, x_new)
    m = kvperf.errors(out, ref)
    policy = 2.0**-6 if rung == "bf16" else REL_L2_POLICY[rung]
    assert m["rel_l2_err"] <= policy
    kvperf.info("te_recipe", rung)
