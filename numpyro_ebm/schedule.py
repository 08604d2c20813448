"""Old import path of :mod:`numpyro_ebm.step_size` (step-size control), kept so that code
written against earlier versions keeps working."""

from numpyro_ebm.step_size import (  # noqa: F401
    StepSizeAdaptation,
    StepSizeState,
    acceptance_proxy,
    step_size_adaptation,
)

__all__ = ["acceptance_proxy", "StepSizeState", "StepSizeAdaptation", "step_size_adaptation"]
