r"""Jarzynski kernel with an adaptive schedule: ESS-controlled sub-steps along the
parameter path.

The move :math:`\theta_k \to \theta_{k+1}` follows the straight path
:math:`\theta(\lambda) = \theta_k + \lambda(\theta_{k+1} - \theta_k)`. One sub-step from
:math:`\lambda_j`:

1. ULA move :math:`X \to X'` under :math:`\theta(\lambda_j)` (cached gradient);
2. one evaluation of :math:`U_{\theta_{k+1}}, \nabla U_{\theta_{k+1}}` at :math:`X'`;
3. prediction of the Jarzynski increment for going the fraction :math:`f` of the remaining
   way: :math:`U` and :math:`\nabla U` at :math:`X'` interpolated linearly in :math:`f`
   between :math:`\theta(\lambda_j)` (first order from the cached values at :math:`X`) and
   :math:`\theta_{k+1}` (step 2), put into :math:`\Delta A(f) = \alpha_j(X, X') - \alpha_f(X', X)`;
4. :math:`f \in (0, 1]` is the largest fraction whose predicted conditional ESS
   (:func:`conditional_log_ess`) stays at ``target_ess``, by BlackJAX's ``dichotomy``;
5. the exact increment at :math:`\theta(\lambda_j + f(1 - \lambda_j))` (reusing step 2 when
   :math:`f = 1`); while its realised conditional ESS is below target, :math:`f` is halved
   and the evaluation repeated (at most ``max_backtracks`` times);
6. the Jarzynski update to :math:`\theta(\lambda_{j+1})`, ``num_mcmc_steps - 1`` further moves
   there, and resampling when ESS/N < ``ess_threshold``.

The sub-steps run in a ``lax.while_loop`` until :math:`\lambda = 1`; the
``max_substeps``-th goes to :math:`\lambda = 1` whatever the prediction. When the whole move
keeps the conditional ESS above target, a call costs what a
:func:`numpyro_ebm.kernels.jarzynski_ula.build_kernel` call costs; each sub-step and each
backtrack costs one more evaluation per walker. The weights are exact whatever the
prediction does; the prediction only chooses the path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from blackjax.smc.solver import dichotomy
from jax.scipy.special import logsumexp

from numpyro_ebm import _checks
from numpyro_ebm.kernels.base import (
    ArrayTree,
    JarzynskiState,
    PotentialFn,
    WalkerKernel,
    apply_move,
    dtype_name,
    per_walker_dot,
    resample_if_degenerate,
    resolve_step_size,
    ula_transition_energy,
)
from numpyro_ebm.kernels.evaluation import potential_and_grad, weighted_param_grad
from numpyro_ebm.kernels.jarzynski_ula import check_kernel_args, init, scaled
from numpyro_ebm.kernels.langevin import ula_proposal
from numpyro_ebm.kernels.resampling import systematic

__all__ = [
    "AdaptiveJarzynskiInfo",
    "conditional_log_ess",
    "init",
    "build_kernel",
    "walker_kernel",
]


class AdaptiveJarzynskiInfo(NamedTuple):
    """What one adaptive kernel call did.

    ess
        ESS (in walkers) after the last sub-step's weight update, before its resampling.
    resampled
        Whether the walkers were resampled in any sub-step.
    ancestors
        Index of each final walker's ancestor at the start of the call.
    log_normalizer_increment
        Change of the log-normaliser estimate over the whole call.
    log_weight_increments
        :math:`\\Delta A^i` of the last sub-step.
    num_substeps
        Number of sub-steps taken (1 when the whole step kept the ESS above target).
    min_ess
        Smallest ESS after any sub-step's weight update (before its resampling).
    min_conditional_ess
        Smallest realised conditional ESS fraction of the parameter moves.
    num_resampled
        Number of sub-steps that resampled.
    num_evaluations
        Potential evaluations (value and gradient) per walker made by the call.
    log_weights_before_resampling
        Normalised log weights after the last sub-step's update, before its resampling.
    log_weights_before_last_substep
        Normalised log weights the last sub-step started from.
    num_nonfinite
        Largest number of walkers with a non-finite evaluation in one sub-step.
    target_missed
        True when some sub-step's realised conditional ESS stayed below ``target_ess``
        (the backtracks or the ``max_substeps`` ran out, or the ULA move alone broke it):
        the weights are still exact, but the step was larger than the schedule allows.
    param_grad
        With ``param_grad=True``: :math:`\\sum_i w_i \\nabla_\\theta U_{\\theta_{k+1}}(X^i)`
        at the returned state; otherwise ``None``.
    """

    ess: jax.Array
    resampled: jax.Array
    ancestors: jax.Array
    log_normalizer_increment: jax.Array
    log_weight_increments: jax.Array
    num_substeps: jax.Array
    min_ess: jax.Array
    min_conditional_ess: jax.Array
    num_resampled: jax.Array
    num_evaluations: jax.Array
    log_weights_before_resampling: jax.Array
    log_weights_before_last_substep: jax.Array
    num_nonfinite: jax.Array
    target_missed: jax.Array
    param_grad: ArrayTree = None


def conditional_log_ess(log_weights: jax.Array, increments: jax.Array) -> jax.Array:
    """Log of the conditional ESS fraction
    :math:`\\mathrm{CESS}/N = (\\sum_i w_i e^{s_i})^2 / \\sum_i w_i e^{2 s_i} \\in (0, 1]`
    of re-weighting normalised weights ``w = exp(log_weights)`` by ``exp(increments)``
    (Zhou, Johansen and Aston 2016). It is 1 when the increments are equal and does not
    depend on how degenerate ``w`` already is, so it measures the damage of one step."""
    return 2 * logsumexp(log_weights + increments) - logsumexp(log_weights + 2 * increments)


class _Config(NamedTuple):
    potential_fn: PotentialFn
    log_target: jax.Array
    max_substeps: int
    max_backtracks: int
    resampling_fn: Callable
    ess_threshold: float
    num_mcmc_steps: int
    batch_size: int | None
    noise_dtype: Any


class _Substep(NamedTuple):
    """The result of one sub-step."""

    state: JarzynskiState
    lam: jax.Array
    ess: jax.Array
    resampled: jax.Array
    ancestors: jax.Array
    log_normalizer_increment: jax.Array
    log_weight_increments: jax.Array
    conditional_ess: jax.Array
    num_evaluations: jax.Array
    log_weights_before_resampling: jax.Array
    num_nonfinite: jax.Array


class _Carry(NamedTuple):
    """The ``while_loop`` carry over sub-steps."""

    state: JarzynskiState
    lam: jax.Array
    count: jax.Array
    rng_key: jax.Array
    ancestors: jax.Array
    min_ess: jax.Array
    min_conditional_ess: jax.Array
    num_resampled: jax.Array
    log_normalizer_increment: jax.Array
    ess: jax.Array
    log_weight_increments: jax.Array
    num_evaluations: jax.Array
    log_weights_before_resampling: jax.Array
    log_weights_before_last_substep: jax.Array
    num_nonfinite: jax.Array


def _path(start, target, lam):
    """:math:`\\theta(\\lambda)`, exactly ``target`` at ``lam == 1``."""
    return jax.tree.map(
        lambda a, b: jnp.where(lam >= 1.0, b, a + (lam * (b - a)).astype(a.dtype)), start, target
    )


def _predicted_fraction(cfg, st, x_new, u_target, g_target, forward, h, count):
    """Steps 3-4: the largest fraction of the remaining path whose first-order predicted
    conditional ESS stays at target (the whole rest on the last allowed sub-step)."""
    dtype = st.log_weights.dtype
    diff = optax.tree.sub(x_new, st.particles)
    u_here = st.potential + per_walker_dot(st.grad, diff)  # theta(lam_j) at x_new, first order

    def excess(f):  # > 0 while the conditional ESS stays above target
        u_f = (1 - f) * u_here + f * u_target
        g_f = jax.tree.map(lambda a, b: (1 - f) * a + f * b, st.grad, g_target)
        predicted = forward - ula_transition_energy(u_f, g_f, x_new, st.particles, h)
        return conditional_log_ess(st.log_weights, predicted) - cfg.log_target

    fraction = dichotomy(excess, jnp.asarray(0.0, dtype), jnp.asarray(1.0, dtype))
    remaining = jnp.maximum(cfg.max_substeps - count, 1).astype(dtype)
    # even the move alone breaks the target: advance an equal share of the rest
    fraction = jnp.where(jnp.isfinite(fraction), fraction, 1.0 / remaining)
    last = count + 1 >= cfg.max_substeps
    return jnp.where(last, 1.0, fraction), last


def _backtrack(cfg, st, x_new, evaluate, forward, h, fraction, last):
    """Step 5: evaluate at ``fraction``; halve it while the realised conditional ESS is
    below target, at most ``max_backtracks`` times. Returns ``(f, U, grad U, tries)``."""

    def realised_ok(u, g):
        inc = forward - ula_transition_energy(u, g, x_new, st.particles, h)
        return conditional_log_ess(st.log_weights, inc) >= cfg.log_target

    def cond(c):
        _, _, _, ok, tries = c
        return jnp.logical_and(~ok, tries < cfg.max_backtracks)

    def body(c):
        f, _, _, _, tries = c
        f = 0.5 * f
        u, g = evaluate(f)
        return f, u, g, realised_ok(u, g) | last, tries + 1

    u0, g0 = evaluate(fraction)
    fraction, u_new, g_new, _, tries = jax.lax.while_loop(
        cond, body, (fraction, u0, g0, realised_ok(u0, g0) | last, 0)
    )
    return fraction, u_new, g_new, tries


def _substep(cfg, start, target, st, lam, count, key, h) -> _Substep:
    """One sub-step from :math:`\\lambda_j` = ``lam`` (steps 1-6 of the module docstring)."""
    move_key, more_key, resample_key = jax.random.split(key, 3)
    x_new = ula_proposal(move_key, st.particles, st.grad, h, cfg.noise_dtype)
    u_target, g_target = potential_and_grad(cfg.potential_fn, target, x_new, cfg.batch_size)
    forward = ula_transition_energy(st.potential, st.grad, st.particles, x_new, h)
    fraction, last = _predicted_fraction(cfg, st, x_new, u_target, g_target, forward, h, count)

    def evaluate(f):
        lam_f = jnp.where(f >= 1.0, 1.0, lam + f * (1.0 - lam))
        return jax.lax.cond(
            lam_f >= 1.0,
            lambda _: (u_target, g_target),
            lambda _: potential_and_grad(cfg.potential_fn, _path(start, target, lam_f), x_new,
                                         cfg.batch_size),
            None,
        )

    evaluations = 1 + (fraction < 1.0).astype(jnp.int32) + (cfg.num_mcmc_steps - 1)
    fraction, u_new, g_new, tries = _backtrack(cfg, st, x_new, evaluate, forward, h, fraction, last)
    new_lam = jnp.where(fraction >= 1.0, 1.0, lam + fraction * (1.0 - lam))
    new_params = _path(start, target, new_lam)
    cess = jnp.exp(conditional_log_ess(
        st.log_weights, forward - ula_transition_energy(u_new, g_new, x_new, st.particles, h)
    ))
    st, delta, inc, bad = apply_move(st, x_new, u_new, g_new, new_params, h)
    st, delta, inc, bad = _further_moves(cfg, st, new_params, h, more_key, (delta, inc, bad))
    pre_resampling = st.log_weights
    st, ess, resampled, ancestors = resample_if_degenerate(
        resample_key, st, cfg.resampling_fn, cfg.ess_threshold
    )
    return _Substep(st, new_lam, ess, resampled, ancestors, inc, delta, cess, evaluations + tries,
                    pre_resampling, jnp.sum(bad).astype(jnp.int32))


def _further_moves(cfg, st, params, h, key, record):
    """``num_mcmc_steps - 1`` ULA moves at fixed ``params`` after the sub-step's move."""
    if cfg.num_mcmc_steps == 1:
        return (st, *record)

    def one(carry, k):
        s, d, i, b = carry
        x_new = ula_proposal(k, s.particles, s.grad, h, cfg.noise_dtype)
        u_new, g_new = potential_and_grad(cfg.potential_fn, params, x_new, cfg.batch_size)
        s, d2, i2, b2 = apply_move(s, x_new, u_new, g_new, params, h)
        return (s, d + d2, i + i2, b | b2), None

    (st, d, i, b), _ = jax.lax.scan(one, (st, *record), jax.random.split(key, cfg.num_mcmc_steps - 1))
    return st, d, i, b


