r"""Energy penalties: a change of the training objective, as an option of the trainer.

The cross-entropy :math:`H(\theta) = E_{\text{data}}[U_\theta] + \log Z_\theta` does not fix
the level of the energy where there are no data: an energy can grow very negative on the
data and very positive elsewhere without changing :math:`H` much, and long runs on images
drift that way. A penalty

.. math::

   P(\theta) = \alpha\,\Big(E_{\text{batch}}[g(U_\theta)] + \sum_i w_i\, g(U_\theta(X^i))\Big)

(:func:`squared_energy`: :math:`g(u) = u^2`, the penalty of Carbone et al.'s public MNIST code
with :math:`\alpha = 0.01`) keeps the energies near zero on the data and on the model's own
samples. The trainer then follows :math:`\nabla_\theta (H + P)`, with the weights
:math:`w_i` held fixed as in the cross-entropy gradient:

.. math::

   E_{\text{batch}}[(1 + \alpha g'(U)) \nabla_\theta U]
   - \sum_i w_i (1 - \alpha g'(U(X^i))) \nabla_\theta U(X^i).

Both parts come from the evaluations each iteration already makes: the batch's
forward/backward pass (of :math:`U + \alpha g(U)` instead of :math:`U`) and the walkers'
fused pass (cotangents :math:`w_i (1 - \alpha g'(U_i))`). **This changes the objective**: the
minimiser is no longer the cross-entropy's, and the Jarzynski cross-entropy estimate in the
trace is still that of :math:`H` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from numpyro_ebm import _checks

__all__ = ["EnergyPenalty", "squared_energy", "penalised_value_and_grad"]


class EnergyPenalty(NamedTuple):
    """:math:`\\alpha (E_{\\text{batch}}[g(U)] + \\sum_i w_i g(U_i))` for an elementwise
    :math:`g` (``fn``)."""

    alpha: float
    fn: Callable[[jax.Array], jax.Array]

    def batch_objective(self, energies: jax.Array) -> jax.Array:
        """:math:`\\frac1n \\sum_j (U_j + \\alpha g(U_j))`, the batch part of :math:`H + P`."""
        return jnp.mean(energies + self.alpha * self.fn(energies))

    def walker_factor(self, energies: jax.Array) -> jax.Array:
        """:math:`1 - \\alpha g'(U_i)`, the factor on each walker's weight in the walker term."""
        return 1.0 - self.alpha * jax.vmap(jax.grad(self.fn))(energies)

    def walker_value(self, walker_energies: jax.Array, weights: jax.Array) -> jax.Array:
        """:math:`\\alpha \\sum_i w_i g(U_i)`; walkers of weight zero do not count."""
        return self.alpha * jnp.sum(jnp.where(weights > 0, weights * self.fn(walker_energies), 0.0))


def penalised_value_and_grad(penalty: EnergyPenalty, potential_fn, params, batch, walker_grad):
    """``(mean batch energy, batch part of P, gradient of H + P)`` from one forward/backward
    pass over the batch; ``walker_grad`` is the walker term (with the penalty's factors)."""

    def objective(p):
        energies = jax.vmap(potential_fn, in_axes=(None, 0))(p, batch)
        return penalty.batch_objective(energies), (jnp.mean(energies),
                                                   penalty.alpha * jnp.mean(penalty.fn(energies)))

    (_, (data_energy, batch_penalty)), data_grad = jax.value_and_grad(objective, has_aux=True)(params)
    return data_energy, batch_penalty, optax.tree.sub(data_grad, walker_grad)


def squared_energy(alpha: float = 0.01) -> EnergyPenalty:
    """:math:`P = \\alpha (E_{\\text{batch}}[U^2] + \\sum_i w_i U_i^2)` (outside the theory:
    it changes the objective; see the module docstring)."""
    _checks.check_positive("alpha", alpha)
    return EnergyPenalty(float(alpha), jnp.square)
