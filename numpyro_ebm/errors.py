"""The warnings and errors of training and of the walker kernels (one place, so that
kernels, the loop and the callbacks share them without importing each other)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "WeightDegeneracyWarning",
    "EnergyDivergenceWarning",
    "SubstepLimitWarning",
    "InitialWalkersWarning",
    "CallbackFailedWarning",
    "NonFiniteError",
]


class WeightDegeneracyWarning(RuntimeWarning):
    """The Jarzynski weights stayed degenerate (issued once per run)."""


class EnergyDivergenceWarning(RuntimeWarning):
    """The energies grew without bound (issued once per run)."""


class SubstepLimitWarning(RuntimeWarning):
    """The adaptive schedule used all ``max_substeps`` sub-steps and still broke its
    conditional-ESS target: the parameter steps are too large for the walkers."""


class InitialWalkersWarning(UserWarning):
    """Weighted walkers started from a default distribution that need not be the initial
    model :math:`\\rho_{\\theta_0}`; the weights assume they are its draws."""


class CallbackFailedWarning(RuntimeWarning):
    """A callback failed after training; the run's result is returned all the same."""


class NonFiniteError(FloatingPointError):
    """Training cannot go on; ``result`` holds the last good state and the trace up to it
    (a ``RunResult`` from ``run``, a ``FitResult`` from ``fit``)."""

    def __init__(self, message: str, result: Any):
        super().__init__(message)
        self.result = result
