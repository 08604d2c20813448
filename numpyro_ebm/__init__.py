"""numpyro-ebm: train energy-based models by their cross-entropy with Jarzynski-weighted
Langevin walkers (Carbone, Hua, Coste, Vanden-Eijnden, NeurIPS 2023)."""

from numpyro_ebm import jarzynski_ula, potentials
from numpyro_ebm.distributions import EnergyBased, energy_based_from_fit
from numpyro_ebm.estimators import ce_estimate, ce_grad
from numpyro_ebm.jarzynski_ula import JarzynskiInfo, JarzynskiState
from numpyro_ebm.normalizer import LogNormalizerEstimate, estimate_log_normalizer
from numpyro_ebm.train import (
    EnergyDivergenceWarning,
    FitResult,
    NonFiniteError,
    WeightDegeneracyWarning,
    fit,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "jarzynski_ula",
    "potentials",
    "EnergyBased",
    "energy_based_from_fit",
    "JarzynskiState",
    "JarzynskiInfo",
    "ce_grad",
    "ce_estimate",
    "fit",
    "FitResult",
    "WeightDegeneracyWarning",
    "EnergyDivergenceWarning",
    "NonFiniteError",
    "estimate_log_normalizer",
    "LogNormalizerEstimate",
]
