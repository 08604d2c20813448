"""numpyro-ebm: train energy-based models by their cross-entropy with Jarzynski-weighted
Langevin walkers (Carbone, Hua, Coste, Vanden-Eijnden, NeurIPS 2023).

Every public name and module loads on first use (``numpyro_ebm.fit``,
``numpyro_ebm.diagnostics`` work without importing anything first), so that importing the
package computes nothing: a multi-process run joins the other processes
(:func:`numpyro_ebm.distributed.initialize`) before JAX starts."""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

# Everything loads on first use, so that ``import numpyro_ebm`` touches no device: a
# multi-process run must call numpyro_ebm.distributed.initialize (jax.distributed) before
# any JAX computation, and importing BlackJAX (which the kernels use) computes.
_LAZY_MODULES = ("jarzynski_ula", "kernels", "training", "estimators", "normalizer",
                 "diagnostics", "datasets", "potentials", "distributions", "experiments", "sharding",
                 "distributed", "checkpoint", "step_size")
_LAZY_NAMES = {
    "EnergyBased": "distributions", "energy_based_from_fit": "distributions",
    "ce_estimate": "estimators", "ce_grad": "estimators",
    "JarzynskiInfo": "kernels.base", "JarzynskiState": "kernels.base", "WalkerKernel": "kernels.base",
    "LogNormalizerEstimate": "normalizer", "estimate_log_normalizer": "normalizer",
    "LogNormalizerBoundsWarning": "normalizer",
    **{name: "training" for name in (
        "EnergyDivergenceWarning", "FitResult", "NonFiniteError", "Trainer", "TrainInfo", "TrainState",
        "WeightDegeneracyWarning", "build_trainer", "fit", "run")},
}

if TYPE_CHECKING:  # the names, for type checkers and readers
    from numpyro_ebm import jarzynski_ula, kernels, training  # noqa: F401
    from numpyro_ebm.estimators import ce_estimate, ce_grad  # noqa: F401
    from numpyro_ebm.kernels.base import JarzynskiInfo, JarzynskiState, WalkerKernel  # noqa: F401
    from numpyro_ebm.normalizer import (  # noqa: F401
        LogNormalizerBoundsWarning,
        LogNormalizerEstimate,
        estimate_log_normalizer,
    )
    from numpyro_ebm.training import (  # noqa: F401
        EnergyDivergenceWarning,
        FitResult,
        NonFiniteError,
        Trainer,
        TrainInfo,
        TrainState,
        WeightDegeneracyWarning,
        build_trainer,
        fit,
        run,
    )


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"numpyro_ebm.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"numpyro_ebm.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'numpyro_ebm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))


__all__ = [
    "jarzynski_ula",
    "kernels",
    "training",
    "potentials",
    "diagnostics",
    "datasets",
    "EnergyBased",
    "energy_based_from_fit",
    "JarzynskiState",
    "JarzynskiInfo",
    "WalkerKernel",
    "ce_grad",
    "ce_estimate",
    "fit",
    "FitResult",
    "build_trainer",
    "run",
    "Trainer",
    "TrainState",
    "TrainInfo",
    "WeightDegeneracyWarning",
    "EnergyDivergenceWarning",
    "NonFiniteError",
    "estimate_log_normalizer",
    "LogNormalizerBoundsWarning",
    "LogNormalizerEstimate",
]
