"""The pieces every walker kernel shares (numpyro_ebm.kernels.base)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.smc import resampling

from numpyro_ebm.kernels import base
from numpyro_ebm.kernels import jarzynski_ula as ju


def u(params, x):
    return 0.5 * jnp.sum((x - params["mu"]) ** 2) * jnp.exp(-2.0 * params["log_scale"])


P0 = {"mu": np.zeros(2), "log_scale": np.zeros(())}
P1 = {"mu": np.array([0.4, -0.3]), "log_scale": np.asarray(0.2)}


def _state(n=40, seed=0):
    x = jax.random.normal(jax.random.key(seed), (n, 2))
    return ju.init(x, P0, u)


def test_ula_transition_energy_formula(x64):
    """a(x, y) = U(x) + (y - x).grad U(x) / 2 + h |grad U(x)|^2 / 4, per walker."""
    rng = np.random.default_rng(0)
    pot, grad, x, y = rng.normal(size=5), rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    h = 0.37
    want = pot + 0.5 * np.sum((y - x) * grad, 1) + 0.25 * h * np.sum(grad**2, 1)
    np.testing.assert_allclose(base.ula_transition_energy(pot, grad, x, y, h), want, rtol=1e-12)


def test_apply_move_weighted_and_unweighted(x64):
    """weighted: A' = A + Delta A normalised, log Z += logsumexp(A + Delta A); unweighted:
    weights and log normaliser untouched, increments 0. Both cache U, grad U at the new
    walkers for the new parameters; a walker with a non-finite evaluation keeps its old
    values (and, weighted, gets weight zero)."""
    state = _state()
    y = state.particles + 0.1
    u_new, g_new = jax.vmap(jax.value_and_grad(u, argnums=1), (None, 0))(P1, y)
    u_new = u_new.at[3].set(jnp.nan)
    h = jnp.asarray(0.2)
    weighted, delta, inc, bad = base.apply_move(state, y, u_new, g_new, P1, h)
    expected = base.log_weight_increment(state.potential, state.grad, state.particles,
                                         u_new, g_new, y, h)
    expected = expected.at[3].set(-jnp.inf)
    np.testing.assert_allclose(delta, expected, rtol=1e-12)
    np.testing.assert_array_equal(np.flatnonzero(bad), [3])
    lse = jax.nn.logsumexp(state.log_weights + expected)
    np.testing.assert_allclose(inc, lse, rtol=1e-12)
    np.testing.assert_allclose(weighted.log_weights, state.log_weights + expected - lse, rtol=1e-12)
    np.testing.assert_allclose(weighted.log_normalizer, state.log_normalizer + lse, rtol=1e-12)
    np.testing.assert_array_equal(weighted.particles[3], state.particles[3])
    np.testing.assert_array_equal(weighted.potential[3], state.potential[3])
    np.testing.assert_array_equal(weighted.particles[4], y[4])
    assert weighted.params is P1

    plain, delta0, inc0, bad0 = base.apply_move(state, y, u_new, g_new, P1, h, weighted=False)
    np.testing.assert_array_equal(plain.log_weights, state.log_weights)
    np.testing.assert_array_equal(delta0, 0.0)
    assert float(inc0) == 0.0 and float(plain.log_normalizer) == float(state.log_normalizer)
    np.testing.assert_array_equal(np.flatnonzero(bad0), [3])
    np.testing.assert_array_equal(plain.particles[3], state.particles[3])
    np.testing.assert_allclose(plain.potential[5], u_new[5])


def test_resample_if_degenerate(x64):
    """Below the threshold: resampled by the given function, equal weights, log normaliser
    kept, cached values following the ancestors; above it: unchanged, ancestors arange."""
    state = _state(n=50)
    log_w = jnp.linspace(0.0, 4.0, 50)
    state = state._replace(log_weights=log_w - jax.nn.logsumexp(log_w),
                           log_normalizer=jnp.asarray(0.7))
    ess = 1 / np.sum(np.exp(2 * np.asarray(state.log_weights)))
    new, got_ess, resampled, ancestors = base.resample_if_degenerate(
        jax.random.key(1), state, resampling.systematic, ess / 50 + 1e-3)
    np.testing.assert_allclose(got_ess, ess, rtol=1e-10)
    assert bool(resampled)
    np.testing.assert_allclose(new.log_weights, -math.log(50))
    assert float(new.log_normalizer) == 0.7
    np.testing.assert_array_equal(new.particles, state.particles[ancestors])
    np.testing.assert_array_equal(new.potential, state.potential[ancestors])
    kept, _, resampled, ancestors = base.resample_if_degenerate(
        jax.random.key(1), state, resampling.systematic, ess / 50 - 1e-3)
    assert not bool(resampled)
    np.testing.assert_array_equal(ancestors, np.arange(50))
    np.testing.assert_array_equal(kept.log_weights, state.log_weights)


def test_resample_groups_if_degenerate_resamples_each_group_within_itself(x64):
    """Island resampling of 12 walkers in 3 groups: only the group whose own ESS is below
    the threshold is resampled, its ancestors stay inside it, its walkers share its total
    weight equally; every group's total weight (its own log-normaliser estimate) is
    unchanged, the weights stay normalised, the log normaliser is kept."""
    state = _state(n=12)
    log_w = jnp.array([20.0, 0, 0, 0, 0.1, 0, 0.2, 0, 1.0, 1.1, 0.9, 1.0])
    state = state._replace(log_weights=log_w - jax.nn.logsumexp(log_w), log_normalizer=jnp.asarray(0.3))
    totals = jax.nn.logsumexp(state.log_weights.reshape(3, 4), axis=1)
    new, ess, resampled, ancestors = base.resample_if_degenerate(
        jax.random.key(2), state, resampling.systematic, 0.5, num_groups=3)
    assert bool(resampled)
    np.testing.assert_allclose(ess, 1 / np.sum(np.exp(2 * np.asarray(state.log_weights))), rtol=1e-12)
    assert set(np.asarray(ancestors[:4]).tolist()) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(ancestors[:4], 0)  # one walker holds ~all of group 0's weight
    np.testing.assert_array_equal(ancestors[4:], np.arange(4, 12))
    np.testing.assert_allclose(new.log_weights[:4], totals[0] - math.log(4), atol=1e-12)
    np.testing.assert_array_equal(new.log_weights[4:], state.log_weights[4:])
    np.testing.assert_allclose(jax.nn.logsumexp(new.log_weights.reshape(3, 4), axis=1), totals, atol=1e-12)
    np.testing.assert_allclose(jax.nn.logsumexp(new.log_weights), 0.0, atol=1e-12)
    assert float(new.log_normalizer) == 0.3
    np.testing.assert_array_equal(new.particles, state.particles[ancestors])
    np.testing.assert_array_equal(new.grad, state.grad[ancestors])
    kept, _, resampled, ancestors = base.resample_if_degenerate(
        jax.random.key(2), state, resampling.systematic, 0.2, num_groups=3)
    assert not bool(resampled)
    np.testing.assert_array_equal(ancestors, np.arange(12))
    with pytest.raises(ValueError, match="resampling_groups"):
        base.resample_if_degenerate(jax.random.key(2), state, resampling.systematic, 0.5, num_groups=5)
    with pytest.raises(ValueError, match="resampling_groups"):
        base.check_num_groups(1)
