"""Systematic resampling from offspring counts (numpyro_ebm.kernels.resampling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.smc import resampling as blackjax_resampling

from numpyro_ebm.kernels import jarzynski_ula, resampling


def _weight_vectors(dtype, n):
    """Normalised weights of several shapes: spread, degenerate (one walker holds almost
    everything), many exact zeros, equal, and a smooth ramp."""
    key = jax.random.key(7)
    out = []
    for i, scale in enumerate((0.5, 3.0, 12.0)):
        out.append(jax.nn.softmax(scale * jax.random.normal(jax.random.fold_in(key, i), (n,), dtype)))
    log_w = jax.random.normal(jax.random.fold_in(key, 9), (n,), dtype)
    out.append(jax.nn.softmax(jnp.where(jnp.arange(n) % 3 == 0, -jnp.inf, log_w)))
    out.append(jnp.full((n,), 1.0 / n, dtype))
    out.append(jnp.linspace(1.0, 2.0, n, dtype=dtype) / jnp.sum(jnp.linspace(1.0, 2.0, n, dtype=dtype)))
    return out


@pytest.mark.parametrize("n, num_samples", [(1000, 1000), (997, 600), (300, 1000)])
def test_same_ancestors_as_blackjax_for_the_same_key(dtype, n, num_samples):
    """Systematic resampling is a deterministic function of one uniform u: with the same
    key, the count construction must give BlackJAX's searchsorted ancestors exactly (which
    makes the two equal in distribution over u). A wrong threshold (e.g. floor(M C + u),
    or M C rounded in the weights' dtype in float32) breaks this on some of the 6 x 40
    draws here."""
    keys = jax.random.split(jax.random.key(n + num_samples), 40)

    @jax.jit
    def both(weights):
        def one(key):
            return (resampling.systematic(key, weights, num_samples),
                    blackjax_resampling.systematic(key, weights, num_samples),
                    resampling.offspring_counts(key, weights, num_samples))
        return jax.vmap(one)(keys)

    for weights in _weight_vectors(dtype, n):
        got, want, counts = both(weights)
        np.testing.assert_array_equal(got, want)
        for c, w in zip(np.asarray(counts), np.asarray(want), strict=True):
            np.testing.assert_array_equal(c, np.bincount(w, minlength=n))


def test_offspring_counts_are_floor_or_ceil_of_m_w(x64):
    """For systematic resampling n_i is floor(M w_i) or ceil(M w_i) and the counts sum to M,
    for every u (exact property; float64 weights leave no rounding at the boundaries)."""
    n = 500
    for weights in _weight_vectors(jnp.float64, n):
        expected = np.asarray(n * weights)
        keys = jax.random.split(jax.random.key(5), 20)
        counts = np.asarray(jax.vmap(lambda k, w=weights: resampling.offspring_counts(k, w, n))(keys))
        assert np.all(counts.sum(axis=1) == n)
        assert np.all((counts >= np.floor(expected - 1e-9)) & (counts <= np.ceil(expected + 1e-9)))


def test_offspring_counts_are_unbiased_over_u(x64):
    """Averaged over keys the counts estimate M w_i (systematic resampling is unbiased).
    Each count takes floor or ceil, so its mean over K keys has standard deviation at most
    1/(2 sqrt(K)) = 0.0125 for K = 1600; 6 of those (0.075) bound every walker's error
    (500 walkers, a chance of a false failure below 1e-6)."""
    n, num_keys = 500, 1600
    weights = _weight_vectors(jnp.float64, n)[1]
    keys = jax.random.split(jax.random.key(3), num_keys)
    counts = jax.vmap(lambda k, w=weights: resampling.offspring_counts(k, w, n))(keys)
    np.testing.assert_allclose(np.mean(np.asarray(counts), axis=0), n * np.asarray(weights), atol=0.075)


def test_is_the_default_of_the_weighted_kernels():
    kernel = jarzynski_ula.walker_kernel(0.1)
    assert kernel.config["resampling_fn"] == "systematic"
    import inspect

    default = inspect.signature(jarzynski_ula.build_kernel).parameters["resampling_fn"].default
    assert default is resampling.systematic
