"""A summary of a sequence of kernel infos, for the BlackJAX route.

``blackjax.util.run_inference_algorithm`` (or a user's ``lax.scan``) stacks the kernel's
``JarzynskiInfo`` over calls; :func:`summarize_infos` turns them into a few numbers and
issues the same :class:`~numpyro_ebm.errors.WeightDegeneracyWarning` that ``fit`` issues
(ESS below a floor for a while, or resampling at most calls), so that a sampler whose every
step resamples does not go unnoticed.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from numpyro_ebm import _checks
from numpyro_ebm.errors import WeightDegeneracyWarning

__all__ = ["summarize_infos"]


def summarize_infos(
    infos: Any, num_walkers: int, *, ess_floor: float | None = 0.05, patience: int = 20,
    warn: bool = True,
) -> dict[str, Any]:
    """``infos``: kernel infos stacked over calls (leading axis). Returns ``num_calls``,
    ``num_resampled``, ``resampling_rate``, ``min_normalized_ess``,
    ``mean_normalized_ess``, ``num_nonfinite`` (summed) and ``degenerate`` (the warning's
    text or ``None``); with ``warn`` the warning is issued."""
    from numpyro_ebm.training.callbacks import degeneracy_message

    _checks.check_int_at_least("num_walkers", num_walkers, 1)
    ess = np.atleast_1d(np.asarray(infos.ess, np.float64)) / num_walkers
    resampled = np.atleast_1d(np.asarray(infos.resampled)).astype(bool)
    trace = {"normalized_ess": ess, "resampled": resampled}
    patience = min(patience, max(1, ess.size))
    message = degeneracy_message(trace, ess_floor, None, patience) if ess.size else None
    if message is None and ess.size and resampled.mean() >= 0.5 and ess.size < 100:
        message = (f"Jarzynski weights degenerate: resampled in {int(resampled.sum())} of "
                   f"{ess.size} calls. Lower the step size or move the parameters less per call.")
    if message is not None and warn:
        warnings.warn(message, WeightDegeneracyWarning, stacklevel=2)
    return {
        "num_calls": int(ess.size),
        "num_resampled": int(resampled.sum()),
        "resampling_rate": float(resampled.mean()) if ess.size else 0.0,
        "min_normalized_ess": float(ess.min()) if ess.size else float("nan"),
        "mean_normalized_ess": float(ess.mean()) if ess.size else float("nan"),
        "num_nonfinite": int(np.sum(np.asarray(infos.num_nonfinite))),
        "degenerate": message,
    }
