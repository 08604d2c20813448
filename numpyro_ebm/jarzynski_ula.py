"""The earlier import path of the Jarzynski-weighted ULA kernel, kept for code written
against it: everything here lives in :mod:`numpyro_ebm.kernels` now
(:mod:`~numpyro_ebm.kernels.jarzynski_ula` for the kernel,
:mod:`~numpyro_ebm.kernels.adaptive_jarzynski_ula` for ``build_adaptive_kernel``)."""

from numpyro_ebm.kernels.adaptive_jarzynski_ula import AdaptiveJarzynskiInfo, conditional_log_ess
from numpyro_ebm.kernels.adaptive_jarzynski_ula import build_kernel as build_adaptive_kernel
from numpyro_ebm.kernels.base import (
    JarzynskiInfo,
    JarzynskiState,
    PotentialFn,
    log_weight_increment,
)
from numpyro_ebm.kernels.evaluation import potential_and_grad, weighted_param_grad
from numpyro_ebm.kernels.jarzynski_ula import as_top_level_api, build_kernel, init
from numpyro_ebm.kernels.langevin import standard_normal, ula_proposal

__all__ = [
    "JarzynskiState",
    "JarzynskiInfo",
    "AdaptiveJarzynskiInfo",
    "PotentialFn",
    "init",
    "build_kernel",
    "build_adaptive_kernel",
    "as_top_level_api",
    "conditional_log_ess",
    "potential_and_grad",
    "log_weight_increment",
    "ula_proposal",
    "weighted_param_grad",
    "standard_normal",
]
