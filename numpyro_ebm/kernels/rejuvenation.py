r"""Resample-move: MALA moves at fixed parameters after a resampling (rejuvenation).

Resampling duplicates the walkers with large weights; ULA moves at the next parameters
spread the copies only slowly, and under a parameter that keeps moving the weights
re-degenerate before they have. After a resampling, :func:`mala_moves` runs ``num_moves``
Metropolis-adjusted Langevin moves (BlackJAX's ``mala`` kernel, target
:math:`\rho_\theta \propto e^{-U_\theta}` at the *current* :math:`\theta`) on every walker.

Each MALA move leaves :math:`\rho_\theta` invariant, so for any weights :math:`w_i`,
:math:`E[\sum_i w_i f(X'^i)] = \sum_i w_i (Kf)(X^i) \approx E_{\rho_\theta}[Kf] = E_{\rho_\theta}[f]`:
the weights stay as they are and the weighted estimates stay exact in expectation, while
the copies made by resampling move apart (Gilks and Berzuini 2001; Chopin 2002). The
log-normaliser estimate is untouched. The MALA step size starts from the kernel's ULA step
size :math:`h` at each call and is adapted between the moves of the call towards
``target_acceptance`` (a Robbins-Monro step on :math:`\log h` from the weighted acceptance
of the previous move: each move, given its step size, is still :math:`\rho_\theta`-invariant).
The walkers' parameter gradient is then recomputed at the moved walkers (one more
evaluation, only on the iterations that resample).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from blackjax.mcmc import mala

from numpyro_ebm import _checks
from numpyro_ebm.kernels.base import ArrayTree, JarzynskiState, PotentialFn, WalkerKernel
from numpyro_ebm.kernels.evaluation import weighted_param_grad
from numpyro_ebm.kernels.jarzynski_ula import scaled

__all__ = ["RejuvenatedInfo", "mala_moves", "with_rejuvenation"]


class RejuvenatedInfo(NamedTuple):
    """The inner kernel's info (``inner``; its fields are readable here too) and what the
    rejuvenation did: ``rejuvenated`` (MALA moves were made), ``mala_acceptance`` (weighted
    mean acceptance over the moves; NaN when none), ``mala_step_size`` (the last move's
    step size), ``param_grad`` (the walker term at the returned state)."""

    inner: Any
    rejuvenated: jax.Array
    mala_acceptance: jax.Array
    mala_step_size: jax.Array
    param_grad: ArrayTree = None

    def __getattr__(self, name):  # the inner info's fields (ess, resampled, ...)
        return getattr(self.inner, name)


def mala_moves(
    rng_key: jax.Array,
    state: JarzynskiState,
    potential_fn: PotentialFn,
    step_size: jax.Array,
    num_moves: int,
    target_acceptance: float | None = 0.57,
    adaptation_rate: float = 1.0,
) -> tuple[JarzynskiState, jax.Array, jax.Array]:
    """``num_moves`` MALA moves of every walker at ``state.params`` (weights unchanged),
    starting from the cached :math:`U, \\nabla U` (no extra evaluation to start). Returns
    the moved state, the weighted mean acceptance over the moves, and the last step size.
    With ``target_acceptance`` the step size follows
    :math:`\\log h \\leftarrow \\log h + r\\,(\\bar a - a^*)` between moves (``r`` =
    ``adaptation_rate``)."""
    params = state.params
    weights = jnp.exp(state.log_weights)
    kernel = mala.build_kernel()

    def logdensity(x):
        return -potential_fn(params, x)

    def one(carry, key):
        walkers, log_h = carry
        keys = jax.random.split(key, weights.shape[0])
        step = jnp.exp(log_h)
        walkers, info = jax.vmap(lambda k, s: kernel(k, s, logdensity, step))(keys, walkers)
        rate = jnp.where(jnp.isfinite(info.acceptance_rate), info.acceptance_rate, 0.0)
        accepted = jnp.sum(weights * rate)
        if target_acceptance is not None:
            log_h = log_h + adaptation_rate * (accepted - target_acceptance)
        return (walkers, log_h), (accepted, step)

    start = mala.MALAState(state.particles, -state.potential, jax.tree.map(jnp.negative, state.grad))
    log_h0 = jnp.log(jnp.asarray(step_size, state.potential.dtype))
    (walkers, _), (acceptance, steps) = jax.lax.scan(
        one, (start, log_h0), jax.random.split(rng_key, num_moves)
    )
    moved = state._replace(particles=walkers.position, potential=-walkers.logdensity,
                           grad=jax.tree.map(jnp.negative, walkers.logdensity_grad))
    return moved, jnp.mean(acceptance), steps[-1]


def with_rejuvenation(
    kernel: WalkerKernel,
    num_moves: int = 5,
    *,
    target_acceptance: float | None = 0.57,
    walker_batch_size: int | None = None,
) -> WalkerKernel:
    """``kernel`` (a weighted walker kernel) followed, on the calls that resampled, by
    ``num_moves`` MALA moves at the new parameters (:func:`mala_moves`); the walker term of
    the next gradient is recomputed at the moved walkers. The info becomes a
    :class:`RejuvenatedInfo`; the trainer records ``rejuvenated`` and ``mala_acceptance``."""
    if not isinstance(kernel, WalkerKernel):
        raise TypeError(f"`kernel` must be a WalkerKernel, got {type(kernel).__name__}")
    if not kernel.weighted:
        raise ValueError(f"`kernel` must be weighted (it resamples); {kernel.name!r} is not")
    num_moves = _checks.check_int_at_least("num_moves", num_moves, 1)
    if target_acceptance is not None:
        _checks.check_fraction("target_acceptance", target_acceptance, closed_right=False)

    def step(potential_fn, rng_key, state, params, step_size, param_grad_factor=None):
        inner_key, move_key = jax.random.split(rng_key)
        extra = {} if param_grad_factor is None else {"param_grad_factor": param_grad_factor}
        state, info = kernel.step(potential_fn, inner_key, state, params, step_size, **extra)

        def rejuvenate(_):
            moved, acceptance, last = mala_moves(move_key, state, potential_fn, step_size, num_moves,
                                                 target_acceptance)
            coefficients = scaled(jnp.exp(moved.log_weights), moved.potential, param_grad_factor)
            grad = weighted_param_grad(potential_fn, params, moved.particles, coefficients,
                                       walker_batch_size)
            return moved, grad, acceptance, last

        def keep(_):
            nan = jnp.full((), jnp.nan, state.potential.dtype)
            return state, info.param_grad, nan, jnp.asarray(step_size, state.potential.dtype)

        state, grad, acceptance, last = jax.lax.cond(info.resampled, rejuvenate, keep, None)
        return state, RejuvenatedInfo(info._replace(param_grad=None), info.resampled, acceptance,
                                      last, grad)

    config = {**kernel.config, "rejuvenation_moves": num_moves,
              "rejuvenation_target_acceptance": target_acceptance}
    return kernel._replace(step=step, name=f"{kernel.name}+mala", config=config)


