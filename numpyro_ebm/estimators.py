r"""Estimators of the cross-entropy and its gradient from Jarzynski-weighted walkers.

For :math:`\rho_\theta = e^{-U_\theta}/Z_\theta` and data :math:`\{x_j\}_{j=1}^n`,

.. math::

   H(\theta) = \frac1n \sum_j U_\theta(x_j) + \log Z_\theta, \qquad
   \partial_\theta H = \frac1n \sum_j \partial_\theta U_\theta(x_j)
                       - E_{\rho_\theta}[\partial_\theta U_\theta].

The model expectation is replaced by the weighted walkers,
:math:`E_{\rho_\theta}[f] \approx \sum_i w_i f(X^i)` with :math:`w = \mathrm{softmax}(A)`,
and :math:`\log Z_\theta = \log Z_{\theta_0} + (\log Z_\theta - \log Z_{\theta_0})` with the
second term the state's Jarzynski ``log_normalizer``.

The weighted parameter gradient is the gradient of one weighted sum,
:math:`\nabla_\theta[\frac1n\sum_j U_\theta(x_j) - \sum_i w_i U_\theta(X^i)]` with the weights
held fixed, so per-walker parameter gradients are never materialised.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from numpyro_ebm import _checks
from numpyro_ebm.kernels.base import JarzynskiState, PotentialFn
from numpyro_ebm.kernels.evaluation import weighted_param_grad

__all__ = ["ce_grad", "ce_estimate", "ce_value_and_grad", "mean_energy"]


def mean_energy(potential_fn: PotentialFn, params: Any, samples: Any) -> jax.Array:
    """:math:`\\frac1n \\sum_j U_\\theta(x_j)` over the leading axis of ``samples``."""
    return jnp.mean(jax.vmap(potential_fn, in_axes=(None, 0))(params, samples))


def ce_value_and_grad(
    potential_fn: PotentialFn,
    params: Any,
    data: Any,
    state: JarzynskiState,
    walker_grad: Any = None,
) -> tuple[jax.Array, Any]:
    """Mean data energy :math:`\\frac1n\\sum_j U_\\theta(x_j)` and the cross-entropy gradient
    (as :func:`ce_grad`): one forward/backward pass over the data, minus the walkers' term
    :math:`\\sum_i w_i \\nabla_\\theta U_\\theta(X^i)`. That term is ``walker_grad`` when given
    (``fit`` takes it from the kernel's evaluation at the walkers), otherwise one weighted
    forward/backward pass over the walkers
    (:func:`numpyro_ebm.jarzynski_ula.weighted_param_grad`)."""
    data_energy, data_grad = jax.value_and_grad(mean_energy, argnums=1)(potential_fn, params, data)
    if walker_grad is None:
        weights = jax.nn.softmax(state.log_weights)
        walker_grad = weighted_param_grad(potential_fn, params, state.particles, weights)
    return data_energy, optax.tree.sub(data_grad, walker_grad)


def _check_inputs(data: Any, state: JarzynskiState) -> None:
    if not isinstance(state, JarzynskiState):
        raise TypeError(f"`state` must be a JarzynskiState, got {type(state).__name__}")
    _checks.leading_size("data", data)
    _checks.check_finite_tree("data", data)
    _checks.check_same_event_shape("data", data, "state.particles", state.particles)


def ce_grad(potential_fn: PotentialFn, params: Any, data: Any, state: JarzynskiState) -> Any:
    """Cross-entropy gradient
    :math:`D = \\frac1n\\sum_j \\nabla_\\theta U_\\theta(x_j) - \\sum_i w_i \\nabla_\\theta U_\\theta(X^i)`.

    ``data`` has the sample axis first and may be a minibatch; ``state`` holds the walkers
    and their log weights (normalised or not: only their softmax is used). Returns a pytree
    shaped like ``params``.
    """
    _check_inputs(data, state)
    return ce_value_and_grad(potential_fn, params, data, state)[1]


def ce_estimate(
    potential_fn: PotentialFn,
    params: Any,
    data: Any,
    state: JarzynskiState,
    log_z0: float | jax.Array,
) -> jax.Array:
    """Cross-entropy estimate
    :math:`\\hat H = \\frac1n\\sum_j U_\\theta(x_j) + \\log Z_{\\theta_0} + \\widehat{\\log Z_\\theta / Z_{\\theta_0}}`.

    ``log_z0`` is the log normaliser of the model the walkers started from (closed-form for
    a Gaussian start); the ratio is the state's Jarzynski ``log_normalizer``.
    """
    _check_inputs(data, state)
    if _checks.is_concrete(log_z0) and not bool(jnp.isfinite(jnp.asarray(log_z0))):
        raise ValueError(f"`log_z0` must be finite, got {log_z0}")
    if _checks.is_concrete(state.log_normalizer) and not bool(jnp.isfinite(state.log_normalizer)):
        raise ValueError(
            "`state.log_normalizer` is not finite: these walkers carry no estimate of "
            "log Z_theta / Z_theta0 (unweighted PCD/CD walkers, or every weight was lost)"
        )
    return mean_energy(potential_fn, params, data) + log_z0 + state.log_normalizer
