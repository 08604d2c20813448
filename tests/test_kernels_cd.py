"""Contrastive divergence walkers (numpyro_ebm.kernels.cd)."""

import blackjax
import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm.kernels import cd
from numpyro_ebm.kernels import jarzynski_ula as ju


def u(params, x):
    return 0.5 * jnp.sum((x - params["mu"]) ** 2)


DATA = np.arange(20.0).reshape(10, 2)  # NumPy: float64 under x64 in the tests
P0 = {"mu": np.zeros(2)}
P1 = {"mu": np.ones(2)}


def _distance_to_data(particles):
    x = np.asarray(particles)
    return np.min(np.abs(x[:, None, :] - DATA[None]).sum(-1), axis=1)


def test_cd_kernel_restarts_from_the_data_then_moves(x64):
    """``kernel(rng_key, state, data, params=None, step_size=None) -> (state, info)``: the
    walkers restart at data points (drawn with replacement), for the new parameters, then
    make one unweighted ULA move; ``step_size`` overrides the default for the call."""
    state = ju.init(jax.random.normal(jax.random.key(0), (30, 2)) * 100, P0, u)
    kernel = cd.build_kernel(u, 1e-10)
    out = kernel(jax.random.key(1), state, jnp.asarray(DATA), P1)
    assert len(out) == 2
    new, info = out
    assert np.max(_distance_to_data(new.particles)) < 1e-3
    np.testing.assert_array_equal(new.params["mu"], P1["mu"])
    np.testing.assert_allclose(new.log_weights, -np.log(30))
    assert float(info.ess) == 30.0 and not bool(info.resampled)
    np.testing.assert_allclose(new.potential, jax.vmap(u, (None, 0))(P1, new.particles))
    moved, _ = kernel(jax.random.key(1), state, jnp.asarray(DATA), P1, 0.5)
    assert np.max(_distance_to_data(moved.particles)) > 0.1


def test_cd_walker_kernel_restarts_every_restart_every_iterations(x64):
    """``walker_kernel(h, restart_every=m).restart`` replaces the walkers by data points at
    iterations k with k % m == 0 and leaves them alone otherwise."""
    kernel = cd.walker_kernel(0.1, restart_every=3)
    state = ju.init(jax.random.normal(jax.random.key(0), (16, 2)) + 100.0, P0, u)
    for k in range(6):
        new = kernel.restart(u, jax.random.key(k), state, P1, jnp.asarray(DATA), jnp.asarray(k))
        if k % 3 == 0:
            assert np.max(_distance_to_data(new.particles)) == 0.0
            np.testing.assert_array_equal(new.params["mu"], P1["mu"])
        else:
            np.testing.assert_array_equal(new.particles, state.particles)


def test_cd_top_level_api_with_run_inference_algorithm(x64):
    algo = cd.as_top_level_api(u, P0, 1e-10, jnp.asarray(DATA))
    state = algo.init(jax.random.normal(jax.random.key(0), (12, 2)))
    final, (_, infos) = blackjax.util.run_inference_algorithm(
        jax.random.key(2), algo, 4, initial_state=state)
    assert infos.ess.shape == (4,)
    assert np.max(_distance_to_data(final.particles)) < 1e-3
