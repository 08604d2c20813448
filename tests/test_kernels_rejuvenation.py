"""Resample-move (kernels.rejuvenation): MALA moves after resampling keep the weighted
estimates exact and spread the copies that resampling made."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm
from numpyro_ebm.kernels import jarzynski_ula, ula
from numpyro_ebm.kernels.evaluation import weighted_param_grad
from numpyro_ebm.kernels.rejuvenation import mala_moves, with_rejuvenation


def gauss(params, x):
    return 0.5 * jnp.sum((x - params) ** 2)


def run_fixed(kernel, state, key, num_iterations, h):
    def body(st, k):
        st, info = kernel.step(gauss, k, st, st.params, h)
        return st, (info.resampled, info.rejuvenated)

    return jax.lax.scan(body, state, jax.random.split(key, num_iterations))


def test_weighted_moments_stay_exact_with_rejuvenation(x64):
    """Fixed theta, target N(0, I_4), ULA step h = 0.5 (plain ULA's stationary variance is
    1 / (1 - h/2) = 4/3 per coordinate): with resampling at ESS/N < 0.9 (here at every
    call) and 3 MALA moves after every resampling, the weighted mean of |x|^2 / d stays 1
    within 4 Monte Carlo standard errors (var(|x|^2 / d) = 2 / d, over the ESS). A
    rejuvenation move that is not rho-invariant (e.g. ULA, or MALA with a wrong gradient
    sign) moves this by more than that."""
    n, d, h = 4000, 4, 0.5
    x0 = jax.random.normal(jax.random.key(0), (n, d))
    kernel = with_rejuvenation(jarzynski_ula.walker_kernel(h, ess_threshold=0.9), num_moves=3)
    state = kernel.init(gauss, x0, jnp.zeros(d))
    state, (resampled, rejuvenated) = jax.jit(lambda st, k: run_fixed(kernel, st, k, 60, h))(
        state, jax.random.key(1))
    assert int(resampled.sum()) >= 5 and bool(jnp.all(resampled == rejuvenated))
    w = np.exp(np.asarray(state.log_weights))
    x2 = np.sum(np.asarray(state.particles) ** 2, axis=1) / d
    ess = 1.0 / np.sum(w**2)
    assert abs(np.sum(w * x2) - 1.0) < 4 * np.sqrt(2.0 / (d * ess)), (np.sum(w * x2), ess)


def test_copies_spread_after_resampling(x64):
    """Degenerate weights force a resampling: without rejuvenation the walkers sit on the
    few surviving ancestors; with it, nearly every walker is at a distinct position."""
    n, h = 500, 0.3
    x0 = jax.random.normal(jax.random.key(0), (n, 2))
    log_w = jnp.where(jnp.arange(n) < 20, 0.0, -50.0)
    results = {}
    for name, kernel in {"plain": jarzynski_ula.walker_kernel(h),
                         "rejuvenated": with_rejuvenation(jarzynski_ula.walker_kernel(h), 5)}.items():
        state = kernel.init(gauss, x0, jnp.zeros(2))
        state = state._replace(log_weights=log_w - jax.nn.logsumexp(log_w))
        # move at theta = 0 with no parameter change; ULA then moves every copy too, so compare
        # right after the resampling of one call
        new, info = kernel.step(gauss, jax.random.key(3), state, state.params, h)
        assert bool(info.resampled)
        results[name] = len(np.unique(np.asarray(new.particles), axis=0))
        ancestors = len(np.unique(np.asarray(info.ancestors)))
    assert ancestors <= 20
    assert results["plain"] == ancestors
    assert results["rejuvenated"] >= 0.9 * n


def test_mala_moves_keep_weights_and_cache_consistent(x64):
    x0 = jax.random.normal(jax.random.key(0), (64, 2))
    state = jarzynski_ula.init(x0, jnp.ones(2), gauss)
    moved, acceptance, step = mala_moves(jax.random.key(1), state, gauss, 0.2, 4)
    np.testing.assert_array_equal(moved.log_weights, state.log_weights)
    assert moved.log_normalizer == state.log_normalizer
    u, g = jax.vmap(jax.value_and_grad(gauss, argnums=1), (None, 0))(moved.params, moved.particles)
    np.testing.assert_allclose(moved.potential, u, rtol=1e-12)
    np.testing.assert_allclose(moved.grad, g, rtol=1e-12)
    assert 0.3 < float(acceptance) <= 1.0 and float(step) > 0


def test_trainer_records_rejuvenation_and_the_walker_term_is_exact(x64):
    data = 1.0 + jax.random.normal(jax.random.key(0), (200, 2))
    walkers = jax.random.normal(jax.random.key(1), (128, 2))
    kernel = with_rejuvenation(jarzynski_ula.walker_kernel(0.3, ess_threshold=0.9), num_moves=2)
    result = numpyro_ebm.fit(gauss, jnp.zeros(2), data, optimizer=optax.sgd(0.2), kernel=kernel,
                             num_walkers=128, num_iterations=30, rng_key=jax.random.key(2),
                             init_particles=walkers)
    trace = result.trace
    assert trace["rejuvenated"].sum() >= 3
    np.testing.assert_array_equal(trace["rejuvenated"], trace["resampled"])
    assert np.all(np.isfinite(trace["mala_acceptance"][trace["rejuvenated"]]))
    assert np.all(np.isnan(trace["mala_acceptance"][~trace["rejuvenated"]]))
    st = result.train_state
    expected = weighted_param_grad(gauss, st.params, st.walkers.particles, jnp.exp(st.walkers.log_weights))
    np.testing.assert_allclose(st.walker_grad, expected, rtol=1e-10, atol=1e-12)


def test_rejuvenation_needs_a_weighted_kernel():
    with pytest.raises(ValueError, match="`kernel`"):
        with_rejuvenation(ula.walker_kernel(0.1))
    with pytest.raises(ValueError, match="`num_moves`"):
        with_rejuvenation(jarzynski_ula.walker_kernel(0.1), 0)