def _initial_carry(state: JarzynskiState, rng_key: jax.Array) -> _Carry:
    n = state.log_weights.shape[0]
    dtype = state.log_weights.dtype
    return _Carry(
        state=state, lam=jnp.asarray(0.0, dtype), count=jnp.asarray(0, jnp.int32), rng_key=rng_key,
        ancestors=jnp.arange(n, dtype=jnp.int32), min_ess=jnp.asarray(n, dtype),
        min_conditional_ess=jnp.asarray(1.0, dtype), num_resampled=jnp.asarray(0, jnp.int32),
        log_normalizer_increment=jnp.zeros((), dtype), ess=jnp.asarray(n, dtype),
        log_weight_increments=jnp.zeros((n,), dtype), num_evaluations=jnp.asarray(0, jnp.int32),
        log_weights_before_resampling=state.log_weights,
        log_weights_before_last_substep=state.log_weights, num_nonfinite=jnp.asarray(0, jnp.int32),
    )


def _advance(cfg, start, target, h, c: _Carry) -> _Carry:
    """The ``while_loop`` body: one sub-step, folded into the call's record."""
    key, step_key = jax.random.split(c.rng_key)
    s = _substep(cfg, start, target, c.state, c.lam, c.count, step_key, h)
    return _Carry(
        state=s.state, lam=s.lam, count=c.count + 1, rng_key=key, ancestors=c.ancestors[s.ancestors],
        min_ess=jnp.minimum(c.min_ess, s.ess),
        min_conditional_ess=jnp.minimum(c.min_conditional_ess, s.conditional_ess),
        num_resampled=c.num_resampled + s.resampled.astype(jnp.int32),
        log_normalizer_increment=c.log_normalizer_increment + s.log_normalizer_increment,
        ess=s.ess, log_weight_increments=s.log_weight_increments,
        num_evaluations=c.num_evaluations + s.num_evaluations,
        log_weights_before_resampling=s.log_weights_before_resampling,
        log_weights_before_last_substep=c.state.log_weights,
        num_nonfinite=jnp.maximum(c.num_nonfinite, s.num_nonfinite),
    )


