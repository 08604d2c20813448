"""Walker kernels, one algorithm per module, each with ``init``, ``build_kernel`` and
``as_top_level_api`` (BlackJAX's interface; every kernel returns ``(state, info)``) and a
``walker_kernel`` constructor for the trainer:

* :mod:`~numpyro_ebm.kernels.jarzynski_ula`: Jarzynski-weighted ULA walkers (the paper);
* :mod:`~numpyro_ebm.kernels.adaptive_jarzynski_ula`: the same with ESS-controlled
  parameter sub-steps;
* :mod:`~numpyro_ebm.kernels.ula`: unweighted ULA walkers (PCD);
* :mod:`~numpyro_ebm.kernels.cd`: unweighted walkers restarted from the data (CD);
* :mod:`~numpyro_ebm.kernels.rejuvenation`: ``with_rejuvenation(kernel)`` adds MALA moves
  at fixed parameters after each resampling (resample-move).

Shared pieces: :mod:`~numpyro_ebm.kernels.base` (state, info, weight update, resampling),
:mod:`~numpyro_ebm.kernels.evaluation` (energy evaluations),
:mod:`~numpyro_ebm.kernels.langevin` (ULA moves), :mod:`~numpyro_ebm.kernels.resampling`
(systematic resampling without a search).
"""

from numpyro_ebm.kernels import (
    adaptive_jarzynski_ula,
    authors_ula,
    base,
    cd,
    evaluation,
    jarzynski_ula,
    langevin,
    rejuvenation,
    resampling,
    summary,
    ula,
)
from numpyro_ebm.kernels.base import JarzynskiInfo, JarzynskiState, WalkerKernel
from numpyro_ebm.kernels.summary import summarize_infos

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
    "for_method",
    "summary",
    "authors_ula",
    "rejuvenation",
    "resampling",
    "summarize_infos",
]


def for_method(
    method: str,
    step_size: float,
    *,
    ess_threshold: float = 0.5,
    num_mcmc_steps: int = 1,
    schedule: str = "fixed",
    target_ess: float = 0.5,
    max_substeps: int = 10,
    restart_every: int = 1,
    walker_batch_size: int | None = None,
    noise_dtype=None,
    resampling_groups: int | None = None,
    heldout_groups: int = 0,
) -> WalkerKernel:
    """The kernel object of a method named by a string, with the settings that apply to it
    (the experiments' and the command line's way of choosing one): ``"jarzynski"``
    (``schedule="adaptive"`` for ESS-controlled sub-steps), ``"pcd"`` or ``"cd"``; the
    settings that do not apply to the method are ignored (``resampling_groups``: island
    resampling of the fixed-schedule Jarzynski kernel, ``heldout_groups``: islands left out of
    its parameter gradient, :func:`jarzynski_ula.build_kernel`)."""
    shared = dict(num_mcmc_steps=num_mcmc_steps, walker_batch_size=walker_batch_size, noise_dtype=noise_dtype)
    if method == "jarzynski":
        if schedule not in ("fixed", "adaptive"):
            raise ValueError(f"`schedule` must be 'fixed' or 'adaptive', got {schedule!r}")
        if schedule == "adaptive":
            return adaptive_jarzynski_ula.walker_kernel(
                step_size, target_ess=target_ess, max_substeps=max_substeps,
                ess_threshold=ess_threshold, **shared)
        return jarzynski_ula.walker_kernel(step_size, ess_threshold=ess_threshold,
                                           resampling_groups=resampling_groups, heldout_groups=heldout_groups,
                                           **shared)
    if method == "pcd":
        return ula.walker_kernel(step_size, **shared)
    if method == "cd":
        return cd.walker_kernel(step_size, restart_every=restart_every, **shared)
    raise ValueError(f"`method` must be one of ('jarzynski', 'pcd', 'cd'), got {method!r}")
