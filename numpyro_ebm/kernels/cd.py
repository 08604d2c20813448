r"""Contrastive divergence (CD): unweighted ULA walkers restarted from the data.

CD-:math:`k` (Hinton 2002) starts the negative chains at data points at every parameter
update and runs :math:`k` ULA moves (``num_mcmc_steps``). The walkers then stay near the data
whatever the model, so the estimate of :math:`E_{\rho_\theta}[\nabla_\theta U]` is biased
towards the data's own proportions. ``restart_every > 1`` restarts only every so many
updates (between CD and PCD).
"""

from __future__ import annotations

from typing import Any

import jax
from blackjax.base import SamplingAlgorithm

from numpyro_ebm import _checks
from numpyro_ebm.kernels import ula
from numpyro_ebm.kernels.base import (
    ArrayTree,
    JarzynskiState,
    PotentialFn,
    WalkerKernel,
    sampling_algorithm,
)
from numpyro_ebm.kernels.ula import init

__all__ = ["init", "restart_from_data", "build_kernel", "as_top_level_api", "walker_kernel"]


def restart_from_data(
    rng_key: jax.Array,
    state: JarzynskiState,
    params: ArrayTree,
    data: ArrayTree,
    potential_fn: PotentialFn,
    batch_size: int | None = None,
) -> JarzynskiState:
    """Walkers at ``N`` data points drawn uniformly with replacement (one evaluation per
    walker), equal weights, for ``params``."""
    n_walkers = state.log_weights.shape[0]
    n_data = jax.tree.leaves(data)[0].shape[0]
    idx = jax.random.randint(rng_key, (n_walkers,), 0, n_data)
    return init(jax.tree.map(lambda leaf: leaf[idx], data), params, potential_fn, batch_size)


def build_kernel(
    potential_fn: PotentialFn,
    step_size: float,
    num_mcmc_steps: int = 1,
    batch_size: int | None = None,
    noise_dtype: Any = None,
    param_grad: bool = False,
    param_grad_factor=None,
):
    """``kernel(rng_key, state, data, params=None, step_size=None)``: restart the walkers
    from ``data`` (:func:`restart_from_data`), then ``num_mcmc_steps`` unweighted ULA moves
    (:func:`numpyro_ebm.kernels.ula.build_kernel`)."""
    move = ula.build_kernel(potential_fn, step_size, num_mcmc_steps, batch_size, noise_dtype, param_grad,
                            param_grad_factor)

    def kernel(rng_key, state, data, params=None, step_size=None):
        params = state.params if params is None else params
        restart_key, move_key = jax.random.split(rng_key)
        state = restart_from_data(restart_key, state, params, data, potential_fn, batch_size)
        return move(move_key, state, params, step_size)

    return kernel


def as_top_level_api(
    potential_fn: PotentialFn,
    params: ArrayTree,
    step_size: float,
    data: ArrayTree,
    num_mcmc_steps: int = 1,
    batch_size: int | None = None,
    noise_dtype: Any = None,
) -> SamplingAlgorithm:
    """CD walkers as a ``blackjax.SamplingAlgorithm``: each ``step(rng_key, state,
    params=None)`` restarts from ``data`` and moves ``num_mcmc_steps`` times."""
    kernel = build_kernel(potential_fn, step_size, num_mcmc_steps, batch_size, noise_dtype)
    return sampling_algorithm(kernel, init, params, potential_fn, batch_size, data)


def walker_kernel(
    step_size: float,
    *,
    restart_every: int = 1,
    num_mcmc_steps: int = 1,
    walker_batch_size: int | None = None,
    noise_dtype: Any = None,
) -> WalkerKernel:
    """CD walkers for the trainer: at iterations ``k`` with ``k % restart_every == 0`` the
    walkers restart from the iteration's data batch, then move as PCD's do."""
    restart_every = _checks.check_int_at_least("restart_every", restart_every, 1)
    pcd = ula.walker_kernel(step_size, num_mcmc_steps=num_mcmc_steps, walker_batch_size=walker_batch_size,
                            noise_dtype=noise_dtype)

    def restart(potential_fn, rng_key, state, params, batch, iteration):
        def from_data(_):
            return restart_from_data(rng_key, state, params, batch, potential_fn, walker_batch_size)

        return jax.lax.cond(iteration % restart_every == 0, from_data, lambda _: state, None)

    return pcd._replace(restart=restart, name="cd", config={**pcd.config, "restart_every": restart_every})