def build_kernel(
    potential_fn: PotentialFn,
    step_size: float,
    target_ess: float = 0.5,
    max_substeps: int = 10,
    resampling_fn: Callable = systematic,
    ess_threshold: float = 0.5,
    num_mcmc_steps: int = 1,
    max_backtracks: int = 6,
    batch_size: int | None = None,
    noise_dtype: Any = None,
    param_grad: bool = False,
    param_grad_factor: Callable | None = None,
) -> Callable:
    """Build the adaptive kernel (module docstring). ``target_ess`` in (0, 1) is the
    conditional ESS fraction each parameter sub-step keeps; other arguments as in
    :func:`numpyro_ebm.kernels.jarzynski_ula.build_kernel` (``param_grad``: the walker term
    at the returned state, a separate weighted pass, in ``info.param_grad``).

    Returns ``kernel(rng_key, state, params=None, step_size=None) ->
    (JarzynskiState, AdaptiveJarzynskiInfo)``.
    """
    _checks.check_fraction("target_ess", target_ess, closed_right=False)
    max_substeps = _checks.check_int_at_least("max_substeps", max_substeps, 1)
    num_mcmc_steps = check_kernel_args(step_size, resampling_fn, ess_threshold, num_mcmc_steps, batch_size, noise_dtype)
    max_backtracks = _checks.check_int_at_least("max_backtracks", max_backtracks, 0)
    cfg = _Config(potential_fn, jnp.log(target_ess), max_substeps, max_backtracks, resampling_fn,
                  ess_threshold, num_mcmc_steps, batch_size, noise_dtype)
    default_step_size = step_size

    def kernel(rng_key, state, params=None, step_size=None):
        start = state.params
        target = start if params is None else params
        h = resolve_step_size(default_step_size, step_size, state.log_weights.dtype)
        c = jax.lax.while_loop(
            lambda c: jnp.logical_and(c.lam < 1.0, c.count < max_substeps),
            lambda c: _advance(cfg, start, target, h, c),
            _initial_carry(state, rng_key),
        )
        walker_grad = None
        if param_grad:
            coefficients = scaled(jnp.exp(c.state.log_weights), c.state.potential, param_grad_factor)
            walker_grad = weighted_param_grad(potential_fn, target, c.state.particles, coefficients,
                                              batch_size)
        info = AdaptiveJarzynskiInfo(
            ess=c.ess, resampled=c.num_resampled > 0, ancestors=c.ancestors,
            log_normalizer_increment=c.log_normalizer_increment,
            log_weight_increments=c.log_weight_increments, num_substeps=c.count,
            min_ess=c.min_ess, min_conditional_ess=c.min_conditional_ess,
            num_resampled=c.num_resampled, num_evaluations=c.num_evaluations,
            log_weights_before_resampling=c.log_weights_before_resampling,
            log_weights_before_last_substep=c.log_weights_before_last_substep,
            num_nonfinite=c.num_nonfinite,
            target_missed=c.min_conditional_ess < target_ess, param_grad=walker_grad,
        )
        return c.state, info

    return kernel


