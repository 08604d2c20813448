"""numpyro-ebm: train energy-based models by their cross-entropy with Jarzynski-weighted
Langevin walkers (Carbone, Hua, Coste, Vanden-Eijnden, NeurIPS 2023).

The core (``kernels``, ``training``, ``estimators``) is imported here; ``diagnostics``,
``datasets``, ``potentials``, ``distributions`` and ``experiments`` load on first use
(``numpyro_ebm.diagnostics`` works without importing it first)."""

import importlib

from numpyro_ebm import jarzynski_ula, kernels, training
from numpyro_ebm.estimators import ce_estimate, ce_grad
from numpyro_ebm.kernels.base import JarzynskiInfo, JarzynskiState, WalkerKernel
from numpyro_ebm.normalizer import LogNormalizerBoundsWarning, LogNormalizerEstimate, estimate_log_normalizer
from numpyro_ebm.training import (
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

__version__ = "0.1.0.dev0"

_LAZY_MODULES = ("diagnostics", "datasets", "potentials", "distributions", "experiments", "sharding",
                 "checkpoint", "step_size")
_LAZY_NAMES = {"EnergyBased": "distributions", "energy_based_from_fit": "distributions"}


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"numpyro_ebm.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"numpyro_ebm.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'numpyro_ebm' has no attribute {name!r}")


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
