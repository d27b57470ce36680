"""The Transformer Engine recipe ladder: the most compressed recipe this machine runs.

Ladder, best first (``LADDER``):

  nvfp4        NVFP4BlockScaling: FP4 tensor cores (Blackwell). Calibrated in FP8 first:
               ``calibration_steps`` forward passes under ``autocast(enabled=False,
               calibrating=True, recipe=DelayedScaling())`` (high-precision math, amax
               recorded), then the switch to NVFP4. TE's NVFP4 quantiser scales each
               tensor on the fly; what the calibration feeds is the KV cache's global
               amax (a cache written token by token needs one fixed global scale).
  mxfp8        MXFP8BlockScaling: 32-element blocks, E8M0 scales (sm100 family).
  fp8_block    Float8BlockScaling: 1x128 / 128x128 blocks, fp32 scales (Hopper with
               CUDA >= 12.9): the more accurate FP8 where MXFP8 is missing.
  fp8_current  Float8CurrentScaling: per-tensor scale from the current amax (any FP8 GPU).
  bf16         no quantised GEMMs: TE modules outside autocast.

``choose_recipe`` is a pure function of an availability table ``{rung: (ok, reason)}``;
``te_availability`` builds that table from TE's own checks (``te.is_fp8_available(
return_reason=True)`` and friends), so every "why not" is TE's reason string.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Mapping

from kvperf_kernels.te.availability import TransformerEngineSupport

LOG = logging.getLogger("kvperf.te")

LADDER = ("nvfp4", "mxfp8", "fp8_block", "fp8_current", "bf16")

# The KV cache format each recipe pairs with in the attention block (same family of scaling).
KV_FORMAT_FOR_RECIPE = {
    "nvfp4": "nvfp4",
    "mxfp8": "mxfp8",
    "fp8_block": "fp8_per_block128",
    "fp8_current": "fp8_per_token",
    "bf16": "bf16",
}

# The labs' accuracy policy for the block output against the BF16 reference (rel-L2).
REL_L2_POLICY = {
    "nvfp4": 2.0**-2,
    "mxfp8": 2.0**-4,
    "fp8_block": 2.0**-4,
    "fp8_current": 2.0**-4,
    "bf16": 2.0**-4,
}

class TERecipeUnavailable(RuntimeError):
    """No rung of the ladder can run here; the message lists every rung's reason."""


def _check_pair(value, rung: str) -> tuple[bool, str]:
    if (not isinstance(value, tuple) or len(value) != 2 or not isinstance(value[0], bool)
            or not isinstance(value[1], str)):
        raise TypeError(f"availability[{rung!r}] must be a (bool, str) pair, got {value!r}")
    return value


def te_availability() -> dict[str, tuple[bool, str]]:
    """``{rung: (ok, reason)}`` for this machine, from TE's own checks.

    The quantised rungs come from the plugin's hardware model (TE's own reason strings;
    "transformer_engine not installed (...)" without TE); bf16 needs only a CUDA GPU.
    """
    support = TransformerEngineSupport()
    table = support.availability()
    if support.import_error:  # the BF16 rung still runs TE's modules
        table["bf16"] = (False, support.import_error)
        return table
    import torch  # TE's PyTorch part imported above, so torch is there

    table["bf16"] = ((True, "") if torch.cuda.is_available()
                     else (False, "TE modules need a CUDA GPU; none is visible"))
    return table


def choose_recipe(availability: Mapping[str, tuple[bool, str]]
                  ) -> tuple[str | None, list[tuple[str, str]]]:
    """(first available rung or None, [(rung, why it was not chosen), ...] for all others).

    Rungs above the chosen one carry their unavailability reason; rungs below carry
    "<chosen> ranks higher and is available". Every ladder rung must be in the table.
    """
    if not isinstance(availability, Mapping):
        raise TypeError(f"availability must be a mapping, got {type(availability).__name__}")
    unknown = sorted(set(availability) - set(LADDER))
    if unknown:
        raise ValueError(f"unknown recipe name(s) {unknown}; the ladder is {LADDER}")
    missing = [r for r in LADDER if r not in availability]
    if missing:
        raise ValueError(f"availability lacks {missing}; give (ok, reason) for every rung")
    chosen = None
    rejected: list[tuple[str, str]] = []
    for rung in LADDER:
        ok, reason = _check_pair(availability[rung], rung)
        if chosen is not None:
            rejected.append((rung, f"{chosen} ranks higher and is available"))
        elif ok:
            chosen = rung
        else:
            rejected.append((rung, reason or "not available (no reason given)"))
    return chosen, rejected


def log_choice(chosen: str | None, rejected: list[tuple[str, str]],
               logger: logging.Logger = LOG) -> None:
    """One INFO line for the recipe that runs, one per rung that does not, with TE's reason."""
    if chosen is None:
        logger.warning("TE recipe: none of %s can run here", ", ".join(LADDER))
    else:
        logger.info("TE recipe: running %s", chosen)
    for rung, reason in rejected:
        logger.info("TE recipe %s not used: %s", rung, reason)


def choose_and_log(availability: Mapping[str, tuple[bool, str]]) -> str:
    """``choose_recipe`` + ``log_choice``; raises TERecipeUnavailable when nothing can run."""
    chosen, rejected = choose_recipe(availability)
    log_choice(chosen, rejected)
    if chosen is None:
        raise TERecipeUnavailable(
            "no TE recipe can run: " + "; ".join(f"{r}: {why}" for r, why in rejected))
    return chosen


# --------------------------------------------------------------------------------------
# TE objects (need TE installed)
# --------------------------------------------------------------------------------------

def make_recipe(rung: str):
    """The TE recipe object of a rung (None for bf16: no autocast)."""
    if rung not in LADDER:
        raise ValueError(f"unknown recipe {rung!r}; the ladder is {LADDER}")
    if rung == "bf16":
        return None
    recipe = importlib.import_module("transformer_engine.common.recipe")
    if rung == "nvfp4":
        return recipe.NVFP4BlockScaling()
    if rung == "mxfp8":
        return recipe.MXFP8BlockScaling()
    if rung == "fp8_block":
        return recipe.Float8BlockScaling()
    return recipe.Float8CurrentScaling()  # E4M3 forward under the default HYBRID format


def make_calibration_recipe(amax_history_len: int = 16):
    """DelayedScaling whose amax history the calibration passes fill."""
    recipe = importlib.import_module("transformer_engine.common.recipe")
    return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID,
                                 amax_history_len=amax_history_len, amax_compute_algo="max")


def te_autocast(te, recipe, *, enabled: bool = True, calibrating: bool = False):
    """``te.autocast`` (TE >= 2.8) or ``te.fp8_autocast`` (older 2.x); a no-op for bf16."""
    if recipe is None and not calibrating:
        return contextlib.nullcontext()
    if hasattr(te, "autocast"):
        return te.autocast(enabled=enabled, calibrating=calibrating, recipe=recipe)
    return te.fp8_autocast(enabled=enabled, calibrating=calibrating, fp8_recipe=recipe)
