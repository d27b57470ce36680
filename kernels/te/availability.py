"""Is Transformer Engine here, and which of its recipes does this machine run? TE's own words.

Neither torch nor TE is imported at module load, so the plugin's skip logic (which reads
this module) works on machines without either. Kernels and the plugin both read TE
availability from here; the kernels never import the plugin.
"""

from __future__ import annotations

import importlib
from functools import cached_property

TE_NOT_INSTALLED = "transformer_engine not installed"


def import_te():
    """``transformer_engine.pytorch`` or ImportError with a reason that says what failed
    (the plugin's skip reasons and the recipe ladder's log use the same words)."""
    try:
        return importlib.import_module("transformer_engine.pytorch")
    except ImportError as exc:
        raise ImportError(f"{TE_NOT_INSTALLED} ({exc})") from exc
    except (OSError, RuntimeError) as exc:  # installed, but its CUDA libraries do not load
        raise ImportError(f"transformer_engine failed to import: {type(exc).__name__}: {exc}") \
            from exc


class TransformerEngineSupport:
    """TE's own answers on this machine, with TE's reason strings; never guessed.

    Keys are the recipe ladder's rungs. TE >= 2.8 answers through
    ``transformer_engine.pytorch.is_*_available(return_reason=True)``; TE 2.0-2.7 through
    ``transformer_engine.pytorch.fp8.check_*_support()``.
    """

    CHECKS = {
        "nvfp4": ("is_nvfp4_available", "check_nvfp4_support"),
        "mxfp8": ("is_mxfp8_available", "check_mxfp8_support"),
        "fp8_block": ("is_fp8_block_scaling_available", "check_fp8_block_scaling_support"),
        "fp8_current": ("is_fp8_available", "check_fp8_support"),
    }
    NOT_INSTALLED = TE_NOT_INSTALLED

    @cached_property
    def import_error(self) -> str | None:
        try:
            import_te()
        except ImportError as exc:
            return str(exc)
        return None

    def availability(self) -> dict[str, tuple[bool, str]]:
        """{rung: (available, reason)}; every rung unavailable, with why, if TE does not import."""
        if self.import_error:
            return {rung: (False, self.import_error) for rung in self.CHECKS}
        te = import_te()

        answers: dict[str, tuple[bool, str]] = {}
        for rung, (new_name, old_name) in self.CHECKS.items():
            try:
                if hasattr(te, new_name):
                    ok, reason = getattr(te, new_name)(return_reason=True)
                else:
                    legacy = importlib.import_module("transformer_engine.pytorch.fp8")
                    if not hasattr(legacy, old_name):
                        answers[rung] = (False, f"this transformer_engine has no {rung} recipe")
                        continue
                    ok, reason = getattr(legacy, old_name)()
            except Exception as exc:  # a check that raises (no GPU, say) means "not here"
                ok, reason = False, f"{new_name} failed: {type(exc).__name__}: {exc}"
            answers[rung] = (bool(ok), str(reason or ""))
        return answers
