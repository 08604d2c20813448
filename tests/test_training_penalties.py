"""Energy penalties (training.penalties): the gradient of H + P with the weights held
fixed, from the evaluations the iteration already makes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm
from numpyro_ebm.kernels import jarzynski_ula, ula
from numpyro_ebm.kernels.evaluation import weighted_param_grad
from numpyro_ebm.training.penalties import squared_energy

ALPHA = 0.05


def u(params, x):
    return 0.5 * jnp.sum((x - params["mu"]) ** 2) * jnp.exp(-2.0 * params["log_scale"])


def problem():
    data = 1.5 + 0.7 * jax.random.normal(jax.random.key(0), (100, 2))
    params = {"mu": jnp.array([0.2, -0.1]), "log_scale": jnp.asarray(0.1)}
    walkers = jax.random.normal(jax.random.key(1), (64, 2))
    return data, params, walkers


def expected_gradient(params, data, walkers_state):
    """grad of mean(U + a U^2) over the data minus sum_i w_i (1 - 2 a U_i) grad U_i."""
    data_grad = jax.grad(lambda p: jnp.mean(jax.vmap(lambda x: u(p, x) + ALPHA * u(p, x) ** 2)(data)))(params)
    w = jnp.exp(walkers_state.log_weights)
    c = w * (1.0 - 2.0 * ALPHA * walkers_state.potential)
    walker = weighted_param_grad(u, params, walkers_state.particles, c)
    return jax.tree.map(jnp.subtract, data_grad, walker)


@pytest.mark.parametrize("kernel", [jarzynski_ula.walker_kernel(0.2, ess_threshold=1.0),
                                    jarzynski_ula.walker_kernel(0.2, ess_threshold=0.01),
                                    ula.walker_kernel(0.2)], ids=["resampling", "no-resampling", "pcd"])
def test_penalised_gradient_and_walker_term(kernel, x64):
    """Two steps with SGD: each step's gradient, read off the parameter change, equals the
    gradient of H + P at theta_k with the walkers of theta_k; the walker term carried to the
    next step (fused pass, factors w_i (1 - 2 a U_i)) equals a direct weighted pass."""
    data, params, walkers = problem()
    lr = 0.1
    trainer = numpyro_ebm.build_trainer(u, optax.sgd(lr), kernel, energy_penalty=squared_energy(ALPHA))
    state = trainer.init(params, walkers)
    for k in range(2):
        expected = expected_gradient(state.params, data, state.walkers)
        new, info = jax.jit(trainer.step)(jax.random.key(k), state, data)
        got = jax.tree.map(lambda a, b: (a - b) / lr, state.params, new.params)
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12), got, expected)
        walkers_state = new.walkers
        c = jnp.exp(walkers_state.log_weights) * (1.0 - 2.0 * ALPHA * walkers_state.potential)
        direct = weighted_param_grad(u, new.params, walkers_state.particles, c)
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12),
                     new.walker_grad, direct)
        penalty = ALPHA * (jnp.mean(jax.vmap(u, (None, 0))(state.params, data) ** 2)
                           + jnp.sum(jnp.exp(state.walkers.log_weights) * state.walkers.potential**2))
        np.testing.assert_allclose(info.energy_penalty, penalty, rtol=1e-12)
        state = new


def test_fit_records_the_penalty_and_refuses_a_bad_one(x64):
    data, params, walkers = problem()
    result = numpyro_ebm.fit(u, params, data, optimizer=optax.sgd(0.05), kernel="jarzynski",
                             step_size=0.1, num_walkers=64, init_particles=walkers,
                             num_iterations=5, rng_key=jax.random.key(0),
                             energy_penalty=squared_energy(0.01))
    assert result.trace["energy_penalty"].shape == (5,)
    assert np.all(result.trace["energy_penalty"] > 0)
    with pytest.raises(TypeError, match="`energy_penalty`"):
        numpyro_ebm.build_trainer(u, optax.sgd(0.1), jarzynski_ula.walker_kernel(0.1), energy_penalty=0.01)
    with pytest.raises(ValueError, match="`alpha`"):
        squared_energy(-1.0)
