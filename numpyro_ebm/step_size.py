r"""Step-size control for the Jarzynski-weighted ULA walkers.

At fixed parameters the Jarzynski increment of one move is the log Metropolis ratio of
MALA, :math:`\Delta A^i = \log\frac{\rho(X'^i) q(X'^i \to X^i)}{\rho(X^i) q(X^i \to X'^i)}`,
so the weighted mean of :math:`\min(1, e^{\Delta A^i})` is the acceptance rate MALA would
have with the same step size: a natural signal for tuning :math:`h`. When the parameters
move too, the increments share a common part :math:`c = \log\sum_i w_i e^{\Delta A^i}`
(the log-normaliser increment), which is removed first:

.. math::

   \hat a = \sum_i w_i \min\big(1, e^{\Delta A^i - c}\big).

The proxy is free (it reuses the move's increments) but it reads every walker-to-walker
difference of the increments as a rejection, and the parameter part of an increment,
:math:`U_{k+1}(X') - U_k(X')` plus its gradient terms, varies from walker to walker
whatever :math:`h` is. When that spread alone keeps :math:`\hat a` below the target, the
adaptation shrinks :math:`h` towards zero and the walkers freeze (MNIST run 5,
``docs/digits.md``). The probe (:func:`probe_acceptance`, ``probe_every=m``, the default)
measures the move part alone: every :math:`m` iterations one extra ULA proposal
:math:`Y^i = X^i - h\nabla U_\theta(X^i) + \sqrt{2h}\,\xi^i` from the current walkers at
the current, fixed :math:`\theta` (not taken; the walkers do not move) and

.. math::

   \hat a_{\text{probe}} = \sum_i w_i \min\Big(1, \frac{e^{-U_\theta(Y^i)} q(Y^i \to X^i)}
   {e^{-U_\theta(X^i)} q(X^i \to Y^i)}\Big),

MALA's acceptance rate under :math:`\rho_\theta` (the weights make the walkers a sample of
it), at the cost of one walker evaluation every :math:`m` iterations.

The step size is adapted on :math:`\log h` by dual averaging (Nesterov 2009; Hoffman and
Gelman 2014), through BlackJAX's ``blackjax.adaptation.step_size.dual_averaging_adaptation``,
so that
:math:`\hat a` approaches ``target_acceptance``. Like an optax transformation, the
adaptation is a pair of pure functions, ``init`` and ``update``, over a NamedTuple state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.adaptation.step_size import DualAveragingAdaptationState, dual_averaging_adaptation
from jax.scipy.special import logsumexp

from numpyro_ebm import _checks
from numpyro_ebm.kernels.base import JarzynskiState, PotentialFn, log_weight_increment
from numpyro_ebm.kernels.evaluation import potential_and_grad
from numpyro_ebm.kernels.langevin import ula_proposal

__all__ = ["acceptance_proxy", "probe_acceptance", "StepSizeState", "StepSizeAdaptation", "step_size_adaptation"]


def acceptance_proxy(log_weights: jax.Array, log_weight_increments: jax.Array) -> jax.Array:
    """:math:`\\hat a = \\sum_i w_i \\min(1, e^{\\Delta A^i - c})`, ``w = softmax(log_weights)``
    (the weights before the move), :math:`c = \\log\\sum_i w_i e^{\\Delta A^i}`."""
    log_w = log_weights - logsumexp(log_weights)
    common = logsumexp(log_w + log_weight_increments)
    ratio = jnp.minimum(0.0, log_weight_increments - common)
    return jnp.sum(jnp.exp(log_w + ratio))


def probe_acceptance(
    rng_key: jax.Array,
    potential_fn: PotentialFn,
    walkers: JarzynskiState,
    step_size: jax.Array,
    batch_size: int | None = None,
) -> jax.Array:
    r"""MALA's weighted acceptance rate at the walkers' own parameters ``walkers.params``:
    :math:`\sum_i w_i \min(1, r_i)` for one ULA proposal :math:`Y^i` from each walker, with
    :math:`\log r_i = a(X^i, Y^i) - a(Y^i, X^i)` (:func:`~numpyro_ebm.kernels.base.log_weight_increment`
    at fixed parameters, the log Metropolis-Hastings ratio). The proposals are discarded.
    One evaluation of ``potential_fn`` per walker (in chunks of ``batch_size``); a
    proposal whose energy, gradient or ratio is not finite counts as rejected."""
    proposal = ula_proposal(rng_key, walkers.particles, walkers.grad, step_size)
    potential, grad = potential_and_grad(potential_fn, walkers.params, proposal, batch_size)
    log_ratio = log_weight_increment(walkers.potential, walkers.grad, walkers.particles,
                                     potential, grad, proposal, step_size)
    accept = jnp.where(jnp.isfinite(log_ratio), jnp.exp(jnp.minimum(log_ratio, 0.0)), 0.0)
    weights = jax.nn.softmax(walkers.log_weights)
    return jnp.sum(weights * accept.astype(weights.dtype))


class StepSizeState(NamedTuple):
    """Dual-averaging state; ``step_size`` is the one to use for the next move."""

    dual_averaging: DualAveragingAdaptationState
    step_size: jax.Array


class StepSizeAdaptation(NamedTuple):
    r"""``init(step_size) -> StepSizeState``; ``update(state, acceptance) -> StepSizeState``;
    ``probe_every``: ``None`` (the trainer feeds :func:`acceptance_proxy` at every iteration)
    or :math:`m` (it feeds :func:`probe_acceptance` at the iterations :math:`k` with
    :math:`k \bmod m = 0` and leaves the state alone at the others)."""

    init: callable
    update: callable
    probe_every: int | None = None


def step_size_adaptation(
    target_acceptance: float = 0.7,
    *,
    t0: float = 10.0,
    gamma: float = 0.05,
    kappa: float = 0.75,
    min_step_size: float = 1e-8,
    max_step_size: float = 1e3,
    initial_exploration: float = 1.0,
    probe_every: int | None = 10,
) -> StepSizeAdaptation:
    """Dual averaging of :math:`\\log h` towards ``target_acceptance`` of the proxy
    :func:`acceptance_proxy`. The step size in the state is the current iterate (not the
    running average), since during training the target keeps moving.

    Dual averaging shrinks :math:`\\log h` towards :math:`\\mu = \\log(c\\, h_0)` with
    ``c = initial_exploration``, so its first moves use about :math:`c\\, h_0`. BlackJAX's
    MCMC warm-up takes :math:`c = 10`, which costs nothing there; with weighted walkers a
    first move ten times larger than asked is paid in the weights, which cannot recover (on
    MNIST it left ESS/N = 0.003 after the first iteration, see ``docs/digits.md``). The default
    :math:`c = 1` starts at the given :math:`h_0`.

    ``probe_every`` (:math:`m`, default 10): adapt on :func:`probe_acceptance`, MALA's
    acceptance of an extra proposal at fixed parameters, every :math:`m` iterations (one
    walker evaluation each time, a fraction :math:`1/m` more walker work). ``None``: adapt at
    every iteration on the free :func:`acceptance_proxy`, which is exact at fixed parameters
    but which a noisy parameter update pulls below the target whatever :math:`h` is (then
    :math:`h` falls without end and the walkers freeze)."""
    _checks.check_fraction("target_acceptance", target_acceptance, closed_right=False)
    if probe_every is not None:
        probe_every = _checks.check_int_at_least("probe_every", probe_every, 1)
    _checks.check_positive("initial_exploration", initial_exploration)
    da_init, da_update, _ = dual_averaging_adaptation(target_acceptance, t0, gamma, kappa)

    def init(step_size) -> StepSizeState:
        _checks.check_positive("step_size", step_size)
        step_size = jnp.asarray(step_size)
        state = da_init(step_size)
        state = state._replace(mu=jnp.log(initial_exploration * step_size).astype(state.mu.dtype))
        return StepSizeState(state, step_size)

    def update(state: StepSizeState, acceptance: jax.Array) -> StepSizeState:
        da = da_update(state.dual_averaging, acceptance)
        step = jnp.clip(jnp.exp(da.log_step_size), min_step_size, max_step_size)
        return StepSizeState(da, step.astype(state.step_size.dtype))

    return StepSizeAdaptation(init, update, probe_every)
