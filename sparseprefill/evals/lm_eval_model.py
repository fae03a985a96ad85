"""An lm-evaluation-harness model, ``sparseprefill``: lm-eval's ``HFLM`` with sparse prefill.

Any lm-eval task (a shipped one or a user's own YAML) then runs through the patched model, and a
``dense=true`` run of the very same class gives the same-harness dense baseline::

    pip install "sparseprefill[lm-eval]"
    sparseprefill-lm-eval --model sparseprefill \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,sparse_config=auto \\
        --tasks hellaswag --batch_size 1
    sparseprefill-lm-eval --model sparseprefill \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,dense=true \\
        --tasks hellaswag --batch_size 1

or from Python (importing this module registers the model)::

    import lm_eval
    import sparseprefill.evals.lm_eval_model  # noqa: F401  registers "sparseprefill"
    results = lm_eval.simple_evaluate(
        model="sparseprefill",
        model_args="pretrained=PATH,sparse_config=min_sparse_len=8192;vertical_slash.vertical_mass=0.9",
        tasks=["my_task"],
    )
    results["config"]["sparseprefill"]["density"]  # what the sparse path computed

``--model_args`` keys of this model (every other key goes to ``HFLM`` unchanged):

* ``sparse_config``: ``auto`` / ``default`` (``SparseConfig()``), ``keep_everything`` (the
  lossless ``SparseConfig.keep_everything()``: the sparse path runs on every prompt and keeps every
  key, for checking an integration), a path to a JSON file of ``SparseConfig`` fields (nested
  configs as objects, e.g. ``{"pattern": "block_sparse", "block_sparse": {"mass": 0.9}}``), or
  inline ``key=value`` items joined by ``;`` or ``|`` (lm-eval splits ``--model_args`` on ``,``),
  optionally after a preset: ``keep_everything;pattern=a_shape;a_shape.local_tokens=512``. Nested
  fields are written ``section.field``; ``none`` clears an optional field.
* ``profile``: a per-head profile, as a JSON file path or a shipped profile's name (see
  ``sparseprefill.shipped_profile``).
* ``allow_profile_mismatch``: ``true`` to apply a profile made for another checkpoint.
* ``dense``: ``true`` to run this class unpatched (the dense baseline).

The sparse path's density is logged in one line when lm-eval finishes and written to the results
under ``results["config"]["sparseprefill"]``; ``SparsePrefillLM.sparse_stats()`` returns it for
callers that run ``lm_eval.evaluate`` themselves.

lm-eval 0.4.x has no plugin discovery (no ``lm_eval.models`` entry points), so ``lm_eval --model
sparseprefill`` only works once this module is imported; the ``sparseprefill-lm-eval`` console
script imports it and then runs lm-eval's own CLI with every flag unchanged.

lm-eval's request cache (``--use_cache``) keys on the request, not on the model arguments: give every
sparse configuration (and the dense baseline) its own cache path, or they will share answers.

The model arguments are parsed in :mod:`sparseprefill.evals.lm_eval_args` (no lm-eval needed there);
its public names are re-exported here.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from ..patchers import PatchStats, patch, stats
from .lm_eval_args import (
    FALSE_WORDS as FALSE_WORDS,
    INLINE_ITEM_SEPARATORS as INLINE_ITEM_SEPARATORS,
    INLINE_KEY_VALUE as INLINE_KEY_VALUE,
    NESTED_FIELD_SEPARATOR as NESTED_FIELD_SEPARATOR,
    NONE_WORDS as NONE_WORDS,
    TRUE_WORDS as TRUE_WORDS,
    SparseConfigPreset,
    SparsePrefillSettings,
    parse_bool,
    parse_sparse_config,
    resolve_profile,
    resolve_settings,
)

__all__ = [
    "INSTALL_HINT",
    "MODEL_NAME",
    "SUPPORTED_LM_EVAL",
    "SparseConfigPreset",
    "SparsePrefillLM",
    "SparsePrefillSettings",
    "main",
    "parse_bool",
    "parse_sparse_config",
    "resolve_profile",
    "resolve_settings",
]

# The name users pass as ``--model`` / ``simple_evaluate(model=...)``.
MODEL_NAME = "sparseprefill"

INSTALL_HINT = 'pip install "sparseprefill[lm-eval]"'

# lm-eval's CLI attaches its handler to the "lm_eval" logger only (and stops propagation), so a
# child of it is the logger whose INFO lines appear in a plain ``lm_eval`` run's output.
logger = logging.getLogger("lm_eval.sparseprefill")

# lm-eval releases before 0.4.10 fail to import under transformers 5 (which sparseprefill requires):
# they read transformers.AutoModelForVision2Seq, removed in 5.0. pyproject's extra pins the same range.
SUPPORTED_LM_EVAL = "lm-eval>=0.4.10,<0.5"

try:  # lm-eval is an optional extra; without it only the argument parsing (lm_eval_args) is usable.
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    _LM_EVAL_IMPORT_ERROR: Exception | None = None
# AttributeError: an old lm-eval under transformers 5 (see SUPPORTED_LM_EVAL) breaks at import.
except (ImportError, AttributeError) as error:  # pragma: no cover - only where lm-eval is absent/broken
    _LM_EVAL_IMPORT_ERROR = error


def _require_lm_eval() -> None:
    if _LM_EVAL_IMPORT_ERROR is not None:
        raise ImportError(
            f"the sparseprefill lm-eval model needs lm-evaluation-harness ({SUPPORTED_LM_EVAL}) and its "
            f"Hugging Face backend; importing it failed ({type(_LM_EVAL_IMPORT_ERROR).__name__}: "
            f"{_LM_EVAL_IMPORT_ERROR}). Install it with: {INSTALL_HINT}"
        ) from _LM_EVAL_IMPORT_ERROR


def summarize(report: Mapping[str, Any]) -> str:
    """One log line from ``SparsePrefillLM.sparse_report()``."""
    if report["mode"] == "dense":
        return "sparseprefill: dense baseline (model not patched)"
    density = report.get("density")
    phases = report.get("phases") or {}
    fallbacks = report.get("fallbacks") or {}
    sparse_calls = sum(count for phase, count in phases.items() if phase != "dense")
    line = (
        f"sparseprefill: {report['model_type']} pattern={report['pattern']} "
        f"density={'n/a' if density is None else f'{density:.4f}'} over {sparse_calls} sparse attention calls"
    )
    if fallbacks:
        line += "; dense calls: " + ", ".join(f"{reason}={count}" for reason, count in sorted(fallbacks.items()))
    if not sparse_calls:
        min_len = report["config"]["min_sparse_len"]
        why = ("the cost model predicted no gain at these prompt lengths (set min_sparse_len to force sparse)"
               if min_len is None else f"prompts shorter than min_sparse_len={min_len} run dense")
        line += f" (no call took the sparse path: {why})"
    return line


# ----------------------------------------------------------------------------------------------
# The lm-eval model
# ----------------------------------------------------------------------------------------------

if _LM_EVAL_IMPORT_ERROR is None:

    @register_model(MODEL_NAME)
    class SparsePrefillLM(HFLM):
        """lm-eval's ``HFLM`` whose model is patched by ``sparseprefill.patch`` once it has loaded."""

        def __init__(
            self,
            pretrained: Any,
            sparse_config: Any = None,
            profile: Any = None,
            dense: Any = False,
            allow_profile_mismatch: Any = False,
            **kwargs: Any,
        ) -> None:
            # Parse first: a bad argument should fail before minutes of weight loading. These keys
            # must not reach HFLM, which forwards unknown kwargs to from_pretrained.
            self._sparse_settings = resolve_settings(sparse_config, profile, dense, allow_profile_mismatch)
            super().__init__(pretrained=pretrained, **kwargs)
            settings = self._sparse_settings
            if settings.dense:
                logger.info("sparseprefill: dense=true, running %s unpatched", type(self.model).__name__)
                return
            target = self._patch_target()
            patch(
                target, settings.config, profile=settings.profile,
                allow_profile_mismatch=settings.allow_profile_mismatch,
            )
            logger.info(
                "sparseprefill: patched %s (pattern=%s, min_sparse_len=%s%s)",
                type(target).__name__, settings.config.pattern.value, settings.config.min_sparse_len,
                f", profile={settings.profile_source}" if settings.profile is not None else "",
            )

        def _patch_target(self) -> Any:
            # With peft=..., HFLM wraps the causal LM in a PeftModel; the attention lives in the base.
            model = self.model
            get_base_model = getattr(model, "get_base_model", None)
            return get_base_model() if callable(get_base_model) else model

        @property
        def sparse_settings(self) -> SparsePrefillSettings:
            return self._sparse_settings

        def sparse_stats(self) -> PatchStats | None:
            """``sparseprefill.stats`` of the model since it was patched; ``None`` under ``dense=true``."""
            if self._sparse_settings.dense:
                return None
            return stats(self._patch_target())

        def sparse_report(self) -> dict[str, Any]:
            """JSON-ready: mode, the config in force, the profile's source, and the density taken."""
            settings = self._sparse_settings
            report: dict[str, Any] = {
                "mode": "dense" if settings.dense else "sparse",
                "config": settings.config.to_dict(),
                "profile": settings.profile_source,
            }
            patch_stats = self.sparse_stats()
            if patch_stats is not None:
                report.update(patch_stats.to_dict())
            return report

        def get_model_info(self) -> dict:
            # simple_evaluate calls this once, after every request has run, and stores the result in
            # results["config"]: the natural place to log and record the density that was used.
            info = super().get_model_info()
            report = self.sparse_report()
            logger.info(summarize(report))
            info[MODEL_NAME] = report
            return info

