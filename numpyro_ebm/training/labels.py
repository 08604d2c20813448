r"""Per-label mass and ESS of the weighted walkers, as a ``trace_fn``.

With a labelling function :math:`\ell(x) \in \{0, \dots, L-1\}` (e.g. a classifier's argmax
for images), the model's mass of label :math:`l` is estimated by
:math:`m_l = \sum_i w_i [\ell(X^i) = l]`, and the walkers that carry it by the label's
effective sample size :math:`\mathrm{ESS}_l = (\sum_{i: \ell_i = l} w_i)^2 / \sum_{i: \ell_i = l} w_i^2`.
A label whose mass rests on a few walkers (small :math:`\mathrm{ESS}_l`) is the first to be
lost or over-counted at the next resampling: this is how class proportions drift on real
images (``docs/digits.md``).

The Monte Carlo standard error of :math:`m_l` (delta method for a self-normalised estimate,
walkers taken as independent) is

.. math::

    \mathrm{se}(m_l)^2 = \sum_i w_i^2 \big([\ell(X^i) = l] - m_l\big)^2
    = S_l (1 - m_l)^2 + (S - S_l)\, m_l^2,

with :math:`S_l = \sum_{i: \ell_i = l} w_i^2 = m_l^2 / \mathrm{ESS}_l` and
:math:`S = \sum_l S_l`: it follows from the recorded masses and ESS alone
(:func:`label_mass_standard_error`). With equal weights it is :math:`\sqrt{m_l (1 - m_l) / N}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from numpyro_ebm import _checks

__all__ = ["label_trace", "label_mass_and_ess", "label_mass_standard_error"]


def label_mass_and_ess(labels: jax.Array, log_weights: jax.Array, num_labels: int):
    """``(mass, ess)``, each of shape ``(num_labels,)``, for integer ``labels`` per walker."""
    w = jnp.exp(log_weights - jax.nn.logsumexp(log_weights))
    mass = jnp.zeros(num_labels, w.dtype).at[labels].add(w)
    squares = jnp.zeros(num_labels, w.dtype).at[labels].add(w**2)
    ess = jnp.where(squares > 0, mass**2 / jnp.where(squares > 0, squares, 1.0), 0.0)
    return mass, ess


def label_mass_standard_error(mass: jax.Array, ess: jax.Array) -> jax.Array:
    """Monte Carlo standard error of each label's mass from ``(mass, ess)`` of
    :func:`label_mass_and_ess` (last axis: labels; leading axes, e.g. iterations, broadcast);
    see the module docstring. A label no walker carries has standard error 0 at mass 0."""
    mass, ess = jnp.asarray(mass), jnp.asarray(ess)
    squares = jnp.where(ess > 0, mass**2 / jnp.where(ess > 0, ess, 1.0), 0.0)  # S_l
    total = jnp.sum(squares, axis=-1, keepdims=True)  # S
    variance = squares * (1 - mass) ** 2 + (total - squares) * mass**2
    return jnp.sqrt(jnp.maximum(variance, 0.0))


def label_trace(label_fn: Callable[[Any], jax.Array], num_labels: int) -> Callable:
    """A ``trace_fn(params, walkers)`` recording ``{"label_mass", "label_ess"}`` per iteration
    (``trace["extra"]``); ``label_fn(particles) -> int labels`` sees all walkers at once and
    must be jittable."""
    if not callable(label_fn):
        raise TypeError("`label_fn` must be callable: label_fn(particles) -> integer labels")
    num_labels = _checks.check_int_at_least("num_labels", num_labels, 1)

    def trace_fn(params, walkers):
        labels = jnp.asarray(label_fn(walkers.particles)).astype(jnp.int32)
        mass, ess = label_mass_and_ess(labels, walkers.log_weights, num_labels)
        return {"label_mass": mass, "label_ess": ess}

    return trace_fn
