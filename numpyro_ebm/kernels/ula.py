r"""Unweighted ULA walkers: the persistent contrastive divergence (PCD) kernel.

The same moves as :mod:`numpyro_ebm.kernels.jarzynski_ula`,
:math:`X' = X - h \nabla U(X) + \sqrt{2h}\,\xi`, with the weights kept equal. The walkers
then follow the model only as far as the ULA chain has mixed (and up to ULA's
discretisation bias), so :math:`\frac1N \sum_i \nabla_\theta U(X^i)` is a biased estimate
of :math:`E_{\rho_\theta}[\nabla_\theta U]`: this is what the Jarzynski weights correct. Kept
as a kernel so that PCD and Jarzynski training are one choice of kernel object.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from numpyro_ebm.kernels import jarzynski_ula
from numpyro_ebm.kernels.base import (
    ArrayTree,
    JarzynskiState,
    PotentialFn,
    WalkerKernel,
    dtype_name,
    moves_info,
    num_walkers,
    resolve_step_size,
    sampling_algorithm,
)
from numpyro_ebm.kernels.evaluation import keep_or_recompute, weighted_param_grad
from numpyro_ebm.kernels.jarzynski_ula import check_move_args, scaled
from numpyro_ebm.kernels.langevin import ula_moves

__all__ = ["init", "build_kernel", "as_top_level_api", "walker_kernel"]


def init(
    particles: ArrayTree,
    params: ArrayTree,
    potential_fn: PotentialFn,
    batch_size: int | None = None,
) -> JarzynskiState:
    """Unweighted walkers at ``particles`` for ``params`` (one evaluation per walker). Their
    ``log_normalizer`` is NaN: unweighted walkers carry no estimate of
    :math:`\\log Z_\\theta / Z_{\\theta_0}` (``ce_estimate`` refuses them)."""
    state = jarzynski_ula.init(particles, params, potential_fn, batch_size)
    return state._replace(log_normalizer=jnp.full_like(state.log_normalizer, jnp.nan))


def build_kernel(
    potential_fn: PotentialFn,
    step_size: float,
    num_mcmc_steps: int = 1,
    batch_size: int | None = None,
    noise_dtype: Any = None,
    param_grad: bool = False,
    param_grad_factor=None,
):
    """Build the unweighted ULA kernel: ``kernel(rng_key, state, params=None,
    step_size=None) -> (JarzynskiState, JarzynskiInfo)`` with equal weights, ESS ``N``, no
    resampling and no log-normaliser estimate (NaN). Arguments as in
    :func:`numpyro_ebm.kernels.jarzynski_ula.build_kernel`; with ``param_grad`` the walker
    term :math:`\\frac1N \\sum_i \\nabla_\\theta U(X^i)` comes from the move's own
    evaluation (one forward and one backward pass)."""
    num_mcmc_steps = check_move_args(step_size, num_mcmc_steps, batch_size, noise_dtype)
    default_step_size = step_size
    fused = param_grad and batch_size is None

    def kernel(rng_key, state, params=None, step_size=None):
        params = state.params if params is None else params
        h = resolve_step_size(default_step_size, step_size, state.potential.dtype)
        move_key, _ = jax.random.split(rng_key)  # the second key is the weighted kernels' resampling key
        state, record = ula_moves(
            move_key, state, params, potential_fn, h, num_mcmc_steps, weighted=False, fused=fused,
            batch_size=batch_size, noise_dtype=noise_dtype,
        )
        state = state._replace(log_normalizer=jnp.full_like(state.log_normalizer, jnp.nan))
        n = num_walkers(state)
        weights = jnp.exp(state.log_weights)
        walker_grad = None
        coefficients = scaled(weights, state.potential, param_grad_factor)
        if fused:
            fused_grad = (jax.tree.map(lambda g: g / n, record.param_sum) if param_grad_factor is None
                          else record.param_vjp(coefficients))
            walker_grad = keep_or_recompute(
                fused_grad,
                ~jnp.any(record.last_nonfinite),
                lambda: weighted_param_grad(potential_fn, params, state.particles, coefficients),
            )
        elif param_grad:
            walker_grad = weighted_param_grad(potential_fn, params, state.particles, coefficients,
                                              batch_size)
        info = moves_info(record, jnp.asarray(n, state.log_weights.dtype), jnp.asarray(False),
                          jnp.arange(n, dtype=jnp.int32), walker_grad)
        return state, info

    return kernel


def as_top_level_api(
    potential_fn: PotentialFn,
    params: ArrayTree,
    step_size: float,
    num_mcmc_steps: int = 1,
    batch_size: int | None = None,
    noise_dtype: Any = None,
) -> SamplingAlgorithm:
    """Unweighted ULA walkers as a ``blackjax.SamplingAlgorithm`` (as
    :func:`numpyro_ebm.kernels.jarzynski_ula.as_top_level_api`, without weights)."""
    kernel = build_kernel(potential_fn, step_size, num_mcmc_steps, batch_size, noise_dtype)
    return sampling_algorithm(kernel, init, params, potential_fn, batch_size)


def walker_kernel(
    step_size: float,
    *,
    num_mcmc_steps: int = 1,
    walker_batch_size: int | None = None,
    noise_dtype: Any = None,
) -> WalkerKernel:
    """PCD walkers for the trainer: persistent, unweighted ULA chains."""
    check_move_args(step_size, num_mcmc_steps, walker_batch_size, noise_dtype, "walker_batch_size")

    def init_fn(potential_fn, particles, params):
        return init(particles, params, potential_fn, walker_batch_size)

    def step_fn(potential_fn, rng_key, state, params, step_size, param_grad_factor=None):
        kernel = build_kernel(potential_fn, default_step_size, num_mcmc_steps, walker_batch_size,
                              noise_dtype, param_grad=True, param_grad_factor=param_grad_factor)
        return kernel(rng_key, state, params, step_size)

    default_step_size = step_size
    config = dict(step_size=step_size, num_mcmc_steps=num_mcmc_steps, walker_batch_size=walker_batch_size,
                  noise_dtype=dtype_name(noise_dtype))
    return WalkerKernel(init_fn, step_fn, None, False, step_size, "pcd", config)
