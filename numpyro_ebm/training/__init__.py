"""Training: a pure step (:func:`build_trainer`), a thin loop (:func:`run`), host-side
callbacks (:mod:`~numpyro_ebm.training.callbacks`) and the convenience :func:`fit`."""

from numpyro_ebm.training import callbacks, labels, penalties
from numpyro_ebm.training.callbacks import (
    EnergyDivergenceWarning,
    NonFiniteError,
    WeightDegeneracyWarning,
)
from numpyro_ebm.training.fit import METHODS, FitResult, fit
from numpyro_ebm.training.loop import CallbackFailedWarning, RunResult, run
from numpyro_ebm.training.trainer import Trainer, TrainInfo, TrainState, build_trainer

__all__ = [
    "callbacks",
    "penalties",
    "labels",
    "build_trainer",
    "Trainer",
    "TrainState",
    "TrainInfo",
    "run",
    "RunResult",
    "fit",
    "FitResult",
    "METHODS",
    "NonFiniteError",
    "WeightDegeneracyWarning",
    "EnergyDivergenceWarning",
    "CallbackFailedWarning",
]
