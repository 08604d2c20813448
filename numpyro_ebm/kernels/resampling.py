r"""Systematic resampling from offspring counts, without a search.

BlackJAX's ``blackjax.smc.resampling.systematic`` draws one :math:`u \sim U[0, 1)` and
gives the :math:`k`-th new walker (:math:`k = 0, \dots, M-1`) the ancestor

.. math::

   a_k = \min\{i : C_i \ge (k + u)/M\}, \qquad C_i = \sum_{j \le i} w_j ,

found by ``searchsorted`` (a sequential binary search: about :math:`\log_2 N` dependent
passes, slow on a GPU). The same ancestors follow from counts: walker :math:`i` is the
ancestor of the :math:`k` with :math:`C_{i-1} < (k + u)/M \le C_i`, i.e. of the integers
:math:`k \in (M C_{i-1} - u,\ M C_i - u]`, so with :math:`F_i = \lfloor M C_i - u \rfloor`
(:math:`F_{-1} = -1`) it has

.. math::

   n_i = F_i - F_{i-1} \quad \text{offspring}, \qquad
   a_k = \#\{i : F_i < k\} = \sum_{j=-1}^{k-1} \#\{i : F_i = j\},

the second a histogram of the :math:`F_i` (one scatter-add) and a cumulative sum: two
parallel passes over the walkers, no search. :math:`n_i` is :math:`\lfloor M w_i \rfloor`
or :math:`\lceil M w_i \rceil`. :math:`F_i` is decided with BlackJAX's own floating-point
expression for :math:`(k + u)/M`, so for the same key the ancestors
are exactly BlackJAX's, in float32 and float64 (``tests/test_kernels_resampling.py``
checks this on many weight vectors and keys): the same draws, hence the same results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["systematic", "offspring_counts"]


# |estimate - F_i| is at most ~M eps + 1 (rounding of M C_i - u and of k + u): within 3 for
# M <= 2**24 in float32 (and far beyond in float64)
_WINDOW = 3


def _thresholds(rng_key: jax.Array, weights: jax.Array, num_samples: int) -> jax.Array:
    """:math:`F_i = \\max\\{k : (k + u)/M \\le C_i\\}` (int32, :math:`-1` when none), with
    :math:`u` and :math:`(k + u)/M` computed as BlackJAX computes them
    (``jax.random.uniform(rng_key, ())``; ``(arange(M, dtype=weights.dtype) + u) / M``),
    so that :math:`F` decides exactly what BlackJAX's ``searchsorted`` decides. The
    estimate :math:`\\lfloor M C_i - u \\rfloor` is off by at most a few units of rounding
    (:math:`M` times the float epsilon); the candidates within ``_WINDOW`` of it are
    tested with BlackJAX's expression, and :math:`(k + u)/M` grows with :math:`k`."""
    u = jax.random.uniform(rng_key, ())
    cumsum = jnp.cumsum(weights)
    dtype = jnp.result_type(cumsum, jnp.zeros((), weights.dtype) + u)
    c = cumsum.astype(dtype)
    estimate = jnp.floor(jnp.asarray(num_samples, dtype) * c - u).astype(jnp.int32)
    f = estimate - (_WINDOW + 1)
    for offset in range(-_WINDOW, _WINDOW + 1):
        k = estimate + offset
        point = (k.astype(weights.dtype) + u) / num_samples
        f = f + (point.astype(dtype) <= c).astype(jnp.int32)
    return jnp.clip(f, -1, num_samples)


def offspring_counts(rng_key: jax.Array, weights: jax.Array, num_samples: int) -> jax.Array:
    """:math:`n_i = F_i - F_{i-1}` copies of walker ``i`` (int32, summing to ``num_samples``)
    as :func:`systematic` makes them with the same key: :math:`F` is clipped to
    :math:`[-1, M-1]` and the last walker takes :math:`F_{N-1} = M - 1` (a cumulative sum
    that rounds below or above 1 neither drops nor adds a copy, as BlackJAX's clipped
    indices)."""
    f = jnp.minimum(_thresholds(rng_key, weights, num_samples), num_samples - 1)
    f = f.at[-1].set(num_samples - 1)
    return jnp.diff(f, prepend=jnp.asarray(-1, jnp.int32))


def systematic(rng_key: jax.Array, weights: jax.Array, num_samples: int) -> jax.Array:
    """Systematic resampling, BlackJAX's interface and draws (module docstring):
    ``(rng_key, weights, num_samples) -> ancestor indices`` (int32, sorted), for normalised
    ``weights``. Cost: a cumulative sum, a scatter-add and a cumulative sum over the
    walkers."""
    n = weights.shape[0]
    f = _thresholds(rng_key, weights, num_samples)
    # histogram of F_i shifted by one: hist[j + 1] = #{i : F_i = j}; a_k = sum_{j <= k} hist[j]
    hist = jnp.zeros((num_samples + 2,), jnp.int32).at[f + 1].add(1)
    ancestors = jnp.cumsum(hist[:num_samples])
    return jnp.minimum(ancestors, n - 1)
