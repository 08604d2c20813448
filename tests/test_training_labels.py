"""Per-label mass and ESS of weighted walkers (training.labels)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm
from numpyro_ebm.training.labels import label_mass_and_ess, label_mass_standard_error, label_trace


def test_label_mass_and_ess_by_hand():
    labels = jnp.array([0, 0, 1, 2, 2, 2])
    w = np.array([0.1, 0.3, 0.2, 0.1, 0.1, 0.2])
    mass, ess = label_mass_and_ess(labels, jnp.log(jnp.asarray(w)), 4)
    np.testing.assert_allclose(mass, [0.4, 0.2, 0.4, 0.0], rtol=1e-6)
    np.testing.assert_allclose(ess, [0.16 / 0.1, 1.0, 0.16 / 0.06, 0.0], rtol=1e-5)
    # weight-zero walkers count for nothing
    mass, ess = label_mass_and_ess(labels, jnp.array([0.0, -jnp.inf, 0, 0, 0, 0]), 3)
    np.testing.assert_allclose(mass, [0.2, 0.2, 0.6], rtol=1e-6)
    np.testing.assert_allclose(ess[0], 1.0, rtol=1e-6)


def test_label_mass_standard_error_is_the_delta_method_sum():
    """From (mass, ESS) alone it equals sqrt(sum_i w_i^2 ([l_i = l] - m_l)^2) computed from the
    walkers; with equal weights, sqrt(m (1 - m) / N)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    log_w = rng.normal(size=200)
    mass, ess = label_mass_and_ess(jnp.asarray(labels), jnp.asarray(log_w), 5)
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    onehot = labels[:, None] == np.arange(5)
    direct = np.sqrt(np.sum(w[:, None] ** 2 * (onehot - np.asarray(mass)) ** 2, axis=0))
    np.testing.assert_allclose(label_mass_standard_error(mass, ess), direct, rtol=1e-5, atol=1e-9)
    assert float(label_mass_standard_error(mass, ess)[4]) == 0.0  # no walker carries label 4
    mass, ess = label_mass_and_ess(jnp.asarray(labels), jnp.zeros(200), 4)
    np.testing.assert_allclose(label_mass_standard_error(mass, ess), np.sqrt(mass * (1 - mass) / 200), rtol=1e-5)
    # leading axes (iterations) broadcast
    stacked = label_mass_standard_error(jnp.stack([mass, mass]), jnp.stack([ess, ess]))
    assert stacked.shape == (2, 4)


def test_label_mass_standard_error_matches_the_spread_over_replicates():
    """Importance-weighted walkers (proposal N(0.5, 1.2^2), target N(0, 1), labels by bins):
    over R = 2000 independent replicates of N = 500 walkers the spread of the mass estimate
    equals the mean standard error. The sample sd of R replicates has a relative error of
    1/sqrt(2R) = 1.6%; the tolerance is 4 of those plus 2% for the delta method's O(1/N)."""
    reps, n = 2000, 500
    x = 0.5 + 1.2 * jax.random.normal(jax.random.key(3), (reps, n))
    log_w = -0.5 * x**2 + 0.5 * ((x - 0.5) / 1.2) ** 2
    labels = jnp.digitize(x, jnp.array([-0.5, 0.7]))
    mass, ess = jax.vmap(lambda lab, lw: label_mass_and_ess(lab, lw, 3))(labels, log_w)
    se = label_mass_standard_error(mass, ess)
    truth = np.array([0.3085375, 0.4494988, 0.2419637])  # Phi(-0.5), Phi(0.7) - Phi(-0.5), 1 - Phi(0.7)
    np.testing.assert_allclose(np.mean(mass, 0), truth, atol=4 * float(np.max(np.mean(se, 0))) / np.sqrt(reps) + 2e-3)
    np.testing.assert_allclose(np.std(mass, 0), np.mean(se, 0), rtol=4 / np.sqrt(2 * reps) + 0.02)


def test_label_trace_in_fit():
    """The sign of the first coordinate as the label: the masses sum to 1 at every
    iteration, and the label ESS sum is at most N."""
    data = jax.random.normal(jax.random.key(0), (100, 2)) + jnp.array([1.0, 0.0])
    walkers = jax.random.normal(jax.random.key(1), (64, 2))
    trace_fn = label_trace(lambda x: (x[:, 0] > 0).astype(jnp.int32), 2)
    result = numpyro_ebm.fit(
        lambda p, x: 0.5 * jnp.sum((x - p) ** 2), jnp.zeros(2), data, optimizer=optax.sgd(0.05),
        kernel="jarzynski", step_size=0.1, num_walkers=64, init_particles=walkers,
        num_iterations=10, rng_key=jax.random.key(2), trace_fn=trace_fn)
    mass = result.trace["extra"]["label_mass"]
    assert mass.shape == (10, 2)
    np.testing.assert_allclose(mass.sum(1), 1.0, rtol=1e-5)
    assert np.all(result.trace["extra"]["label_ess"].sum(1) <= 64 + 1e-3)
    with pytest.raises(ValueError, match="`num_labels`"):
        label_trace(lambda x: x, 0)


def test_trace_every_evaluates_the_trace_at_every_third_iteration_only():
    """``trace_every=3``: rows 0, 3, 6, 9 equal those of a run traced at every iteration (same
    key: the trace does not change the run), the rows in between read as missing (NaN for
    floats, the smallest integer for integers)."""
    data = jax.random.normal(jax.random.key(0), (100, 2)) + jnp.array([1.0, 0.0])
    walkers = jax.random.normal(jax.random.key(1), (64, 2))
    labels = label_trace(lambda x: (x[:, 0] > 0).astype(jnp.int32), 2)

    def trace_fn(params, state):
        return {**labels(params, state), "positive": jnp.sum(state.particles[:, 0] > 0)}

    def run(every):
        return numpyro_ebm.fit(
            lambda p, x: 0.5 * jnp.sum((x - p) ** 2), jnp.zeros(2), data, optimizer=optax.sgd(0.05),
            kernel="jarzynski", step_size=0.1, num_walkers=64, init_particles=walkers,
            num_iterations=10, rng_key=jax.random.key(2), trace_fn=trace_fn, trace_every=every)

    every, sparse = run(1), run(3)
    np.testing.assert_array_equal(sparse.trace["normalized_ess"], every.trace["normalized_ess"])
    for name in ("label_mass", "label_ess", "positive"):
        np.testing.assert_array_equal(sparse.trace["extra"][name][::3], every.trace["extra"][name][::3])
    off = np.arange(10) % 3 != 0
    assert np.all(np.isnan(sparse.trace["extra"]["label_mass"][off]))
    assert np.all(sparse.trace["extra"]["positive"][off] == np.iinfo(np.int32).min)
    with pytest.raises(ValueError, match="`trace_every`"):
        run(0)
