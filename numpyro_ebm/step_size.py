r"""Step-size control for the Jarzynski-weighted ULA walkers.

At fixed parameters the Jarzynski increment of one move is the log Metropolis ratio of
MALA, :math:`\Delta A^i = \log\frac{\rho(X'^i) q(X'^i \to X^i)}{\rho(X^i) q(X^i \to X'^i)}`,
so the weighted mean of :math:`\min(1, e^{\Delta A^i})` is the acceptance rate MALA would
have with the same step size: a natural signal for tuning :math:`h`. When the parameters
move too, the increments share a common part :math:`c = \log\sum_i w_i e^{\Delta A^i}`
(the log-normaliser increment), which is removed first:

.. math::

   \hat a = \sum_i w_i \min\big(1, e^{\Delta A^i - c}\big).

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

__all__ = ["acceptance_proxy", "StepSizeState", "StepSizeAdaptation", "step_size_adaptation"]


def acceptance_proxy(log_weights: jax.Array, log_weight_increments: jax.Array) -> jax.Array:
    """:math:`\\hat a = \\sum_i w_i \\min(1, e^{\\Delta A^i - c})`, ``w = softmax(log_weights)``
    (the weights before the move), :math:`c = \\log\\sum_i w_i e^{\\Delta A^i}`."""
    log_w = log_weights - logsumexp(log_weights)
    common = logsumexp(log_w + log_weight_increments)
    ratio = jnp.minimum(0.0, log_weight_increments - common)
    return jnp.sum(jnp.exp(log_w + ratio))


class StepSizeState(NamedTuple):
    """Dual-averaging state; ``step_size`` is the one to use for the next move."""

    dual_averaging: DualAveragingAdaptationState
    step_size: jax.Array


class StepSizeAdaptation(NamedTuple):
    """``init(step_size) -> StepSizeState``; ``update(state, acceptance) -> StepSizeState``."""

    init: callable
    update: callable


def step_size_adaptation(
    target_acceptance: float = 0.7,
    *,
    t0: float = 10.0,
    gamma: float = 0.05,
    kappa: float = 0.75,
    min_step_size: float = 1e-8,
    max_step_size: float = 1e3,
    initial_exploration: float = 1.0,
) -> StepSizeAdaptation:
    """Dual averaging of :math:`\\log h` towards ``target_acceptance`` of the proxy
    :func:`acceptance_proxy`. The step size in the state is the current iterate (not the
    running average), since during training the target keeps moving.

    Dual averaging shrinks :math:`\\log h` towards :math:`\\mu = \\log(c\\, h_0)` with
    ``c = initial_exploration``, so its first moves use about :math:`c\\, h_0`. BlackJAX's
    MCMC warm-up takes :math:`c = 10`, which costs nothing there; with weighted walkers a
    first move ten times larger than asked is paid in the weights, which cannot recover (on
    MNIST it left ESS/N = 0.003 after the first iteration, see ``docs/digits.md``). The default
    :math:`c = 1` starts at the given :math:`h_0`."""
    _checks.check_fraction("target_acceptance", target_acceptance, closed_right=False)
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

    return StepSizeAdaptation(init, update)
