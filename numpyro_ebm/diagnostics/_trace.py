"""Reading a :func:`numpyro_ebm.fit` result: shared by the ArviZ export and the plots."""

from __future__ import annotations

from typing import Any

import numpy as np

from numpyro_ebm.diagnostics.weights import pareto_khat
from numpyro_ebm.train import FitResult


def check_fit_result(result: Any) -> FitResult:
    """``result`` itself, once checked to be a ``FitResult`` with a trace recorded by ``fit``."""
    if not isinstance(result, FitResult):
        raise TypeError(
            f"`result` must be the FitResult returned by numpyro_ebm.fit, got "
            f"{type(result).__name__}"
        )
    if "grad_norm" not in result.trace:
        raise ValueError("`result.trace` has no `grad_norm`: not a trace recorded by fit")
    return result


def snapshot_khat(trace: dict[str, Any]) -> np.ndarray | None:
    """Pareto k-hat at the snapshot iterations (recorded, or computed now); ``None`` when the
    trace holds no snapshots of the weights before resampling."""
    snaps = trace.get("snapshots")
    if not snaps or "log_weights_before_resampling" not in snaps:
        return None
    if "pareto_k" in snaps:
        return np.asarray(snaps["pareto_k"], dtype=np.float64)
    return np.asarray(pareto_khat(snaps["log_weights_before_resampling"]), dtype=np.float64)
