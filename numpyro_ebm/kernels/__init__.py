"""Walker kernels, one algorithm per module, each with ``init``, ``build_kernel`` and
``as_top_level_api`` (BlackJAX's interface; every kernel returns ``(state, info)``) and a
``walker_kernel`` constructor for the trainer:

* :mod:`~numpyro_ebm.kernels.jarzynski_ula`: Jarzynski-weighted ULA walkers (the paper);
* :mod:`~numpyro_ebm.kernels.adaptive_jarzynski_ula`: the same with ESS-controlled
  parameter sub-steps;
* :mod:`~numpyro_ebm.kernels.ula`: unweighted ULA walkers (PCD);
* :mod:`~numpyro_ebm.kernels.cd`: unweighted walkers restarted from the data (CD).

Shared pieces: :mod:`~numpyro_ebm.kernels.base` (state, info, weight update, resampling),
:mod:`~numpyro_ebm.kernels.evaluation` (energy evaluations),
:mod:`~numpyro_ebm.kernels.langevin` (ULA moves).
"""

from numpyro_ebm.kernels import adaptive_jarzynski_ula, base, cd, evaluation, jarzynski_ula, langevin, ula
from numpyro_ebm.kernels.base import JarzynskiInfo, JarzynskiState, WalkerKernel

__all__ = [
    "adaptive_jarzynski_ula",
    "base",
    "cd",
    "evaluation",
    "jarzynski_ula",
    "langevin",
    "ula",
    "JarzynskiInfo",
    "JarzynskiState",
    "WalkerKernel",
]
