r"""Per-label mass and ESS of the weighted walkers, as a ``trace_fn``.

With a labelling function :math:`\ell(x) \in \{0, \dots, L-1\}` (e.g. a classifier's argmax
for images), the model's mass of label :math:`l` is estimated by
:math:`m_l = \sum_i w_i [\ell(X^i) = l]`, and the walkers that carry it by the label's
effective sample size :math:`\mathrm{ESS}_l = (\sum_{i: \ell_i = l} w_i)^2 / \sum_{i: \ell_i = l} w_i^2`.
A label whose mass rests on a few walkers (small :math:`\mathrm{ESS}_l`) is the first to be
lost or over-counted at the next resampling: this is how class proportions drift on real
images (``docs/digits.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from numpyro_ebm import _checks

__all__ = ["label_trace", "label_mass_and_ess"]


def label_mass_and_ess(labels: jax.Array, log_weights: jax.Array, num_labels: int):
    """``(mass, ess)``, each of shape ``(num_labels,)``, for integer ``labels`` per walker."""
    w = jnp.exp(log_weights - jax.nn.logsumexp(log_weights))
    mass = jnp.zeros(num_labels, w.dtype).at[labels].add(w)
    squares = jnp.zeros(num_labels, w.dtype).at[labels].add(w**2)
    ess = jnp.where(squares > 0, mass**2 / jnp.where(squares > 0, squares, 1.0), 0.0)
    return mass, ess


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
