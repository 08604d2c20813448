"""The earlier import path of :func:`fit` and its result and warning types, kept for code
written against it; see :mod:`numpyro_ebm.training`."""

from numpyro_ebm.training.callbacks import (
    EnergyDivergenceWarning,
    NonFiniteError,
    WeightDegeneracyWarning,
)
from numpyro_ebm.training.fit import METHODS, FitResult, fit

__all__ = [
    "fit",
    "FitResult",
    "METHODS",
    "WeightDegeneracyWarning",
    "EnergyDivergenceWarning",
    "NonFiniteError",
]
