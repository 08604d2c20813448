"""The authors' moves (an option outside the theory): exact weights in the exact setting,
the parameter part for walkers that do not move, the bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm
from numpyro_ebm.kernels import authors_ula


def gauss(params, x):  # N(0, exp(-s) I)
    return 0.5 * jnp.exp(params) * jnp.sum(x**2)


def test_exact_noise_gives_exact_weights_where_plain_ula_is_biased():
    """sigma = sqrt(2h), all walkers, no bounds: each move's increment is the MALA ratio,
    so at fixed theta on N(0, I_4) the weighted E|x|^2/d stays 1 (MC error
    sqrt(Var(|x|^2/d) / ESS) = sqrt(0.5 / ESS)), while the unweighted walkers drift to
    ULA's 1 / (1 - h/2) = 1.33 at h = 0.5. (With the noise halved, i.e. weights computed for
    another dynamics than the one run, the same estimate comes out at 0.31.)"""
    h, n, d = 0.5, 4000, 4
    kernel = jax.jit(authors_ula.build_kernel(gauss, h, noise_scale=np.sqrt(2 * h), num_mcmc_steps=5,
                                              subset_size=n, num_subsets=1, bounds=None,
                                              ess_threshold=0.3))
    state = authors_ula.init(jax.random.normal(jax.random.key(0), (n, d)), jnp.asarray(0.0), gauss)
    for k in range(10):
        state, info = kernel(jax.random.key(k + 1), state)
    w = np.exp(np.asarray(state.log_weights, np.float64))
    second = np.sum(np.asarray(state.particles, np.float64) ** 2, 1) / d
    ess = 1.0 / np.sum(w**2)
    assert abs(np.sum(w * second) - 1.0) < 4 * np.sqrt(0.5 / ess)
    unweighted = authors_ula.build_kernel(gauss, h, noise_scale=np.sqrt(2 * h), num_mcmc_steps=50,
                                          subset_size=n, num_subsets=1, bounds=None, weighted=False)
    plain, _ = jax.jit(unweighted)(jax.random.key(99), state)
    assert np.mean(np.sum(np.asarray(plain.particles) ** 2, 1) / d) > 1.2


def test_walkers_outside_the_subset_get_the_parameter_part_and_stay():
    n = 32
    kernel = authors_ula.build_kernel(gauss, 0.01, subset_size=8, num_subsets=1, bounds=None)
    x = jax.random.normal(jax.random.key(0), (n, 3))
    state = authors_ula.init(x, jnp.asarray(0.0), gauss)
    new, info = kernel(jax.random.key(1), state, jnp.asarray(0.3))
    moved = np.any(np.asarray(new.particles) != np.asarray(x), axis=1)
    assert moved.sum() == 8
    expected = np.asarray(state.potential - jax.vmap(gauss, (None, 0))(jnp.asarray(0.3), x))
    np.testing.assert_allclose(np.asarray(info.log_weight_increments)[~moved], expected[~moved], rtol=1e-6)


def test_bounds_keep_the_walkers_inside():
    kernel = authors_ula.build_kernel(gauss, 0.05, noise_scale=0.5, subset_size=16, num_subsets=2)
    x = jax.random.uniform(jax.random.key(0), (16, 5), minval=-1.0, maxval=1.0)
    new, _ = kernel(jax.random.key(1), authors_ula.init(x, jnp.asarray(0.0), gauss))
    assert np.all(np.abs(np.asarray(new.particles)) <= 1.0)


def test_trains_through_fit_and_checks_its_arguments():
    data = 0.5 * jax.random.normal(jax.random.key(0), (64, 3))
    result = numpyro_ebm.fit(gauss, jnp.asarray(0.0), data, optimizer=optax.sgd(0.05),
                             kernel=authors_ula.walker_kernel(0.01, subset_size=16, num_subsets=2,
                                                              num_mcmc_steps=3, bounds=None),
                             num_walkers=32, num_iterations=20, rng_key=jax.random.key(1),
                             init_particles="standard_normal", log_z0=1.5 * np.log(2 * np.pi))
    assert np.all(np.isfinite(result.trace["log_normalizer"]))
    assert float(result.params) > 0  # the data are narrower than N(0, I): the precision grows
    with pytest.raises(ValueError, match="noise_scale"):
        authors_ula.walker_kernel(0.01, noise_scale=0.0)
    with pytest.raises(ValueError, match="bounds"):
        authors_ula.walker_kernel(0.01, bounds=(1.0, -1.0))
    with pytest.raises(ValueError, match="subset_size"):
        authors_ula.build_kernel(gauss, 0.01, subset_size=64)(jax.random.key(0), authors_ula.init(
            data[:8], jnp.asarray(0.0), gauss))