else:  # pragma: no cover - exercised only where lm-eval is absent

    class SparsePrefillLM:  # type: ignore[no-redef]
        """Placeholder so the module imports without lm-eval; using it explains what to install."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _require_lm_eval()


def _cli_entry():
    """lm-eval's console-script function for the installed release."""
    _require_lm_eval()
    from lm_eval import __main__ as lm_eval_main

    # 0.4.x (0.4.10 to 0.4.13 at least) names its console script lm_eval.__main__:cli_evaluate.
    entry = getattr(lm_eval_main, "cli_evaluate", None)
    if entry is None:
        raise ImportError(
            "this lm-eval release has no lm_eval.__main__.cli_evaluate (found: "
            f"{', '.join(n for n in dir(lm_eval_main) if not n.startswith('_'))}); "
            f"sparseprefill supports {SUPPORTED_LM_EVAL}: {INSTALL_HINT}"
        )
    return entry


def main() -> None:
    """``sparseprefill-lm-eval``: lm-eval's own CLI with the ``sparseprefill`` model registered.

    This module is imported by the time ``main`` runs, so ``--model sparseprefill`` resolves; every
    argument is lm-eval's (``sparseprefill-lm-eval --help`` prints lm-eval's help)."""
    _cli_entry()()


if __name__ == "__main__":
    main()
