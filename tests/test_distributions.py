"""Tests of the EnergyBased distribution (numpyro_ebm.distributions)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax.scipy.special import logsumexp
from numpyro.diagnostics import effective_sample_size
from numpyro.distributions import constraints
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import log_density

from numpyro_ebm import fit
from numpyro_ebm.distributions import EnergyBased, energy_based_from_fit

MEAN = jnp.array([1.0, -2.0])
VAR = jnp.array([0.5, 2.0])


def gauss_energy(p, x):
    return 0.5 * jnp.sum((x - p["m"]) ** 2 / p["v"])


def gauss_log_z(p):
    return 0.5 * jnp.sum(jnp.log(2 * math.pi * p["v"]))


PARAMS = {"m": MEAN, "v": VAR}


def test_log_prob_shapes_support_and_value():
    walkers = MEAN + jnp.sqrt(VAR) * jax.random.normal(jax.random.key(0), (50, 2))
    d = EnergyBased(gauss_energy, PARAMS, gauss_log_z(PARAMS), particles=walkers)
    assert d.event_shape == (2,) and d.batch_shape == ()
    assert d.support is constraints.real_vector
    x = jax.random.normal(jax.random.key(1), (3, 4, 2))
    want = dist.MultivariateNormal(MEAN, jnp.diag(VAR)).log_prob(x)
    got = d.log_prob(x)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # unnormalised without log_normalizer
    u = EnergyBased(gauss_energy, PARAMS, event_shape=(2,))
    np.testing.assert_allclose(u.log_prob(x), want + gauss_log_z(PARAMS), rtol=1e-5)
    # scalar events default to the real line
    s = EnergyBased(lambda p, x: 0.5 * x**2, {}, event_shape=())
    assert s.support is constraints.real
    np.testing.assert_allclose(s.log_prob(jnp.array([0.0, 1.0])), [0.0, -0.5])
    # a pytree through jit (potential_fn is static, params/walkers are leaves)
    f = jax.jit(lambda dd, xx: dd.log_prob(xx))
    np.testing.assert_allclose(f(d, x), want, rtol=1e-5)
    with pytest.raises(ValueError, match="event_shape"):
        d.log_prob(jnp.zeros(3))


def test_sample_resamples_walkers_by_weight():
    particles = jnp.array([[0.0], [1.0], [2.0]])
    w = np.array([0.2, 0.3, 0.5])
    d = EnergyBased(lambda p, x: jnp.sum(x**2), {}, particles=particles,
                    log_weights=jnp.log(w) + 7.0)  # unnormalised log weights are fine
    n = 20_000
    draws = d.sample(jax.random.key(0), (n,))
    assert draws.shape == (n, 1)
    freq = np.array([(draws[:, 0] == k).mean() for k in range(3)])
    # multinomial frequencies: 5 standard errors
    assert np.all(np.abs(freq - w) < 5 * np.sqrt(w * (1 - w) / n))
    np.testing.assert_allclose(d.mean, [np.dot(w, [0, 1, 2])], rtol=1e-6)
    np.testing.assert_allclose(d.effective_sample_size, 1 / np.sum(w**2), rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="no walkers"):
        EnergyBased(gauss_energy, PARAMS, event_shape=(2,)).sample(jax.random.key(0))
    with pytest.raises(ValueError, match="`event_shape` is required"):
        EnergyBased(gauss_energy, PARAMS)
    with pytest.raises(ValueError, match="`log_weights`"):
        EnergyBased(gauss_energy, PARAMS, particles=jnp.zeros((4, 2)), log_weights=jnp.zeros(3))
    with pytest.raises(ValueError, match="disagrees"):
        EnergyBased(gauss_energy, PARAMS, particles=jnp.zeros((4, 2)), event_shape=(3,))
    with pytest.raises(ValueError, match="`log_normalizer`"):
        EnergyBased(gauss_energy, PARAMS, jnp.zeros(2), event_shape=(2,))
    with pytest.raises(TypeError, match="`potential_fn`"):
        EnergyBased(None, PARAMS, event_shape=(2,))
    with pytest.raises(TypeError, match="FitResult"):
        energy_based_from_fit(gauss_energy, object(), 0.0)


def test_non_finite_log_weights_are_rejected_and_zero_weights_never_drawn():
    particles = jnp.arange(5.0)[:, None]
    for bad in (jnp.array([0.0, jnp.nan, 0.0, 0.0, 0.0]), jnp.full(5, jnp.nan),
                jnp.array([0.0, 0.0, jnp.inf, 0.0, 0.0])):
        with pytest.raises(ValueError, match="`log_weights` contains .* NaN or \\+inf"):
            EnergyBased(gauss_energy, PARAMS, particles=particles, log_weights=bad)
    with pytest.raises(ValueError, match="`log_weights` are all -inf"):
        EnergyBased(gauss_energy, PARAMS, particles=particles, log_weights=jnp.full(5, -jnp.inf))
    # -inf is weight 0: those walkers are never drawn, the others are
    lw = jnp.array([-jnp.inf, 0.0, -jnp.inf, 0.0, 0.0])
    d = EnergyBased(lambda p, x: jnp.sum(x**2), {}, particles=particles, log_weights=lw)
    draws = np.asarray(d.sample(jax.random.key(0), (3000,)))[:, 0]
    assert set(np.unique(draws)) == {1.0, 3.0, 4.0}
    np.testing.assert_allclose(d.mean, [8.0 / 3.0], rtol=1e-6)


def test_from_fit_rejects_nan_weights():
    class Result:  # what a diverged run can leave behind
        params = PARAMS
        method = "jarzynski"
        state = type("State", (), {
            "particles": jnp.zeros((4, 2)),
            "log_weights": jnp.array([0.0, jnp.nan, 0.0, 0.0]),
            "log_normalizer": jnp.asarray(0.0),
        })()

    with pytest.raises(ValueError, match="`log_weights` contains 1 NaN"):
        energy_based_from_fit(gauss_energy, Result(), 0.0)


# ---------------------------------------------------------------------------------------
# A trained 1-D model: Gaussian bumps on top of a standard-normal base
# ---------------------------------------------------------------------------------------

CENTRES = jnp.linspace(-3.0, 3.0, 7)


def bump_energy(p, x):
    """U(x) = x^2/2 + sum_k a_k exp(-(x - c_k)^2): rho_0 = N(0, 1) at a = 0, and the
    bounded bumps keep Z finite for any a."""
    return 0.5 * x**2 + jnp.sum(p["a"] * jnp.exp(-((x - CENTRES) ** 2)))


@pytest.fixture(scope="module")
def trained_1d():
    key = jax.random.key(0)
    comp = jax.random.bernoulli(key, 0.7, (2000,))
    noise = 0.5 * jax.random.normal(jax.random.key(1), (2000,))
    data = jnp.where(comp, 1.5, -1.5) + noise
    params = {"a": jnp.zeros(7)}
    methods = {}
    for method in ("jarzynski", "pcd"):
        methods[method] = fit(
            bump_energy, params, data, optimizer=optax.sgd(0.3), kernel=method,
            num_walkers=1000, step_size=0.05, num_iterations=200,
            rng_key=jax.random.key(2), data_batch_size=200,
        )
    methods["data"] = data
    return methods


def test_from_fit_normalised_on_grid(trained_1d):
    result = trained_1d["jarzynski"]
    d = energy_based_from_fit(bump_energy, result, 0.5 * math.log(2 * math.pi))
    assert d.event_shape == () and d.particles.shape == (1000,)
    grid = jnp.linspace(-9.0, 9.0, 4001)
    dx = grid[1] - grid[0]
    log_mass = float(logsumexp(d.log_prob(grid)) + jnp.log(dx))
    # The trained model is not the initial one (so the estimate is not trivially exact)
    assert float(jnp.max(jnp.abs(result.params["a"]))) > 0.5
    # Jarzynski log Z error: the importance-sampling error of the final step alone is
    # ~ sqrt(1/ESS - 1/N) ~ 0.01 (ESS ~ 900 of 1000), plus what accumulates along the path
    # and the (downward) bias of log-mean-exp. Over fit seeds 2..5 the error was 0.077,
    # -0.014, 0.030, 0.059 with per-epoch minibatches (0.061, 0.013, -0.009, 0.037 with the
    # earlier independent draws; log Z ratio ~ -0.06 .. -0.17), so 0.1 is ~2.5 of their spreads.
    assert abs(log_mass) < 0.1, log_mass
    # the PCD result cannot be normalised
    with pytest.raises(ValueError, match="does not estimate log Z"):
        energy_based_from_fit(bump_energy, trained_1d["pcd"], 0.0)
    assert energy_based_from_fit(bump_energy, trained_1d["pcd"]).log_normalizer is None


def test_from_fit_with_data_anneals_and_keeps_bounds(trained_1d):
    """Without log_z0, with the data: log Z by annealing at theta_K, both directions (the
    reverse from the run's weighted walkers), for Jarzynski and PCD results alike."""
    grid = jnp.linspace(-9.0, 9.0, 4001)
    data = trained_1d["data"]
    for method in ("jarzynski", "pcd"):
        result = trained_1d[method]
        d = energy_based_from_fit(bump_energy, result, data=data, rng_key=jax.random.key(3),
                                  num_walkers=500)
        exact = float(logsumexp(-d.energy(grid)) + jnp.log(grid[1] - grid[0]))  # quadrature
        lower, upper = (float(b) for b in d.log_normalizer_bounds)
        assert float(d.log_normalizer) == lower
        # each side is a mean of 4 repeats; 0.1 nats is several of their standard errors
        # (about 0.01-0.03 here) and the sandwich must hold in that band
        assert lower - 0.1 <= exact <= upper + 0.1, (method, lower, exact, upper)
        assert abs(lower - exact) < 0.1
    with pytest.raises(ValueError, match="not both"):
        energy_based_from_fit(bump_energy, result, 0.0, data=data, rng_key=jax.random.key(0))
    with pytest.raises(ValueError, match="rng_key"):
        energy_based_from_fit(bump_energy, result, data=data)


def test_weighted_walkers_match_density(trained_1d):
    """The weighted walker mean equals the grid mean of the trained density within MC error."""
    d = energy_based_from_fit(bump_energy, trained_1d["jarzynski"], 0.0)
    grid = jnp.linspace(-9.0, 9.0, 4001)
    p = jax.nn.softmax(d.log_prob(grid))
    mean = float(jnp.sum(p * grid))
    sd = float(jnp.sqrt(jnp.sum(p * (grid - mean) ** 2)))
    ess = float(d.effective_sample_size)
    assert abs(float(d.mean) - mean) < 5 * sd / math.sqrt(ess)


# ---------------------------------------------------------------------------------------
# Inside NumPyro models
# ---------------------------------------------------------------------------------------


def test_nuts_with_energy_based_prior_matches_conjugate_posterior():
    """z ~ EBM(N(MEAN, diag VAR)), y_i ~ N(z, 1): the posterior is N(mu_post, diag v_post)."""
    walkers = MEAN + jnp.sqrt(VAR) * jax.random.normal(jax.random.key(0), (200, 2))
    prior = EnergyBased(gauss_energy, PARAMS, particles=walkers)  # unnormalised is fine
    y = jnp.array([[0.5, 0.0], [1.5, -1.0], [0.0, 0.5]])

    def model(y):
        z = numpyro.sample("z", prior)
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=2000, progress_bar=False)
    mcmc.run(jax.random.key(1), y)
    z = np.asarray(mcmc.get_samples()["z"])
    v_post = 1.0 / (1.0 / VAR + y.shape[0])
    mu_post = v_post * (MEAN / VAR + y.sum(0))
    ess = np.asarray(effective_sample_size(z[None]))
    # means within 5 MC standard errors; variances within 5 * sqrt(2 / ESS) relative
    assert np.all(np.abs(z.mean(0) - mu_post) < 5 * np.sqrt(v_post / ess))
    assert np.all(np.abs(z.var(0) / v_post - 1) < 5 * np.sqrt(2.0 / ess))


def test_energy_based_as_likelihood():
    """log_density of a model with an EBM likelihood = sum of EBM log_probs + prior."""
    y = jnp.array([[0.5, 0.0], [1.5, -1.0], [0.0, 0.5]])

    def model(y):
        m = numpyro.sample("m", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        p = {"m": m, "v": VAR}
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", EnergyBased(gauss_energy, p, gauss_log_z(p), event_shape=(2,)),
                           obs=y)

    m = jnp.array([0.3, -0.4])
    lp, _ = log_density(model, (y,), {}, {"m": m})
    want = (dist.Normal(0.0, 1.0).log_prob(m).sum()
            + dist.MultivariateNormal(m, jnp.diag(VAR)).log_prob(y).sum())
    np.testing.assert_allclose(lp, want, rtol=1e-5)