def walker_kernel(
    step_size: float,
    *,
    target_ess: float = 0.5,
    max_substeps: int = 10,
    resampling_fn: Callable = systematic,
    ess_threshold: float = 0.5,
    num_mcmc_steps: int = 1,
    max_backtracks: int = 6,
    walker_batch_size: int | None = None,
    noise_dtype: Any = None,
) -> WalkerKernel:
    """Jarzynski walkers with the adaptive schedule, for the trainer."""
    args = (target_ess, max_substeps, resampling_fn, ess_threshold, num_mcmc_steps, max_backtracks,
            walker_batch_size, noise_dtype)
    build_kernel(lambda p, x: 0.0, step_size, *args)  # validates the arguments

    def init_fn(potential_fn, particles, params):
        return init(particles, params, potential_fn, walker_batch_size)

    def step_fn(potential_fn, rng_key, state, params, step_size, param_grad_factor=None):
        kernel = build_kernel(potential_fn, default_step_size, *args, param_grad=True,
                              param_grad_factor=param_grad_factor)
        return kernel(rng_key, state, params, step_size)

    default_step_size = step_size
    config = dict(step_size=step_size, target_ess=target_ess, max_substeps=max_substeps,
                  resampling_fn=getattr(resampling_fn, "__name__", str(resampling_fn)),
                  ess_threshold=ess_threshold, num_mcmc_steps=num_mcmc_steps, max_backtracks=max_backtracks,
                  walker_batch_size=walker_batch_size,
                  noise_dtype=dtype_name(noise_dtype))
    return WalkerKernel(init_fn, step_fn, None, True, step_size, "adaptive_jarzynski", config)
